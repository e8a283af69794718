import assert from "node:assert/strict";
import { MAX_PAGE_BYTES } from "../chat/protocol.ts";
import {
  bobAndAlice,
  CliProcess,
  login,
  loginProcess,
  looksLikeStackTrace,
  PASSWORD,
  Peer,
  register,
  type Servers,
  startMainProcess,
  startServers,
} from "./_cli_helpers.ts";

Deno.test("after the chat server restarts, the client reconnects and shows each message sent while it was away exactly once", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bobLogin = await login(servers.authUrl, "bob");
    let bob = await Peer.connect(servers.chat.url, bobLogin.token);
    bob.send({ type: "join", room: "dev" });
    await bob.next((f) => f.type === "joined");
    await bob.say("seen-before lobby", "lobby");
    await bob.say("seen-before dev", "dev");

    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("seen-before lobby");
    await cli.write("/join dev");
    await cli.stdout.next("seen-before dev");

    // The server goes away; the client notices and retries.
    const port = servers.chat.port;
    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    // Backoff: 0.5 s with ±20 % jitter, then doubling.
    const lost = await cli.stdout.next("connection lost");
    assert.match(lost, /^\* connection lost, reconnecting in \d+\.\ds\.\.\.$/);
    assert.ok(between(seconds(lost), 0.4, 0.6), lost);
    // A line typed while away is kept, shown as pending, sent on reconnect.
    await cli.write("typed while away");
    await cli.stdout.next(/typed while away \(pending\)$/);
    // Its first retry fails too; the next comes at least 0.8 s later.
    const retry = await cli.stdout.next("still no connection");
    assert.ok(between(seconds(retry), 0.8, 1.2), retry);

    const chat = await servers.restartChat();
    assert.equal(chat.port, port);
    bob = await Peer.connect(chat.url, bobLogin.token);
    bob.send({ type: "join", room: "dev" });
    await bob.next((f) => f.type === "joined");
    for (let i = 1; i <= 3; i++) {
      await bob.say(`away-${i} lobby`, "lobby");
      await bob.say(`away-${i} dev`, "dev");
    }

    await cli.stdout.next("reconnected");
    const resent = await bob.next((f) =>
      f.type === "message" && f.from === "alice"
    );
    assert.equal(resent.text, "typed while away");
    assert.equal(resent.room, "dev");
    // Live again, in the room it rejoined.
    await bob.say("after dev", "dev");
    await cli.stdout.next("after dev");
    await bob.say("after lobby", "lobby");
    await cli.stdout.next("after lobby");

    const out = cli.stdout;
    for (
      const text of [
        "seen-before lobby",
        "seen-before dev",
        "away-1 lobby",
        "away-2 lobby",
        "away-3 lobby",
        "away-1 dev",
        "away-2 dev",
        "away-3 dev",
        "after dev",
        "after lobby",
      ]
    ) {
      assert.equal(
        out.count((l) => l.endsWith(text)),
        1,
        `${text}:\n${out.text}`,
      );
    }
    // The echo of the resent line is shown once, as the user's own message.
    assert.equal(out.count((l) => l.endsWith("<alice> typed while away")), 1);
    // In order: away messages of a room come before the live ones.
    const lines = out.lines;
    assert.ok(
      lines.findIndex((l) => l.endsWith("away-3 dev")) <
        lines.findIndex((l) => l.endsWith("after dev")),
    );
    // The room tag marks the lobby, which is not the current room.
    assert.ok(
      lines.some((l) => / #lobby <bob> away-2 lobby$/.test(l)),
      out.text,
    );

    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("a chat server back on other data hands out the same ids again: the client says so and shows the new messages, not skipping them as seen", async () => {
  const servers = await startServers();
  const otherData = await Deno.makeTempDir({ prefix: "chatroom_cli_test_" });
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bobLogin = await login(servers.authUrl, "bob");
    let bob = await Peer.connect(servers.chat.url, bobLogin.token);
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    for (let i = 1; i <= 4; i++) await bob.say(`old-${i}`, "lobby");
    await cli.stdout.next("old-4");

    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    await cli.write("typed while away");
    await cli.stdout.next(/typed while away \(pending\)$/);
    const chat = await servers.restartChat(otherData);
    bob = await Peer.connect(chat.url, bobLogin.token);
    // Ids 1 and 2 again, for other messages (before or after the client is back).
    const first = await bob.say("new-1", "lobby");
    assert.equal(first.id, "1");
    await bob.say("new-2", "lobby");
    await cli.stdout.next("reconnected");
    await cli.stdout.next("<alice> typed while away");
    await bob.say("new-live", "lobby");
    await cli.stdout.next("new-live");

    const out = cli.stdout;
    assert.equal(out.count((l) => l.includes("has started over")), 1, out.text);
    for (const text of ["new-1", "new-2", "new-live", "old-1", "old-4"]) {
      assert.equal(out.count((l) => l.endsWith(`> ${text}`)), 1, out.text);
    }
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
  } finally {
    await servers.close();
    await Deno.remove(otherData, { recursive: true });
  }
});

Deno.test("an expired session sends the client back to login instead of retrying forever", async (t) => {
  let offsetMs = 0;
  const servers = await startServers({ authNow: () => Date.now() + offsetMs });
  try {
    await register(servers.authUrl, "alice");

    await t.step(
      "chatroom login asks for the password again; a new login works",
      async () => {
        offsetMs = 0;
        const cli = loginProcess(servers.authUrl, "alice");
        await cli.write(PASSWORD);
        await cli.stdout.next("connected as alice");
        offsetMs = 2 * 86_400_000;
        await servers.restartChat();
        await cli.stderr.next("session expired, please log in again");
        offsetMs = 0;
        await cli.write(PASSWORD);
        await cli.stdout.next("logged in as alice");
        await cli.stdout.next("connected as alice");
        await cli.write("/quit");
        assert.equal(await cli.exit(), 0, cli.stderr.text);
        assert.deepEqual(cli.stderr.lines, [
          "chatroom: session expired, please log in again",
        ]);
      },
    );

    await t.step(
      "the new login takes up the rooms, and sends a message typed before the expiry once",
      async () => {
        offsetMs = 0;
        await register(servers.authUrl, "bob");
        const bob = await Peer.connect(
          servers.chat.url,
          (await login(servers.authUrl, "bob")).token,
        );
        const cli = loginProcess(servers.authUrl, "alice");
        await cli.write(PASSWORD);
        await cli.stdout.next("connected as alice");
        await cli.write("/join dev");
        await cli.stdout.next("now in #dev");
        const port = servers.chat.port;
        await Promise.all([servers.chat.shutdown(), bob.closed()]);
        await cli.stdout.next("connection lost");
        await cli.write("typed before the expiry");
        await cli.stdout.next(/typed before the expiry \(pending\)$/);
        offsetMs = 2 * 86_400_000;
        assert.equal((await servers.restartChat()).port, port);
        await cli.stderr.next("session expired, please log in again");
        // Its text first: the user may not log in again.
        assert.equal(
          await cli.stderr.next("not sent yet"),
          "chatroom: not sent yet: #dev typed before the expiry",
        );
        await cli.stderr.next(
          "1 message(s) not sent yet: they go out when you log in again as alice",
        );
        offsetMs = 0;
        const bob2 = await Peer.connect(
          servers.chat.url,
          (await login(servers.authUrl, "bob")).token,
        );
        bob2.send({ type: "join", room: "dev" });
        await bob2.next((f) => f.type === "joined");
        await bob2.say("while alice was away", "dev");
        await cli.write(PASSWORD);
        await cli.stdout.next("connected as alice");
        await cli.stdout.next("<bob> while alice was away");
        const got = await bob2.next((f) =>
          f.type === "message" && f.from === "alice"
        );
        assert.equal(got.text, "typed before the expiry");
        assert.equal(got.room, "dev");
        await cli.write("/quit");
        assert.equal(await cli.exit(), 0, cli.stderr.text);
        assert.equal(
          bob2.frames.filter((f) => f.type === "message" && f.from === "alice")
            .length,
          1,
        );
        await bob2.close();
      },
    );

    await t.step("chatroom login whose input ends there exits 1", async () => {
      offsetMs = 0;
      const cli = loginProcess(servers.authUrl, "alice");
      await cli.write(PASSWORD);
      await cli.stdout.next("connected as alice");
      offsetMs = 6 * 86_400_000;
      await servers.restartChat();
      await cli.stderr.next("session expired, please log in again");
      await cli.closeStdin();
      assert.equal(await cli.exit(), 1);
      assert.equal(cli.stderr.lines.length, 2, cli.stderr.text);
      assert.ok(!looksLikeStackTrace(cli.stderr.text), cli.stderr.text);
    });

    await t.step("the menu comes back, and a new login works", async () => {
      offsetMs = 0;
      const cli = new CliProcess(["--auth-url", servers.authUrl]);
      await cli.write("1", "alice", PASSWORD);
      await cli.stdout.next("connected as alice");
      offsetMs = 4 * 86_400_000;
      await servers.restartChat();
      await cli.stderr.next("session expired, please log in again");
      await cli.stdout.next("1) login");
      await cli.write("1", "alice", PASSWORD);
      await cli.stdout.next("connected as alice");
      await cli.write("/quit");
      assert.equal(await cli.exit(), 0, cli.stderr.text);
    });
  } finally {
    await servers.close();
  }
});

Deno.test("when the server no longer keeps all that was missed, the client says so after reconnecting", async () => {
  const servers = await startServers({ historyKeep: 3 });
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bobLogin = await login(servers.authUrl, "bob");
    let bob = await Peer.connect(servers.chat.url, bobLogin.token);
    await bob.say("before");
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("<bob> before");

    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    await cli.stdout.next("still no connection");
    const chat = await servers.restartChat();
    bob = await Peer.connect(chat.url, bobLogin.token);
    for (let i = 1; i <= 6; i++) await bob.say(`away-${i}`);

    await cli.stdout.next("reconnected");
    await cli.stdout.next("may be missing");
    for (const i of [4, 5, 6]) {
      assert.match(await cli.stdout.next("<bob>"), new RegExp(`away-${i}$`));
    }
    await bob.say("live");
    await cli.stdout.next("<bob> live");
    assert.equal(cli.stdout.count((l) => l.endsWith("<bob> before")), 1);
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("after a reconnect, #room still marks the rooms that are not the current one (the lobby rejoined last stays current)", async () => {
  const servers = await startServers();
  try {
    const { bob: before, cli } = await bobAndAlice(servers);
    const bobToken = (await login(servers.authUrl, "bob")).token;
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    await cli.write("/join dev");
    await cli.stdout.next("now in #dev");
    await cli.write("/join lobby");
    await cli.stdout.next("now in #lobby");

    await Promise.all([servers.restartChat(), before.closed()]);
    await cli.stdout.next("reconnected");
    const bob = await Peer.connect(servers.chat.url, bobToken);
    bob.send({ type: "join", room: "dev" });
    await bob.next((f) => f.type === "joined");
    await bob.say("in the lobby", "lobby");
    await bob.say("in dev", "dev");
    // In either order: right after a reconnect, a room's live messages wait
    // for that room's catch-up (`history after`), and the rooms catch up
    // one after the other (under load, bob may speak in between).
    const shown = [
      await cli.stdout.next(/<bob> in (the lobby|dev)$/),
      await cli.stdout.next(/<bob> in (the lobby|dev)$/),
    ];
    assert.match(
      shown.find((line) => line.endsWith("in the lobby")) ?? "",
      /^\[\d\d:\d\d\] <bob> in the lobby$/,
    );
    assert.match(
      shown.find((line) => line.endsWith("in dev")) ?? "",
      /^\[\d\d:\d\d\] #dev <bob> in dev$/,
    );
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob.close();
  } finally {
    await servers.close();
  }
});

Deno.test("after a crash (kill -9) of the servers, the client says once that messages may be lost, not again at every reconnect", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "chatroom_crash_" });
  let servers = await startMainProcess(dataDir);
  let cli: CliProcess | undefined;
  let bob: Peer | undefined;
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bobToken = (await login(servers.authUrl, "bob")).token;
    bob = await Peer.connect(servers.chatWs, bobToken);
    await bob.say("before");
    cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("<bob> before");

    const ports = servers.ports;
    await servers.stop("SIGKILL");
    await bob.closed();
    await cli.stdout.next("connection lost");
    servers = await startMainProcess(dataDir, ports);
    await cli.stdout.next("reconnected");
    await cli.stdout.next("may be missing");

    // A clean restart: nothing new was said in the lobby since.
    await servers.stop("SIGTERM");
    await cli.stdout.next("connection lost");
    servers = await startMainProcess(dataDir, ports);
    await cli.stdout.next("reconnected");
    bob = await Peer.connect(servers.chatWs, bobToken);
    await bob.say("after");
    await cli.stdout.next("<bob> after");
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    assert.equal(
      cli.stdout.count((l) => l.includes("may be missing")),
      1,
      cli.stdout.text,
    );
    assert.equal(cli.stdout.count((l) => l.endsWith("<bob> before")), 1);
  } finally {
    await bob?.close();
    await cli?.kill();
    await servers.stop("SIGTERM");
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a drop in the middle of a paced burst loses nothing: what was typed before a /leave still lands in its room, in order", async () => {
  // A burst of 2 messages, then 10 a second: the burst is paced.
  const servers = await startServers({
    chatLimits: { messageBurst: 2, messagesPerSecond: 10 },
  });
  try {
    const { bob, cli } = await bobAndAlice(servers);
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    const lines = Array.from({ length: 12 }, (_, i) => `A${i + 1}`);
    await cli.write(...lines, "/leave lobby", "/join dev", "in dev");
    await bob.next((f) => f.type === "message" && f.text === "A3");
    // The server goes away with most of the burst, the leave and the join
    // still queued; it comes back at once.
    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    await servers.restartChat();
    await cli.stdout.next("reconnected");
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const out = cli.stdout.lines.join("\n");
    assert.ok(!out.includes("not confirmed"), out);
    assert.ok(!out.includes("unknown_room"), out);

    const reader = await Peer.connect(
      servers.chat.url,
      (await login(servers.authUrl, "bob")).token,
    );
    assert.deepEqual(await texts(reader, "lobby", "alice"), lines);
    assert.deepEqual(await texts(reader, "dev", "alice"), ["in dev"]);
    await reader.close();
  } finally {
    await servers.close();
  }
});

