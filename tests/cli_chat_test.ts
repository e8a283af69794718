import assert from "node:assert/strict";
import {
  bobAndAlice,
  CliProcess,
  login,
  loginProcess,
  looksLikeStackTrace,
  PASSWORD,
  Peer,
  register,
  startServers,
} from "./_cli_helpers.ts";
import { rawUpgrade } from "./_harness.ts";
import { formatDay } from "../cli/render.ts";
import { registerUser } from "../cli/api.ts";

const MESSAGE_LINE = /^\[\d\d:\d\d\] /;
const WRONG_PASSWORD_LINE =
  'chatroom: cannot log in as "alice": wrong username or password (invalid_credentials)';
const NAME_TAKEN_LINE =
  'chatroom: cannot register "ALICE": username is taken (username_taken)';

Deno.test("register and login with --password-stdin, then /quit exits 0", async () => {
  const servers = await startServers();
  try {
    const reg = new CliProcess([
      "register",
      "--auth-url",
      servers.authUrl,
      "--user",
      "alice",
      "--password-stdin",
    ]);
    await reg.write(PASSWORD);
    assert.equal(await reg.exit(), 0, reg.stderr.text);
    assert.ok(reg.stdout.text.includes("registered alice"), reg.stdout.text);

    const bob = await Peer.connect(
      servers.chat.url,
      await bobToken(servers.authUrl),
    );
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    await bob.next((f) => f.type === "join" && f.user === "alice");
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.next((f) => f.type === "leave" && f.user === "alice");
    await bob.close();
    assert.equal(cli.stderr.text, "");
  } finally {
    await servers.close();
  }
});

Deno.test("the menu driven through piped stdin registers, logs in, says hello and quits", async () => {
  const servers = await startServers();
  try {
    const bob = await Peer.connect(
      servers.chat.url,
      await bobToken(servers.authUrl),
    );
    const cli = new CliProcess(["--auth-url", servers.authUrl]);
    // All of it at once, as `printf ... | chatroom` would: nothing may be lost.
    await cli.write(
      "2",
      "alice",
      PASSWORD,
      "1",
      "alice",
      PASSWORD,
      "hello",
      "/quit",
    );
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const echo = await bob.next((f) => f.type === "message");
    assert.equal(echo.from, "alice");
    assert.equal(echo.text, "hello");
    assert.equal(echo.room, "lobby");
    assert.equal(echo.client_id, undefined, "nobody else sees the client_id");
    await bob.close();
    const out = cli.stdout.text;
    assert.ok(out.includes("registered alice"), out);
    assert.ok(out.includes("logged in as alice"), out);
    assert.ok(
      cli.stdout.lines.some((l) =>
        MESSAGE_LINE.test(l) && l.endsWith("<alice> hello")
      ),
      out,
    );
    assert.equal(cli.stderr.text, "");
  } finally {
    await servers.close();
  }
});

Deno.test("through pipes, each prompt is a line on stdout, so a script can wait for it before answering", async () => {
  const servers = await startServers();
  try {
    const cli = new CliProcess(["--auth-url", servers.authUrl]);
    const answer = async (prompt: string, line: string) => {
      await cli.stdout.next(prompt);
      await cli.write(line);
    };
    await answer("Choose 1 or 2:", "2");
    await answer("Username:", "alice");
    await answer("Password:", PASSWORD);
    await cli.stdout.next("registered alice; you can now log in");
    await answer("Choose 1 or 2:", "1");
    await answer("Username:", "alice");
    await answer("Password:", PASSWORD);
    await cli.stdout.next("connected as alice");
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    // No chat prompt among the chat's lines.
    assert.ok(!cli.stdout.lines.some((l) => l.includes("#lobby>")));
    assert.equal(cli.stderr.text, "");
  } finally {
    await servers.close();
  }
});

