import assert from "node:assert/strict";
import { DEFAULT_AUTH_URL, parseCliArgs } from "../cli/args.ts";
import { describeNetworkError, loginUser, registerUser } from "../cli/api.ts";
import { ChatSession, unconfirmedTexts } from "../cli/chat_session.ts";
import { CliError } from "../cli/cli_error.ts";
import { LineReader, type SyncWriter } from "../cli/line_reader.ts";
import {
  formatClock,
  formatDay,
  mentions,
  nickColor,
  renderDirectMessage,
  renderError,
  renderPresence,
  renderRoomMessage,
  sanitize,
  shouldColor,
  type ViewOptions,
} from "../cli/render.ts";
import { parseServerText } from "../cli/server_frames.ts";
import { keyboard } from "./_cli_helpers.ts";

const view: ViewOptions = { color: false, currentRoom: "lobby", me: "alice" };
const ts = new Date(2024, 0, 2, 9, 5).toISOString();

Deno.test("the command line is parsed strictly, flags winning over the environment", async (t) => {
  await t.step("defaults to the menu and the default auth URL", () => {
    assert.deepEqual(parseCliArgs([]), {
      command: "menu",
      authUrl: DEFAULT_AUTH_URL,
      user: undefined,
      passwordStdin: false,
    });
  });
  await t.step("reads subcommands and flags", () => {
    const args = parseCliArgs([
      "login",
      "--user",
      "bob",
      "--password-stdin",
      "--auth-url",
      "http://h:1/",
    ]);
    assert.deepEqual(args, {
      command: "login",
      authUrl: "http://h:1",
      user: "bob",
      passwordStdin: true,
    });
  });
  await t.step("skips the -- that deno task cli -- ... hands on", () => {
    assert.equal(parseCliArgs(["--", "login", "--user", "bob"]).user, "bob");
  });
  await t.step("trims --user as a typed answer is", () => {
    assert.equal(parseCliArgs(["--user", "  bob "]).user, "bob");
  });
  await t.step(
    "--auth-url wins over CHATROOM_AUTH_URL, which wins over AUTH_URL",
    () => {
      const vars: Record<string, string> = {
        CHATROOM_AUTH_URL: "http://e:2",
        AUTH_URL: "http://a:4",
      };
      const env = (n: string) => vars[n];
      assert.equal(parseCliArgs([], env).authUrl, "http://e:2");
      assert.equal(
        parseCliArgs(["--auth-url", "http://f:3"], env).authUrl,
        "http://f:3",
      );
      delete vars.CHATROOM_AUTH_URL;
      assert.equal(parseCliArgs([], env).authUrl, "http://a:4");
    },
  );
  await t.step(
    "unknown flags, commands and bad URLs are usage errors (exit 2)",
    () => {
      for (
        const args of [["--nope"], ["chat"], ["login", "extra"], [
          "--auth-url",
          "nonsense",
        ], ["--user"]]
      ) {
        assert.throws(
          () => parseCliArgs(args),
          (err) => err instanceof CliError && err.exitCode === 2,
          args.join(" "),
        );
      }
    },
  );
});