Deno.test("a room left while disconnected is said once and not taken up again at the reconnect", async () => {
  const servers = await startServers();
  try {
    const { bob, cli } = await bobAndAlice(servers);
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    await cli.write("/join alpha");
    await cli.stdout.next("now in #alpha");
    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    await cli.write("/leave alpha", "/join beta", "hi beta");
    await cli.stdout.next("left #alpha");
    await servers.restartChat();
    // In alpha and beta before alice is back (her first retry waits about
    // half a second): a join of hers in alpha would show here.
    const watcher = await Peer.connect(
      servers.chat.url,
      (await login(servers.authUrl, "bob")).token,
    );
    watcher.send({ type: "join", room: "alpha" });
    watcher.send({ type: "join", room: "beta" });
    await watcher.next((f) => f.type === "joined" && f.room === "beta");
    await cli.stdout.next("reconnected");
    const hi = await watcher.next((f) =>
      f.type === "message" && f.text === "hi beta"
    );
    assert.equal(hi.room, "beta");
    assert.ok(
      !watcher.frames.some((f) =>
        f.type === "join" && f.user === "alice" && f.room === "alpha"
      ),
      JSON.stringify(watcher.frames),
    );
    await cli.stdout.next(/<alice> hi beta/);
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    assert.equal(
      cli.stdout.count((l) => l.includes("left #alpha")),
      1,
      cli.stdout.text,
    );
    await watcher.close();
  } finally {
    await servers.close();
  }
});

