/**
 * The client against servers that stop answering: a chat server frozen with
 * SIGSTOP (its sockets stay open, nothing comes back), and an address that
 * accepts connections but never answers the WebSocket handshake. The session
 * runs in this process (its timeouts shortened); the servers are real.
 */
import assert from "node:assert/strict";
import { ChatSession } from "../cli/chat_session.ts";
import { CliError } from "../cli/cli_error.ts";
import { LineReader } from "../cli/line_reader.ts";
import { keyboard, screen, startMainProcess } from "./_cli_helpers.ts";

Deno.test("a chat address that accepts but never answers the handshake: one line and the session ends, no hang", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) held.push(conn);
  })();
  const { writer } = screen();
  const keys = keyboard();
  const lines = new LineReader({ input: keys.input, output: writer });
  try {
    const chatUrl = `ws://127.0.0.1:${listener.addr.port}/ws`;
    const session = new ChatSession({
      chatUrl,
      token: "t",
      username: "alice",
      lines,
      color: false,
      checkSession: () => Promise.resolve("valid"),
      connectTimeoutMs: 300,
    });
    const started = Date.now();
    const err = await session.run().catch((e) => e);
    assert.ok(err instanceof CliError, String(err));
    assert.equal(
      err.message,
      `cannot reach the chat server at ${chatUrl} (no answer within 0.3 s)`,
    );
    assert.ok(Date.now() - started < 5_000);
    assert.equal(held.length, 1, "it did connect, and got no answer");
  } finally {
    lines.close();
    listener.close();
    await accepting.catch(() => {});
    for (const conn of held) conn.close();
  }
});

Deno.test("a chat server that stops answering (SIGSTOP) is noticed by the heartbeat; the client reconnects once it runs again", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "chatroom_liveness_" });
  const servers = await startMainProcess(dataDir);
  const { child, authUrl } = servers;
  const { writer, out } = screen();
  const keys = keyboard();
  const lines = new LineReader({ input: keys.input, output: writer });
  let stopped = false;
  try {
    const credentials = JSON.stringify({
      username: "alice",
      password: "correct horse battery",
    });
    const reg = await fetch(`${authUrl}/register`, {
      method: "POST",
      body: credentials,
    });
    await reg.body?.cancel();
    const login = await (await fetch(`${authUrl}/login`, {
      method: "POST",
      body: credentials,
    })).json();
    const session = new ChatSession({
      chatUrl: login.chat_url,
      token: login.token,
      username: "alice",
      lines,
      color: false,
      checkSession: () => Promise.resolve("valid"),
      heartbeatMs: 200,
      heartbeatTimeoutMs: 300,
      initialBackoffMs: 50,
      random: () => 0.5,
    });
    const ended = session.run();
    await out.next("connected as alice");

    child.kill("SIGSTOP");
    stopped = true;
    const frozenAt = Date.now();
    keys.type("typed while frozen");
    await out.next("connection lost, reconnecting");
    // Silence for heartbeatMs, then heartbeatTimeoutMs for the ping's answer.
    assert.ok(Date.now() - frozenAt < 3_000);

    child.kill("SIGCONT");
    stopped = false;
    await out.next("reconnected");
    keys.type("/quit");
    assert.equal(await ended, "quit");
    // The line typed while frozen was sent again and confirmed.
    assert.ok(
      !out.lines.some((l) => l.includes("not confirmed")),
      out.lines.join("\n"),
    );
    assert.ok(
      out.lines.some((l) =>
        l.includes("<alice> typed while frozen") && !l.includes("pending")
      ),
      out.lines.join("\n"),
    );
  } finally {
    lines.close();
    if (stopped) child.kill("SIGCONT");
    await servers.stop("SIGTERM");
    await Deno.remove(dataDir, { recursive: true });
  }
});