Deno.test("the chat view renders messages, DMs, presence and errors as one line each", () => {
  const message = {
    type: "message" as const,
    id: "7",
    room: "lobby",
    from: "bob",
    text: "hi",
    ts,
  };
  assert.equal(renderRoomMessage(message, view), "[09:05] <bob> hi");
  assert.equal(
    renderRoomMessage({ ...message, room: "dev" }, view),
    "[09:05] #dev <bob> hi",
  );
  const dm = {
    type: "dm" as const,
    id: "1",
    from: "bob",
    to: "alice",
    text: "psst",
    ts,
  };
  assert.equal(renderDirectMessage(dm, view), "[09:05] *bob* -> you: psst");
  assert.equal(
    renderDirectMessage({ ...dm, from: "alice", to: "bob" }, view),
    "[09:05] *you* -> bob: psst",
  );
  assert.equal(
    renderPresence({ type: "join", room: "dev", user: "bob" }, view),
    "* bob joined #dev",
  );
  assert.equal(
    renderPresence({ type: "leave", room: "lobby", user: "bob" }, view),
    "* bob left #lobby",
  );
  assert.equal(
    renderError({
      type: "error",
      error: "rate_limited",
      message: "Slow down",
      retry_after_ms: 1500,
    }, view),
    "! rate_limited: Slow down (retry in 1.5s)",
  );
  // Said once when the message says it already.
  assert.equal(
    renderError({
      type: "error",
      error: "rate_limited",
      message: "Slow down: try again in 0.5 s",
      retry_after_ms: 500,
    }, view),
    "! rate_limited: Slow down: try again in 0.5 s",
  );
  // A refused direct message says which one, on one line.
  assert.equal(
    renderError(
      { type: "error", error: "unknown_user", message: "bob is not connected" },
      view,
      "/msg bob two\nlines \x1b[2J\u202e",
    ),
    "! unknown_user: bob is not connected (not sent: /msg bob two\ufffdlines \ufffd[2J\ufffd)",
  );
  assert.equal(
    formatClock("not a date", new Date(2024, 0, 1, 23, 59)),
    "23:59",
  );
});

Deno.test("nick colours are stable per user and off without a terminal or with NO_COLOR", () => {
  assert.equal(nickColor("bob"), nickColor("bob"));
  assert.equal(nickColor("Bob"), nickColor("bob"));
  const colours = new Set(
    ["alice", "bob", "carol", "dave", "erin", "frank"].map(nickColor),
  );
  assert.ok(colours.size > 2, "different users get different colours");
  const coloured = renderRoomMessage({
    type: "message",
    id: "1",
    room: "lobby",
    from: "bob",
    text: "hi",
    ts,
  }, { ...view, color: true });
  assert.ok(coloured.includes(`\x1b[${nickColor("bob")}m<bob>`));
  const base = { noColor: undefined, term: "xterm", isTerminal: true };
  assert.equal(shouldColor(base), true);
  assert.equal(shouldColor({ ...base, noColor: "1" }), false);
  assert.equal(shouldColor({ ...base, isTerminal: false }), false);
  assert.equal(shouldColor({ ...base, term: "dumb" }), false);
});

Deno.test("text from the network cannot send terminal control sequences", () => {
  assert.equal(sanitize("a\x1b[2Jb\x07\r\n"), "a\ufffd[2Jb\ufffd\ufffd\ufffd");
});

Deno.test("text from the network cannot reorder or break a line (bidi overrides, isolates, line separators)", () => {
  assert.equal(
    sanitize("pay \u202egnirts\u202c [\u2066x\u2069] a\u2028b\u2029c"),
    "pay \ufffdgnirts\ufffd [\ufffdx\ufffd] a\ufffdb\ufffdc",
  );
  // Emoji sequences and marks in right-to-left text stay as they are.
  assert.equal(
    sanitize("\u{1F469}\u200d\u{1F4BB} \u05e9\u200f"),
    "\u{1F469}\u200d\u{1F4BB} \u05e9\u200f",
  );
});

Deno.test("server frames are split on newlines and checked field by field", () => {
  const frames = parseServerText(
    [
      JSON.stringify({
        type: "message",
        id: "3",
        room: "lobby",
        from: "bob",
        text: "hi",
        ts,
      }),
      JSON.stringify({
        type: "message",
        id: "4",
        room: "lobby",
        text: "no from",
      }),
      "not json",
      JSON.stringify({ type: "error", error: "brand_new_code", message: "m" }),
      JSON.stringify({ type: "history", room: "dev", messages: [], gap: true }),
    ].join("\n"),
  );
  assert.deepEqual(frames.map((f) => f.type), ["message", "error", "history"]);
  const error = frames[1];
  assert.ok(error?.type === "error");
  assert.equal(error.error, "brand_new_code");
  const history = frames[2];
  assert.ok(history?.type === "history");
  assert.equal(history.gap, true);
});