Deno.test("SIGTERM, SIGHUP and SIGINT end the chat as Ctrl+C does: exit 0, or 1 naming the messages never confirmed", async (t) => {
  const servers = await startServers();
  try {
    const { bob, cli: first } = await bobAndAlice(servers);
    for (
      const [signal, cli] of [["SIGTERM", first], ["SIGHUP", null]] as const
    ) {
      await t.step(`${signal} with nothing pending: exit 0`, async () => {
        const client = cli ?? loginProcess(servers.authUrl, "alice");
        await client.write(PASSWORD);
        await client.stdout.next("connected as alice");
        await client.write(`said before ${signal}`);
        await client.stdout.next(`<alice> said before ${signal}`);
        client.signal(signal);
        assert.equal(await client.exit(), 0, client.stderr.text);
        assert.equal(client.stderr.text, "");
        // The server saw the connection end (alice's only one).
        await bob.next((f) => f.type === "leave" && f.user === "alice");
      });
    }
    await t.step(
      "SIGTERM while /quit waits for a pending message: exit 1, and says so",
      async () => {
        const cli = loginProcess(servers.authUrl, "alice");
        await cli.write(PASSWORD);
        const port = servers.chat.port;
        await cutOff(servers, cli);
        await cli.write("pending at the end");
        await cli.stdout.next(/pending at the end \(pending\)$/);
        // End of input: the client waits (no line being read) for a reconnect.
        await cli.closeStdin();
        cli.signal("SIGTERM");
        assert.equal(await cli.exit(), 1);
        assert.deepEqual(cli.stderr.lines, [
          "chatroom: not confirmed: #lobby pending at the end",
          "chatroom: 1 message(s) not confirmed by the server",
        ]);
        assert.equal((await servers.restartChat()).port, port);
      },
    );
    await t.step(
      "in the menu's chat, SIGTERM with a message pending ends the program (exit 1), not back to the menu",
      async () => {
        const cli = new CliProcess(["--auth-url", servers.authUrl]);
        await cli.write("1", "alice", PASSWORD);
        await cutOff(servers, cli);
        await cli.write("pending in the menu's chat");
        await cli.stdout.next(/pending in the menu's chat \(pending\)$/);
        cli.signal("SIGTERM");
        assert.equal(await cli.exit(), 1);
        assert.deepEqual(cli.stderr.lines, [
          "chatroom: not confirmed: #lobby pending in the menu's chat",
          "chatroom: 1 message(s) not confirmed by the server",
        ]);
        assert.equal(cli.stdout.count((l) => l === "1) login"), 1);
        await servers.restartChat();
      },
    );
    await t.step(
      "in the menu's chat, /quit with a message pending ends the program (exit 1), not back to the menu",
      async () => {
        const cli = new CliProcess(["--auth-url", servers.authUrl]);
        await cli.write("1", "alice", PASSWORD);
        await cutOff(servers, cli);
        await cli.write("pending at /quit");
        await cli.stdout.next(/pending at \/quit \(pending\)$/);
        await cli.write("/quit");
        assert.equal(await cli.exit(), 1);
        assert.deepEqual(cli.stderr.lines, [
          "chatroom: not confirmed: #lobby pending at /quit",
          "chatroom: 1 message(s) not confirmed by the server",
        ]);
        assert.equal(cli.stdout.count((l) => l === "1) login"), 1);
        await servers.restartChat();
      },
    );
    await t.step(
      "SIGINT with a message pending: exit 1, and says so",
      async () => {
        const cli = loginProcess(servers.authUrl, "alice");
        await cli.write(PASSWORD);
        await cli.stdout.next("connected as alice");
        await Promise.all([servers.chat.shutdown(), bob.closed()]);
        await cli.stdout.next("connection lost");
        await cli.write("never sent");
        await cli.stdout.next(/never sent \(pending\)$/);
        cli.signal("SIGINT");
        assert.equal(await cli.exit(), 1);
        assert.deepEqual(cli.stderr.lines, [
          "chatroom: not confirmed: #lobby never sent",
          "chatroom: 1 message(s) not confirmed by the server",
        ]);
      },
    );
  } finally {
    await servers.close();
  }
});

Deno.test("end of input while reconnecting waits for the reconnect and sends what was typed", async () => {
  const servers = await startServers();
  try {
    const { bob, cli } = await bobAndAlice(servers);
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    await cli.write("typed offline 1", "typed offline 2");
    await cli.closeStdin();
    await servers.restartChat();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    assert.ok(!cli.stdout.text.includes("not confirmed"), cli.stdout.text);
    const reader = await Peer.connect(
      servers.chat.url,
      (await login(servers.authUrl, "bob")).token,
    );
    assert.deepEqual(await texts(reader, "lobby", "alice"), [
      "typed offline 1",
      "typed offline 2",
    ]);
    await reader.close();
  } finally {
    await servers.close();
  }
});

Deno.test("end of input with the chat server gone for good: one line on stderr and exit 1, not 0", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cutOff(servers, cli);
    await cli.write("never delivered 1", "never delivered 2");
    await cli.closeStdin();
    assert.equal(await cli.exit(), 1);
    // Their text first, in the order typed, so it can be copied.
    assert.deepEqual(cli.stderr.lines, [
      "chatroom: not confirmed: #lobby never delivered 1",
      "chatroom: not confirmed: #lobby never delivered 2",
      "chatroom: 2 message(s) not confirmed by the server",
    ]);
  } finally {
    await servers.close();
  }
});