Deno.test("input that ends right after commands still shows their answers (scripted /who, /rooms, /msg, /history)", async (t) => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bob = await Peer.connect(
      servers.chat.url,
      (await login(servers.authUrl, "bob")).token,
    );
    for (const end of ["end of input", "/quit"]) {
      await t.step(end, async () => {
        const cli = loginProcess(servers.authUrl, "alice");
        await cli.write(
          PASSWORD,
          "/who",
          "/rooms",
          "/msg bob psst",
          "/history",
          ...(end === "/quit" ? ["/quit"] : []),
        );
        await cli.closeStdin();
        assert.equal(await cli.exit(), 0, cli.stderr.text);
        const out = cli.stdout.lines;
        assert.ok(out.some((l) => l.includes("in #lobby: ")), out.join("\n"));
        assert.ok(out.some((l) => l.includes("rooms: #lobby")), out.join("\n"));
        assert.ok(out.some((l) => l.includes("psst")), out.join("\n"));
        assert.ok(
          out.some((l) => l.includes("no older messages in #lobby")),
          out.join("\n"),
        );
        assert.equal(cli.stderr.text, "");
      });
    }
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("piped lines past the server's message rate all arrive, in order, paced rather than refused or flood-closed", async () => {
  // A burst of 3, then 10 a second: 25 lines at once would be 22 refusals
  // (and a flood close after 10 strikes) without pacing.
  const servers = await startServers({
    chatLimits: {
      messageBurst: 3,
      messagesPerSecond: 10,
      floodStrikes: 10,
      floodStrikesPerSecond: 1,
    },
  });
  try {
    const { bob, cli } = await bobAndAlice(servers);
    const lines = Array.from({ length: 25 }, (_, i) => `line ${i + 1}`);
    await cli.write(PASSWORD, ...lines);
    await cli.closeStdin();
    for (const line of lines) {
      const got = await bob.next((f) => f.type === "message");
      assert.equal(got.text, line);
    }
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const out = cli.stdout.lines;
    assert.ok(!out.some((l) => l.includes("not confirmed")), out.join("\n"));
    assert.ok(!out.some((l) => l.includes("reconnect")), out.join("\n"));
    assert.ok(
      out.filter((l) => l.includes("rate_limited")).length <= 1,
      out.join("\n"),
    );
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("piped commands and direct messages past the server's rates all get their answers, paced, without a flood close", async () => {
  // Frames: a burst of 5, then 50 a second; messages and DMs: 3, then 20.
  const servers = await startServers({
    chatLimits: {
      frameBurst: 5,
      framesPerSecond: 50,
      messageBurst: 3,
      messagesPerSecond: 20,
      floodStrikes: 10,
      floodStrikesPerSecond: 1,
    },
  });
  try {
    const { bob, cli } = await bobAndAlice(servers);
    const whos = Array.from({ length: 30 }, () => "/who");
    const dms = Array.from({ length: 10 }, (_, i) => `/msg bob dm ${i + 1}`);
    await cli.write(PASSWORD, ...whos, ...dms, "after all that");
    await cli.closeStdin();
    for (let i = 1; i <= 10; i++) {
      const got = await bob.next((f) => f.type === "dm");
      assert.equal(got.text, `dm ${i}`);
    }
    const last = await bob.next((f) => f.type === "message");
    assert.equal(last.text, "after all that");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const out = cli.stdout.lines;
    assert.equal(
      out.filter((l) => l.startsWith("* in #lobby: ")).length,
      30,
      out.join("\n"),
    );
    assert.ok(!out.some((l) => l.includes("reconnect")), out.join("\n"));
    assert.ok(!out.some((l) => l.includes("not confirmed")), out.join("\n"));
    assert.ok(
      out.filter((l) => l.includes("rate_limited")).length <= 2,
      out.join("\n"),
    );
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("lines and commands go out in the order typed, past the message rate too (a /leave waits for the lines before it)", async () => {
  const servers = await startServers({ chatLimits: {} });
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bob = await Peer.connect(
      servers.chat.url,
      (await login(servers.authUrl, "bob")).token,
    );
    bob.send({ type: "join", room: "dev" });
    await bob.next((f) => f.type === "joined");
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    // 12 lines: a burst of 10 passes, the rest are refused for the rate and
    // sent again after the wait, still before the /leave typed after them.
    const lines = Array.from({ length: 12 }, (_, i) => `line ${i + 1}`);
    await cli.write("/join dev", ...lines, "/leave dev", "/who");
    await cli.stdout.next("in #lobby: ");
    for (const line of lines) {
      const got = await bob.next((f) => f.type === "message");
      assert.equal(got.text, line);
      assert.equal(got.room, "dev");
    }
    await bob.next((f) => f.type === "leave" && f.user === "alice");
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const out = cli.stdout.lines;
    assert.ok(!out.some((l) => l.includes("unknown_room")), out.join("\n"));
    assert.ok(!out.some((l) => l.includes("reconnect")), out.join("\n"));
    assert.ok(
      out.filter((l) => l.includes("rate_limited")).length <= 1,
      out.join("\n"),
    );
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("a /join the server refuses leaves the room out; joins refused for their rate are sent again, in order", async (t) => {
  // Two rooms per connection; a burst of 3 frames, then 5 a second.
  const servers = await startServers({
    chatLimits: { maxRoomsPerConnection: 2, frameBurst: 3, framesPerSecond: 5 },
  });
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bob = await Peer.connect(
      servers.chat.url,
      (await login(servers.authUrl, "bob")).token,
    );
    bob.send({ type: "leave", room: "lobby" });
    bob.send({ type: "join", room: "a" });
    bob.send({ type: "join", room: "c" });
    await bob.next((f) => f.type === "joined" && f.room === "c");
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");

    await t.step("over the room cap: the current room stays #a", async () => {
      await cli.write("/join a");
      await cli.stdout.next("now in #a");
      await cli.write("/join b");
      await cli.stdout.next("at most 2 rooms");
      await cli.write("to a");
      const got = await bob.next((f) => f.type === "message");
      assert.equal(got.room, "a");
      assert.equal(got.text, "to a");
    });

    await t.step(
      "past the frame rate: the leave and the join still happen",
      async () => {
        // Three /rooms empty the bucket: the leave and the join are refused
        // for their rate, then sent again in order (leave first: the cap).
        await cli.write("/rooms", "/rooms", "/rooms", "/leave a", "/join c");
        await cli.stdout.next("now in #c");
        await cli.write("to c");
        const got = await bob.next((f) => f.type === "message");
        assert.equal(got.room, "c");
        assert.equal(got.text, "to c");
      },
    );
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const out = cli.stdout.lines.join("\n");
    assert.ok(!out.includes("unknown_room"), out);
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("two /history typed at once show two pages, one after the other", async () => {
  const servers = await startServers();
  try {
    const { bob, cli } = await bobAndAlice(servers);
    // 54 messages: the welcome shows the newest 50 (m5 to m54).
    for (let i = 1; i <= 54; i++) await bob.say(`m${i}`);
    await cli.write(PASSWORD);
    await cli.stdout.next("<bob> m54");
    await cli.write("/history 2", "/history 2", "/history 2");
    await cli.stdout.next("no older messages in #lobby");
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const shown = cli.stdout.lines.filter((l) => /<bob> m[1-4]$/.test(l))
      .map((l) => l.split(" ").pop());
    assert.deepEqual(shown, ["m3", "m4", "m1", "m2"]);
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("/join and /history typed at once: the page starts before what the join showed, nothing twice", async () => {
  const servers = await startServers();
  try {
    const { bob, cli } = await bobAndAlice(servers);
    bob.send({ type: "join", room: "aaa" });
    await bob.next((f) => f.type === "joined");
    for (let i = 1; i <= 4; i++) await bob.say(`a${i}`, "aaa");
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    await cli.write("/join aaa", "/history");
    await cli.stdout.next(/no older messages in #aaa|earlier in #aaa/);
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    for (let i = 1; i <= 4; i++) {
      assert.equal(
        cli.stdout.count((l) => l.endsWith(`<bob> a${i}`)),
        1,
        cli.stdout.text,
      );
    }
    assert.ok(
      cli.stdout.lines.some((l) => l.endsWith("no older messages in #aaa")),
    );
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("an echo of a line typed before a /leave shows as in the current room (no #room): the room it was said in", async () => {
  const servers = await startServers();
  try {
    const { bob, cli } = await bobAndAlice(servers);
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    await cli.write(
      "/join ccc",
      "hello ccc",
      "/leave ccc",
      "back in the lobby",
    );
    await cli.stdout.next("you left #ccc");
    await cli.stdout.next(/<alice> back in the lobby$/);
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const echo = cli.stdout.lines.find((l) => l.includes("<alice> hello ccc"));
    assert.match(
      echo ?? "",
      /^\[\d\d:\d\d\] <alice> hello ccc$/,
      cli.stdout.text,
    );
    // After the /leave, the lobby is current again: its lines have no tag.
    assert.ok(
      cli.stdout.lines.some((l) =>
        /^\[\d\d:\d\d\] <alice> back in the lobby$/.test(l)
      ),
      cli.stdout.text,
    );
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("wrong password and taken username are one line on stderr and exit 1", async (t) => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    await t.step("login with a wrong password", async () => {
      const cli = loginProcess(servers.authUrl, "alice");
      await cli.write("wrong-password");
      assert.equal(await cli.exit(), 1);
      assert.deepEqual(cli.stderr.lines, [WRONG_PASSWORD_LINE]);
    });
    await t.step("register a taken name", async () => {
      const cli = new CliProcess([
        "register",
        "--auth-url",
        servers.authUrl,
        "--user",
        "ALICE",
        "--password-stdin",
      ]);
      await cli.write(PASSWORD);
      assert.equal(await cli.exit(), 1);
      assert.deepEqual(cli.stderr.lines, [NAME_TAKEN_LINE]);
      assert.ok(!looksLikeStackTrace(cli.stderr.text));
    });
  } finally {
    await servers.close();
  }
});

Deno.test("chatroom register refuses a name that breaks the rules at once, in the server's words, without asking for the password", async (t) => {
  const servers = await startServers();
  try {
    // The line the auth server's own invalid_username gives.
    const refused = await registerUser(servers.authUrl, {
      username: "ab",
      password: PASSWORD,
    }).then(() => undefined, (err: Error) => err.message);
    const expected = `chatroom: ${refused}`;
    assert.match(
      expected,
      /^chatroom: cannot register "ab": .*\(invalid_username\)$/,
    );
    await t.step("--user ab: stdin is never read", async () => {
      const cli = new CliProcess([
        "register",
        "--auth-url",
        servers.authUrl,
        "--user",
        "ab",
        "--password-stdin",
      ]);
      // No password written, input left open: it must not wait for one.
      assert.equal(await cli.exit(), 1);
      assert.deepEqual(cli.stderr.lines, [expected]);
    });
    await t.step("the name typed at the prompt", async () => {
      const cli = new CliProcess(["register", "--auth-url", servers.authUrl]);
      await cli.write("ab");
      assert.equal(await cli.exit(), 1);
      assert.deepEqual(cli.stderr.lines, [expected]);
      assert.ok(!cli.stdout.text.includes("Password:"), cli.stdout.text);
    });
  } finally {
    await servers.close();
  }
});

Deno.test("through the menu, the same failures are the same lines, the menu comes back, and end of input exits 0", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const cli = new CliProcess(["--auth-url", servers.authUrl]);
    await cli.write("2", "ALICE", PASSWORD, "1", "alice", "wrong-password");
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0);
    assert.deepEqual(cli.stderr.lines, [NAME_TAKEN_LINE, WRONG_PASSWORD_LINE]);
    assert.equal(cli.stdout.count((l) => l === "1) login"), 3, cli.stdout.text);
  } finally {
    await servers.close();
  }
});

Deno.test("a typed line reaches another client, and its messages and DMs show in the chat view", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const bob = await Peer.connect(
      servers.chat.url,
      await bobToken(servers.authUrl),
    );
    // NO_COLOR unset: colours stay off anyway, stdout being a pipe.
    const cli = await chatAs(servers.authUrl, "alice", { NO_COLOR: "" });

    await cli.write("hi bob");
    const got = await bob.next((f) => f.type === "message");
    assert.equal(got.from, "alice");
    assert.equal(got.text, "hi bob");

    await bob.say("hi alice");
    assert.match(
      await cli.stdout.next("<bob>"),
      /^\[\d\d:\d\d\] <bob> hi alice$/,
    );

    bob.send({ type: "dm", to: "alice", text: "psst" });
    assert.match(
      await cli.stdout.next("psst"),
      /^\[\d\d:\d\d\] \*bob\* -> you: psst$/,
    );

    await cli.write("/msg bob back at you");
    const dm = await bob.next((f) => f.type === "dm" && f.from === "alice");
    assert.equal(dm.to, "bob");
    assert.equal(dm.text, "back at you");

    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
    assert.equal(cli.stdout.count("hi alice"), 1);
    assert.ok(!cli.stdout.text.includes("\x1b"), "no escape codes in a pipe");
  } finally {
    await servers.close();
  }
});

Deno.test("/join switches room, the next line goes there, /who lists it, presence shows", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const bob = await Peer.connect(
      servers.chat.url,
      await bobToken(servers.authUrl),
    );
    bob.send({ type: "join", room: "dev" });
    await bob.next((f) => f.type === "joined");
    const cli = await chatAs(servers.authUrl, "alice");

    await cli.write("/join dev");
    await cli.stdout.next("now in #dev");
    await bob.next((f) => f.type === "join" && f.user === "alice");
    await cli.write("in dev");
    const got = await bob.next((f) => f.type === "message");
    assert.equal(got.room, "dev");
    assert.equal(got.text, "in dev");

    await cli.write("/who");
    const who = await cli.stdout.next("in #dev:");
    assert.match(who, /alice/);
    assert.match(who, /bob/);

    // A message in a room that is not the current one carries its #room.
    await bob.say("over here", "lobby");
    assert.match(
      await cli.stdout.next("over here"),
      /^\[\d\d:\d\d\] #lobby <bob> over here$/,
    );

    bob.send({ type: "leave", room: "dev" });
    await cli.stdout.next("* bob left #dev");

    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("an unknown command or a wrong argument gets a one-line hint and sends nothing", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const bob = await Peer.connect(
      servers.chat.url,
      await bobToken(servers.authUrl),
    );
    const cli = await chatAs(servers.authUrl, "alice");
    await cli.write("/dance");
    assert.match(await cli.stdout.next("unknown command"), /^! .*\/dance/);
    await cli.write("/join Not A Room!");
    assert.match(await cli.stdout.next("usage: /join"), /^! /);
    await cli.write("/msg bob");
    assert.match(await cli.stdout.next("usage: /msg"), /^! /);
    await cli.write("/history lots");
    assert.match(await cli.stdout.next("usage: /history"), /^! /);
    // The Kelvin sign lower-cases to "k", but is not a room name's letter.
    for (const command of ["/join", "/leave", "/who"]) {
      await cli.write(`${command} \u212a`);
      assert.match(await cli.stdout.next(`usage: ${command}`), /^! /);
    }
    await cli.write("/quit now");
    assert.match(await cli.stdout.next("usage: /quit"), /^! /);
    await cli.write("//not a command");
    const got = await bob.next((f) => f.type === "message");
    // The first message bob sees is the escaped one: nothing before it was sent.
    assert.equal(got.text, "/not a command");
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("/rooms, /leave, /history and /help answer in the chat view", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const bob = await Peer.connect(
      servers.chat.url,
      await bobToken(servers.authUrl),
    );
    // The welcome carries the newest 50: old-6 to old-55.
    for (let i = 1; i <= 55; i++) await bob.say(`old-${i}`);
    const cli = await chatAs(servers.authUrl, "alice");
    await cli.stdout.next("old-55");

    await cli.write("/help");
    for (
      const command of [
        "/join",
        "/leave",
        "/rooms",
        "/who",
        "/msg",
        "/history",
        "/quit",
      ]
    ) {
      await cli.stdout.next(command);
    }

    await cli.write("/join dev");
    await cli.stdout.next("now in #dev");
    await cli.write("/rooms");
    const rooms = await cli.stdout.next("rooms:");
    assert.match(rooms, /#lobby \(2 users\)/);
    assert.match(rooms, /#dev \(1 user\)/);

    await cli.write("/leave dev");
    await cli.stdout.next("you left #dev");
    // Back in the lobby: plain lines go there again.
    await cli.write("back");
    const got = await bob.next((f) =>
      f.type === "message" && f.from === "alice"
    );
    assert.equal(got.room, "lobby");
    await cli.stdout.next("<alice> back");

    // History goes back from the oldest message shown, page by page.
    await cli.write("/history 3");
    await cli.stdout.next("earlier in #lobby:");
    assert.match(await cli.stdout.next("<bob>"), /<bob> old-3$/);
    assert.match(await cli.stdout.next("<bob>"), /<bob> old-4$/);
    assert.match(await cli.stdout.next("<bob>"), /<bob> old-5$/);
    await cli.write("/history");
    await cli.stdout.next("earlier in #lobby:");
    assert.match(await cli.stdout.next("<bob>"), /<bob> old-1$/);
    assert.match(await cli.stdout.next("<bob>"), /<bob> old-2$/);
    await cli.write("/history");
    await cli.stdout.next("no older messages in #lobby");

    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
    assert.equal(cli.stdout.count((l) => l.endsWith("old-30")), 1);
  } finally {
    await servers.close();
  }
});

Deno.test("the client sends the token in the Authorization header, never in the URL, and reads coalesced frames", async () => {
  const seen: { url: string; authorization: string | null }[] = [];
  const fake = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen() {} },
    (req) => {
      seen.push({
        url: req.url,
        authorization: req.headers.get("authorization"),
      });
      const { socket, response } = Deno.upgradeWebSocket(req);
      socket.onopen = () => {
        const ts = new Date().toISOString();
        // Two objects in one text frame, as the server may coalesce them.
        socket.send([
          JSON.stringify({
            type: "welcome",
            username: "alice",
            room: "lobby",
            rooms: ["lobby"],
            users: ["alice"],
            history: [],
          }),
          JSON.stringify({
            type: "message",
            id: "1",
            room: "lobby",
            from: "bob",
            text: "first",
            ts,
          }),
        ].join("\n"));
      };
      return response;
    },
  );
  const servers = await startServers({
    chatUrl: `ws://127.0.0.1:${fake.addr.port}/ws`,
  });
  try {
    await register(servers.authUrl, "alice");
    const cli = await chatAs(servers.authUrl, "alice");
    await cli.stdout.next("<bob> first");
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    assert.equal(seen.length, 1);
    const [request] = seen;
    assert.equal(new URL(request!.url).search, "", "no token in the URL");
    assert.match(request!.authorization ?? "", /^Bearer \S{20,}$/);
  } finally {
    await servers.close();
    await fake.shutdown();
  }
});

Deno.test("with the chat server down, login says so in one line and exits 1", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    await servers.chat.shutdown();
    await loginCannotReach(servers.authUrl, /.+/);
  } finally {
    await servers.close();
  }
});

Deno.test("a first connection refused by the connect rate ends login in one line that says HTTP 429", async () => {
  const servers = await startServers({
    chatLimits: { connectBurst: 1, connectsPerSecond: 0.01 },
  });
  try {
    await register(servers.authUrl, "alice");
    // Another client from this address takes the only attempt there is.
    const { token } = await login(servers.authUrl, "alice");
    const first = await rawUpgrade(servers.chat.port, "/ws", {
      authorization: `Bearer ${token}`,
    });
    assert.equal(first.status, 101);
    await loginCannotReach(servers.authUrl, /it answered HTTP 429/);
  } finally {
    await servers.close();
  }
});

/**
 * Logs alice in and expects the chat connection to fail: one line on
 * stderr giving `reason`, no stack trace, exit 1.
 */
async function loginCannotReach(authUrl: string, reason: RegExp) {
  const cli = loginProcess(authUrl, "alice");
  await cli.write(PASSWORD);
  assert.equal(await cli.exit(), 1);
  assert.equal(cli.stderr.lines.length, 1, cli.stderr.text);
  assert.match(
    cli.stderr.lines[0]!,
    new RegExp(
      `^chatroom: cannot reach the chat server at ws://127\\.0\\.0\\.1:\\d+/ws \\((${reason.source})\\)$`,
    ),
  );
  assert.ok(!looksLikeStackTrace(cli.stderr.text));
}

/** Starts `chatroom login` as `username` and waits until it is in the lobby. */
async function chatAs(
  authUrl: string,
  username: string,
  env: Record<string, string> = {},
): Promise<CliProcess> {
  const cli = loginProcess(authUrl, username, env);
  await cli.write(PASSWORD);
  await cli.stdout.next(`connected as ${username}`);
  return cli;
}

async function bobToken(authUrl: string): Promise<string> {
  await register(authUrl, "bob");
  return (await login(authUrl, "bob")).token;
}

Deno.test("a message the server could not store (its disk full) stays pending and goes again until it is stored, once; input that ends meanwhile does not wait for the disk", async (t) => {
  await t.step("stored once the file can be written", async () => {
    const servers = await startServers();
    try {
      const { bob, cli } = await bobAndAlice(servers);
      // A directory in the room's file's place fails every write, as a full
      // disk does (even for root).
      const file = `${servers.dataDir}/history/lobby.jsonl`;
      await Deno.mkdir(`${file}/blocked`, { recursive: true });
      await cli.write(PASSWORD, "stored at last");
      await cli.stdout.next(/storage_unavailable/);
      await Deno.remove(file, { recursive: true });
      const got = await bob.next((f) => f.type === "message");
      assert.equal(got.text, "stored at last");
      await cli.closeStdin();
      assert.equal(await cli.exit(), 0, cli.stderr.text);
      assert.ok(
        !cli.stderr.lines.some((l) => l.includes("not confirmed")),
        cli.stderr.text,
      );
      await bob.close();
    } finally {
      await servers.close();
    }
  });
  await t.step(
    "end of input while it is refused: unconfirmed, exit 1",
    async () => {
      const servers = await startServers();
      try {
        const { bob, cli } = await bobAndAlice(servers);
        const file = `${servers.dataDir}/history/lobby.jsonl`;
        await Deno.mkdir(`${file}/blocked`, { recursive: true });
        await cli.write(PASSWORD, "never stored");
        await cli.closeStdin();
        assert.equal(await cli.exit(), 1);
        assert.match(cli.stderr.text, /1 message\(s\) not confirmed/);
        await bob.close();
      } finally {
        await servers.close();
      }
    },
  );
});

Deno.test("messages of other days than today are shown under a line with their day, so that [HH:MM] is not taken for today's", async () => {
  const servers = await startServers();
  const historyDir = await Deno.makeTempDir({ prefix: "chatroom_days_" });
  try {
    const day = 86_400_000;
    const stamps = [3 * day, day, 0].map((ago) =>
      new Date(Date.now() - ago).toISOString()
    );
    await Deno.mkdir(`${historyDir}/history`);
    await Deno.writeTextFile(
      `${historyDir}/history/lobby.jsonl`,
      ["one", "two", "three"].map((text, i) =>
        JSON.stringify({
          type: "message",
          id: String(i + 1),
          room: "lobby",
          from: "bob",
          text,
          ts: stamps[i],
        }) + "\n"
      ).join(""),
    );
    await servers.restartChat(historyDir);
    await register(servers.authUrl, "alice");
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next(/<bob> three$/);
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const shown = cli.stdout.lines.filter((l) =>
      /^\* \w{3} \d{1,2} \w{3} \d{4}$/.test(l) || /<bob>/.test(l)
    );
    const days = stamps.map((ts) => `* ${formatDay(ts)}`);
    assert.deepEqual(shown.map((l) => l.replace(/^\[\d\d:\d\d\] /, "")), [
      days[0],
      "<bob> one",
      days[1],
      "<bob> two",
      days[2],
      "<bob> three",
    ]);
  } finally {
    await servers.close();
    await Deno.remove(historyDir, { recursive: true });
  }
});