Deno.test("a room name the server would never make is not taken from a frame (no control sequence reaches the screen)", () => {
  const hostile = "r\x1b[2J";
  const frames = parseServerText(
    [
      JSON.stringify({ type: "left", room: hostile }),
      JSON.stringify({ type: "who", room: hostile, users: [] }),
      JSON.stringify({ type: "joined", room: hostile, users: [], history: [] }),
      JSON.stringify({
        type: "rooms",
        rooms: [{ name: hostile, users: 1 }, { name: "dev", users: 2 }],
      }),
    ].join("\n"),
  );
  assert.deepEqual(frames, [
    { type: "rooms", rooms: [{ name: "dev", users: 2 }] },
  ]);
});

Deno.test("the failure of fetch is described in a few words", () => {
  const refused = new TypeError("fetch failed", {
    cause: new Error("tcp connect error: Connection refused (os error 111)"),
  });
  assert.equal(describeNetworkError(refused), "connection refused");
  assert.equal(
    describeNetworkError(new TypeError("dns error: failed to lookup address")),
    "host not found",
  );
});

Deno.test("an auth server's refusal is one line that says what failed once, then why", async (t) => {
  const alice = { username: "alice", password: "secretpw1" };
  /** A fetch that answers every request with `status` and `body`. */
  function answering(
    status: number,
    body: string,
    headers: Record<string, string> = {},
  ): typeof fetch {
    return () => Promise.resolve(new Response(body, { status, headers }));
  }
  async function failure(call: Promise<unknown>): Promise<CliError> {
    const err = await call.then(() => undefined, (e: unknown) => e);
    assert.ok(err instanceof CliError, String(err));
    assert.equal(err.exitCode, 1);
    assert.ok(!err.message.includes("\n"), err.message);
    return err;
  }
  const json = (error: string, message: string) =>
    JSON.stringify({ error, message });

  await t.step("a taken name", async () => {
    const err = await failure(registerUser("http://a", alice, {
      fetch: answering(
        409,
        json("username_taken", 'Cannot register "alice": username is taken'),
      ),
    }));
    assert.equal(
      err.message,
      'cannot register "alice": username is taken (username_taken)',
    );
  });
  await t.step("a wrong password", async () => {
    const err = await failure(loginUser("http://a", alice, {
      fetch: answering(
        401,
        json(
          "invalid_credentials",
          "Cannot log in: wrong username or password",
        ),
      ),
    }));
    assert.equal(
      err.message,
      'cannot log in as "alice": wrong username or password (invalid_credentials)',
    );
  });
  await t.step("a throttle names its wait once", async (t) => {
    await t.step("when the message already says it", async () => {
      const err = await failure(loginUser("http://a", alice, {
        fetch: answering(
          429,
          json(
            "rate_limited",
            "Cannot log in now: too many attempts, retry in 7 s",
          ),
          { "retry-after": "7" },
        ),
      }));
      assert.equal(
        err.message,
        'cannot log in as "alice": too many attempts, retry in 7 s (rate_limited)',
      );
    });
    await t.step("when only Retry-After says it", async () => {
      const err = await failure(loginUser("http://a", alice, {
        fetch: answering(429, json("rate_limited", "Too many attempts."), {
          "retry-after": "7",
        }),
      }));
      assert.equal(
        err.message,
        'cannot log in as "alice": too many attempts (rate_limited, try again in 7s)',
      );
    });
  });
  await t.step("an answer without a readable error", async () => {
    const err = await failure(registerUser("http://a", alice, {
      fetch: answering(502, "<html>Bad Gateway</html>"),
    }));
    assert.equal(
      err.message,
      'cannot register "alice": the auth server at http://a answered HTTP 502 without a readable error',
    );
  });
  await t.step(
    "line breaks and control characters cannot get through",
    async () => {
      const err = await failure(registerUser("http://a", {
        username: "al\nice",
        password: "secretpw1",
      }, {
        fetch: answering(400, json("invalid_username", "Bad\r\nname\u001b[2J")),
      }));
      assert.equal(
        err.message,
        'cannot register "al ice": bad name [2J (invalid_username)',
      );
    },
  );
});