Deno.test("leaving with messages and direct messages unconfirmed lists each one's text, in the order typed, before the summary", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cutOff(servers, cli);
    await cli.write(
      "first in the lobby",
      "/join dev",
      "second in dev",
      "/msg bob psst offline",
      "third in dev",
    );
    await cli.stdout.next(/third in dev \(pending\)$/);
    await cli.write("/quit");
    assert.equal(await cli.exit(), 1);
    assert.deepEqual(cli.stderr.lines, [
      "chatroom: not confirmed: #lobby first in the lobby",
      "chatroom: not confirmed: #dev second in dev",
      "chatroom: not confirmed: /msg bob psst offline",
      "chatroom: not confirmed: #dev third in dev",
      "chatroom: 3 message(s) and 1 direct message(s) not confirmed by the server",
    ]);
  } finally {
    await servers.close();
  }
});

Deno.test("the answers to earlier commands do not move the current room; a reconnect leaves the lobby before rejoining (the room cap)", async () => {
  const servers = await startServers({
    chatLimits: { maxRoomsPerConnection: 2, messageBurst: 2 },
  });
  try {
    const { bob, cli } = await bobAndAlice(servers);
    bob.send({ type: "leave", room: "lobby" });
    bob.send({ type: "join", room: "a" });
    bob.send({ type: "join", room: "b" });
    await bob.next((f) => f.type === "joined" && f.room === "b");
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    // Paced lines in b, then a /leave b and a /join b typed before their
    // answers: the current room stays b all along.
    await cli.write(
      "/leave lobby",
      "/join a",
      "/join b",
      "b1",
      "b2",
      "b3",
      "/leave b",
      "/join b",
      "b4",
    );
    for (const text of ["b1", "b2", "b3", "b4"]) {
      const got = await bob.next((f) => f.type === "message");
      assert.equal(got.text, text);
      assert.equal(got.room, "b");
    }
    // Two rooms of two, the lobby left: a reconnect must not let the lobby
    // take one of the places.
    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    await servers.restartChat();
    const bob2 = await Peer.connect(
      servers.chat.url,
      (await login(servers.authUrl, "bob")).token,
    );
    bob2.send({ type: "join", room: "b" });
    await bob2.next((f) => f.type === "joined");
    await cli.stdout.next("reconnected");
    await cli.write("after the reconnect", "/who");
    await cli.stdout.next("in #b: ");
    const got = await bob2.next((f) =>
      f.type === "message" && f.from === "alice"
    );
    assert.equal(got.text, "after the reconnect");
    assert.equal(got.room, "b");
    await cli.closeStdin();
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    const out = cli.stdout.lines.join("\n");
    assert.ok(!out.includes("at most 2 rooms"), out);
    assert.ok(!out.includes("unknown_room"), out);
    await bob2.close();
  } finally {
    await servers.close();
  }
});