Deno.test("the shared line reader queues piped lines for the menu, the password and the chat", async () => {
  const input = ReadableStream.from([
    new TextEncoder().encode("1\nal"),
    new TextEncoder().encode("ice\r\npw\nlast without newline"),
  ]);
  const reader = new LineReader({ input, output: sink() });
  assert.equal(await reader.readLine(), "1");
  assert.equal(await reader.readLine(), "alice");
  assert.equal(await reader.readLine({ echo: false }), "pw");
  assert.equal(await reader.readLine(), "last without newline");
  assert.equal(await reader.readLine(), null);
  reader.close();
});

Deno.test("on a terminal the reader edits the line in raw mode, hides passwords and restores the mode", async (t) => {
  await t.step(
    "typing, backspace, escape sequences, echo off, Enter",
    async () => {
      const { input: stream, push } = keyboard();
      const out = sink();
      const raw: boolean[] = [];
      const reader = new LineReader({
        input: stream,
        output: out,
        terminal: { setRaw: (on) => raw.push(on), columns: () => 80 },
      });
      const line = reader.readLine({ prompt: "Password: ", echo: false });
      // Arrows do nothing in a hidden line: the cursor stays at its end.
      push("sec\x1b[D\x1b[Hret!\x7f\r");
      assert.equal(await line, "secret");
      assert.deepEqual(raw, [true, false]);
      assert.ok(!out.text().includes("secret"), "the password is never echoed");
      assert.ok(out.text().includes("Password: \n"));

      const chat = reader.readLine({ prompt: "#lobby> " });
      push("hel");
      await Promise.resolve();
      // A line printed meanwhile goes above the prompt, which is redrawn.
      reader.print("[09:05] <bob> hi");
      assert.ok(
        out.text().endsWith("[09:05] <bob> hi\n#lobby> hel"),
        out.text(),
      );
      push("lo\r");
      assert.equal(await chat, "hello");
      reader.close();
    },
  );

  await t.step("Ctrl+C rejects the read and leaves raw mode", async () => {
    const { input: stream, push } = keyboard();
    const raw: boolean[] = [];
    const reader = new LineReader({
      input: stream,
      output: sink(),
      terminal: { setRaw: (on) => raw.push(on), columns: () => 80 },
    });
    const line = reader.readLine({ prompt: "Password: ", echo: false });
    push("abc\x03");
    await assert.rejects(line, { name: "Interrupted" });
    assert.deepEqual(raw, [true, false]);
    reader.close();
  });
});

Deno.test("on a plain terminal (TERM=dumb, or output not to it) the reader never moves the cursor: the terminal edits the lines, only passwords go raw", async () => {
  const { input: stream, push } = keyboard();
  const out = sink();
  const prompts = sink();
  const raw: boolean[] = [];
  const reader = new LineReader({
    input: stream,
    output: out,
    editorOutput: prompts,
    terminal: { setRaw: (on) => raw.push(on), columns: () => 80, plain: true },
  });
  assert.equal(reader.interactive, true);
  assert.equal(reader.showsFooter, false);

  const name = reader.readLine({ prompt: "Username: " });
  // The terminal's line mode: what arrives is a whole line, echoed by it.
  push("alice\n");
  assert.equal(await name, "alice");
  assert.deepEqual(raw, []);
  assert.equal(prompts.text(), "Username: ");

  const password = reader.readLine({ prompt: "Password: ", echo: false });
  push("se\x7fecret\r");
  assert.equal(await password, "secret");
  assert.deepEqual(raw, [true, false]);
  assert.equal(prompts.text(), "Username: Password: \n");

  // The chat's lines: no prompt, lines printed as they come, no footer.
  const chat = reader.readLine({ prompt: "#lobby> ", transient: true });
  reader.setFooter(["  hello (pending)"]);
  reader.print("[09:05] <bob> hi");
  push("hello\n");
  assert.equal(await chat, "hello");
  assert.equal(out.text(), "[09:05] <bob> hi\n");
  assert.equal(prompts.text(), "Username: Password: \n");
  assert.ok(!(out.text() + prompts.text()).includes("\x1b"));
  assert.deepEqual(raw, [true, false]);

  // Ctrl+D at a hidden prompt ends the input, and the prompt's line.
  const hidden = reader.readLine({ prompt: "Password: ", echo: false });
  push("\x04");
  assert.equal(await hidden, null);
  assert.ok(prompts.text().endsWith("Password: \n"), prompts.text());
  assert.deepEqual(raw, [true, false, true, false]);

  // A signal ends a read in line mode as Ctrl+C would.
  const last = reader.readLine({ prompt: "#lobby> ", transient: true });
  assert.equal(reader.interrupt(), true);
  await assert.rejects(last, { name: "Interrupted" });
  assert.equal(reader.interrupt(), false, "no read, nothing to interrupt");
  reader.close();
});