/** The texts `from` said in `room`, oldest first, from the server's history. */
async function texts(
  peer: Peer,
  room: string,
  from: string,
): Promise<unknown[]> {
  peer.send({ type: "history", room, limit: 500 });
  const page = await peer.next((f) => f.type === "history" && f.room === room);
  return (page.messages as Record<string, unknown>[])
    .filter((m) => m.from === from).map((m) => m.text);
}

/** The delay in a status line such as `reconnecting in 0.5s...`. */
function seconds(line: string): number {
  return Number(/in (\d+\.\d)s/.exec(line)?.[1]);
}

function between(value: number, low: number, high: number): boolean {
  return value >= low && value <= high;
}

Deno.test("after a reconnect, messages missed past one page of history's size limit are all shown, once, in order", async () => {
  const servers = await startServers();
  try {
    await register(servers.authUrl, "alice");
    await register(servers.authUrl, "bob");
    const bobLogin = await login(servers.authUrl, "bob");
    const bob = await Peer.connect(servers.chat.url, bobLogin.token);
    await bob.say("seen-before", "lobby");
    const cli = loginProcess(servers.authUrl, "alice");
    await cli.write(PASSWORD);
    await cli.stdout.next("seen-before");

    // While the chat server is down, 60 long messages (480 KB in UTF-8,
    // about two pages by size, far under 500 by count) land in its history.
    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    const file = `${servers.dataDir}/history/lobby.jsonl`;
    const lines = (await Deno.readTextFile(file)).trimEnd().split("\n");
    const lastId = Number(JSON.parse(lines.at(-1)!).id);
    const missed = Array.from({ length: 60 }, (_, i) => ({
      type: "message",
      id: String(lastId + 1 + i),
      room: "lobby",
      from: "bob",
      text: `missed-${i + 1} ${"\u00e9".repeat(3990)}`,
      ts: new Date().toISOString(),
    }));
    assert.ok(
      new TextEncoder().encode(JSON.stringify(missed)).length >
        1.5 * MAX_PAGE_BYTES,
      "more than one page",
    );
    await Deno.writeTextFile(
      file,
      missed.map((m) => JSON.stringify(m) + "\n").join(""),
      { append: true },
    );
    await servers.restartChat();
    await cli.stdout.next("reconnected");
    await cli.stdout.next(/missed-60 \u00e9/);
    const bob2 = await Peer.connect(servers.chat.url, bobLogin.token);
    await bob2.say("live-after", "lobby");
    await cli.stdout.next("live-after");

    const shown = cli.stdout.lines.map((l) => l.match(/missed-(\d+) /)?.[1])
      .filter((n) => n !== undefined).map(Number);
    assert.deepEqual(shown, Array.from({ length: 60 }, (_, i) => i + 1));
    assert.equal(cli.stdout.count((l) => l.endsWith("seen-before")), 1);
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
    await bob2.close();
  } finally {
    await servers.close();
  }
});

Deno.test("a direct message typed offline and refused after the reconnect: the error line says which one was not sent", async () => {
  const servers = await startServers();
  try {
    const { bob, cli } = await bobAndAlice(servers);
    await cli.write(PASSWORD);
    await cli.stdout.next("connected as alice");
    const port = servers.chat.port;
    await Promise.all([servers.chat.shutdown(), bob.closed()]);
    await cli.stdout.next("connection lost");
    await cli.write("/msg bob dm while down");
    await cli.stdout.next("will send it to bob when reconnected");
    // Bob is not back: the server refuses the direct message.
    assert.equal((await servers.restartChat()).port, port);
    await cli.stdout.next("reconnected");
    assert.equal(
      await cli.stdout.next("unknown_user"),
      "! unknown_user: bob is not connected (not sent: /msg bob dm while down)",
    );
    await cli.write("/quit");
    assert.equal(await cli.exit(), 0, cli.stderr.text);
  } finally {
    await servers.close();
  }
});

/**
 * Waits for `cli` (logging in as alice) to connect, then stops the chat
 * server and waits until the client says the connection is lost.
 */
async function cutOff(servers: Servers, cli: CliProcess): Promise<void> {
  await cli.stdout.next("connected as alice");
  await servers.chat.shutdown();
  await cli.stdout.next("connection lost");
}