Deno.test("onMessage parses a coalesced frame and shows each message once", () => {
  const { out, lines, session } = offlineSession();
  const message = (id: string, text: string) =>
    JSON.stringify({
      type: "message",
      id,
      room: "lobby",
      from: "bob",
      text,
      ts,
    });
  const welcome = JSON.stringify({
    type: "welcome",
    username: "alice",
    room: "lobby",
    rooms: ["lobby"],
    users: ["alice", "bob"],
    history: [JSON.parse(message("1", "one"))],
  });
  session.onMessage(
    new MessageEvent("message", {
      data: [welcome, message("2", "two"), "{broken", message("2", "two")]
        .join("\n"),
    }),
  );
  session.onError(new Event("error"));
  assert.deepEqual(out.text().split("\n"), [
    "* connected as alice; type /help for commands",
    // Not today's: its day is said.
    `* ${formatDay(ts)}`,
    "[09:05] <bob> one",
    "[09:05] <bob> two",
    "",
  ]);
  lines.close();
});

Deno.test("a history that started over is told even after more than the remembered 256 messages: ids below them come back", () => {
  const { out, lines, session } = offlineSession();
  const before = new Date(2026, 0, 1, 9, 5).toISOString();
  const after = new Date(2026, 0, 1, 10, 7).toISOString();
  const message = (id: number, ts: string) => ({
    type: "message",
    id: String(id),
    room: "lobby",
    from: "bob",
    text: `m${id}${ts === after ? " again" : ""}`,
    ts,
  });
  const frames = [
    {
      type: "welcome",
      username: "alice",
      room: "lobby",
      rooms: ["lobby"],
      users: ["alice", "bob"],
      history: [message(1, before)],
    },
    ...Array.from({ length: 299 }, (_, i) => message(i + 2, before)),
    // Seen, remembered, the same: a duplicate, skipped quietly.
    message(290, before),
    // The server's history started over: id 2 again, below all remembered.
    message(2, after),
    message(3, after),
  ];
  session.onMessage(
    new MessageEvent("message", {
      data: frames.map((f) => JSON.stringify(f)).join("\n"),
    }),
  );
  session.onError(new Event("error"));
  const shown = out.text().split("\n");
  assert.equal(shown.filter((l) => l.endsWith("> m290")).length, 1);
  assert.deepEqual(shown.slice(-4), [
    "* the server's history of #lobby has started over: messages shown before are no longer there",
    "[10:07] <bob> m2 again",
    "[10:07] <bob> m3 again",
    "",
  ]);
  lines.close();
});

/** A session fed frames by hand (no socket), printing into a sink. */
function offlineSession() {
  const out = sink();
  const lines = new LineReader({ input: ReadableStream.from([]), output: out });
  const session = new ChatSession({
    chatUrl: "ws://127.0.0.1:1/ws",
    token: "t",
    username: "alice",
    lines,
    color: false,
    checkSession: () => Promise.resolve("valid"),
  });
  return { out, lines, session };
}

function sink(): SyncWriter & { text(): string } {
  const chunks: Uint8Array[] = [];
  return {
    writeSync(p: Uint8Array) {
      chunks.push(p.slice());
      return p.length;
    },
    text() {
      return chunks.map((c) => new TextDecoder().decode(c)).join("");
    },
  };
}

Deno.test("the unconfirmed texts are listed in the order typed, one sanitized line each", () => {
  const pending = new Map([
    ["a", { room: "lobby", text: "first" }],
    ["b", { room: "dev", text: "two\nlines \u202eflipped" }],
    ["c", { room: "dev", text: "not among the frames" }],
  ]);
  assert.deepEqual(
    unconfirmedTexts([
      { type: "join", room: "dev" },
      { type: "message", room: "lobby", text: "first", client_id: "a" },
      { type: "dm", to: "bob", text: "psst" },
      { type: "message", room: "dev", text: "two", client_id: "b" },
      // Confirmed meanwhile: no longer pending, not listed.
      { type: "message", room: "dev", text: "echoed", client_id: "z" },
    ], pending),
    [
      "#lobby first",
      "/msg bob psst",
      "#dev two\ufffdlines \ufffdflipped",
      "#dev not among the frames",
    ],
  );
});

Deno.test("a message that names you is bold in colour, and rings the terminal's bell; not on a pipe, not your own, not a longer name", () => {
  assert.ok(mentions("hey alice, look", "alice", "bob"));
  assert.ok(mentions("@ALICE: look", "alice", "bob"));
  assert.ok(mentions("thanks a.b-c.", "a.b-c", "bob"));
  assert.ok(!mentions("malice and alice_2 and alicex", "alice", "bob"));
  assert.ok(!mentions("alice here", "alice", "Alice"));
  const message = {
    type: "message" as const,
    id: "1",
    room: "lobby",
    from: "bob",
    text: "alice?",
    ts: new Date().toISOString(),
  };
  const view = { color: true, currentRoom: "lobby", me: "alice" };
  assert.ok(
    renderRoomMessage(message, view).endsWith("\x1b[1malice?\x1b[0m"),
    JSON.stringify(renderRoomMessage(message, view)),
  );
  assert.match(
    renderRoomMessage(message, { ...view, color: false }),
    /\] <bob> alice\?$/,
  );
  // The bell goes to a terminal only.
  for (const terminal of [true, false]) {
    let out = "";
    const output: SyncWriter = {
      writeSync(p) {
        out += new TextDecoder().decode(p);
        return p.length;
      },
    };
    const reader = new LineReader({
      input: new ReadableStream(),
      output,
      terminal: terminal ? { setRaw: () => {}, columns: () => 80 } : null,
    });
    reader.print("x", { bell: true });
    reader.print("y");
    assert.equal(out.includes("\x07"), terminal, JSON.stringify(out));
    assert.equal(out.split("\x07").length, terminal ? 2 : 1);
    reader.close();
  }
});

Deno.test("Tab completes a command, a room or a user name seen in the session, as far as the candidates agree", () => {
  const { lines, session } = offlineSession();
  session.onMessage(
    new MessageEvent("message", {
      data: JSON.stringify({
        type: "welcome",
        username: "alice",
        room: "lobby",
        rooms: ["lobby"],
        users: ["alice", "bob", "Bobby", "carol"],
        history: [],
      }),
    }),
  );
  assert.equal(session.complete("ca"), "carol: ");
  assert.equal(session.complete("hi CA"), "hi carol ");
  assert.equal(session.complete("b"), "bob");
  assert.equal(session.complete("bob"), undefined);
  assert.equal(session.complete("al"), undefined, "not one's own name");
  assert.equal(session.complete("/jo"), "/join ");
  assert.equal(session.complete("/join lo"), "/join lobby ");
  assert.equal(session.complete("see #lo"), "see #lobby ");
  assert.equal(session.complete("/msg car"), "/msg carol ");
  assert.equal(session.complete("zz"), undefined);
  assert.equal(session.complete("hi "), undefined);
  lines.close();
});
