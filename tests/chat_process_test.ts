import assert from "node:assert/strict";
import {
  closedWithin,
  connectUntilRefused,
  LineWatcher,
  login,
  REPO_ROOT,
  retryUntil,
  statusWithin,
  stopChild,
  terminatesCleanly,
  TestClient,
} from "./_harness.ts";

function startProcess(
  args: string[],
  dataDir: string,
  env: Record<string, string> = {},
  command = Deno.execPath(),
) {
  const child = new Deno.Command(command, {
    args,
    cwd: REPO_ROOT,
    env: { RATE_LIMITS: "off", DATA_DIR: dataDir, NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return {
    child,
    stdout: new LineWatcher(child.stdout),
    stderr: new LineWatcher(child.stderr),
  };
}

Deno.test("deno task start runs both servers on port 0, hands out the real chat address, closes a logged-out session at once and stops cleanly on SIGTERM", async () => {
  const dataDir = await Deno.makeTempDir();
  const { child, stdout, stderr } = startProcess(
    [
      "task",
      "start",
      "--auth-port",
      "0",
      "--chat-port",
      "0",
      "--auth-url",
      "http://127.0.0.1:9",
    ],
    dataDir,
    // Set for the client in the same shell: the chat server must not follow
    // it, nor --auth-url (ignored, with a notice).
    { AUTH_URL: "http://127.0.0.1:9" },
  );
  try {
    const authLine = await stdout.waitFor(
      /^auth: listening on http:\/\/127\.0\.0\.1:\d+$/,
    );
    const chatLine = await stdout.waitFor(
      /^chat: listening on http:\/\/127\.0\.0\.1:\d+$/,
    );
    const authUrl = authLine.split(" ").pop()!;
    const chatPort = chatLine.split(":").pop()!;
    const token = await login(authUrl, "alice");
    const res = await fetch(`${authUrl}/login`, {
      method: "POST",
      body: JSON.stringify({
        username: "alice",
        password: "correct horse battery",
      }),
    });
    const body = await res.json();
    assert.equal(body.chat_url, `ws://127.0.0.1:${chatPort}/ws`);
    const alice = await TestClient.connect(body.chat_url, token);
    // A logout closes that session's connections at once (one process: no
    // waiting for the 30 s re-check), and only that session's.
    const other = await TestClient.connect(body.chat_url, body.token);
    const logout = await fetch(`${authUrl}/logout`, {
      method: "POST",
      headers: { authorization: `Bearer ${body.token}` },
    });
    assert.equal(logout.status, 204);
    assert.equal((await closedWithin(other, 5000)).code, 1008);
    alice.send({ type: "message", text: "before the signal" });
    await alice.nextOfType("message");
    child.kill("SIGTERM");
    assert.equal((await alice.closed).code, 1001);
    const status = await child.status;
    assert.equal(status.code, 0);
    const history = await Deno.readTextFile(`${dataDir}/history/lobby.jsonl`);
    assert.match(history, /before the signal/);
    await Promise.all([stdout.done, stderr.done]);
    assert.doesNotMatch(stderr.lines.join("\n"), /Uncaught|^\s+at /m);
    assert.match(stderr.lines.join("\n"), /start: ignoring --auth-url/);
    // One process: the auth server tells the chat server directly, nothing
    // to watch over HTTP (nor to complain about while the auth server starts).
    assert.doesNotMatch(stderr.lines.join("\n"), /session events/);
  } finally {
    await stopChild(child);
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("deno task auth and deno task chat as two processes: a /logout closes that session's chat connections at once (the session events)", async () => {
  const dataDir = await Deno.makeTempDir();
  const auth = startProcess(["task", "auth", "--port", "0"], dataDir);
  let chat: ReturnType<typeof startProcess> | undefined;
  try {
    const authUrl = (await auth.stdout.waitFor(/^auth: listening on /))
      .split(" ").pop()!;
    chat = startProcess(
      ["task", "chat", "--port", "0", "--auth-url", authUrl],
      dataDir,
    );
    const chatUrl = `ws://127.0.0.1:${
      (await chat.stdout.waitFor(/^chat: listening on /)).split(":").pop()
    }/ws`;
    await chat.stderr.waitFor(
      /^chat: watching the auth server's session events$/,
    );
    const token = await login(authUrl, "alice");
    const alice = await TestClient.connect(chatUrl, token);
    const logout = await fetch(`${authUrl}/logout`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}` },
    });
    assert.equal(logout.status, 204);
    // At once, not at a re-check (every 10 minutes for this session).
    assert.equal((await closedWithin(alice, 5000)).code, 1008);
  } finally {
    if (chat !== undefined) {
      await stopChild(chat.child);
      await Promise.all([chat.stdout.done, chat.stderr.done]);
    }
    await stopChild(auth.child);
    await Promise.all([auth.stdout.done, auth.stderr.done]);
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("deno task chat refuses bad configuration with exit code 2", async () => {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["task", "chat", "--port", "99999"],
    cwd: REPO_ROOT,
    stdout: "piped",
    stderr: "piped",
  });
  const out = await child.output();
  assert.equal(out.code, 2);
  assert.match(new TextDecoder().decode(out.stderr), /chat port "99999"/);
});

Deno.test("a chat server whose port is taken says which address, and gives its data directory back", async () => {
  const { createChatServer } = await import("../chat/server.ts");
  const dataDir = await Deno.makeTempDir();
  const taken = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = taken.addr.port;
    await assert.rejects(
      createChatServer({ port, dataDir, authUrl: "http://127.0.0.1:9" }),
      new RegExp(`^Error: Cannot listen on http://127\\.0\\.0\\.1:${port}: `),
    );
    // Closed cleanly (its running mark is gone), and unlocked.
    assert.deepEqual(
      [...Deno.readDirSync(`${dataDir}/history`)].map((e) => e.name),
      [".lock"],
    );
    const { HistoryStore } = await import("../chat/history.ts");
    await (await HistoryStore.open(`${dataDir}/history`)).close();
  } finally {
    taken.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a chat server with hundreds of rooms on disk starts under a 64 file descriptor limit (room files are opened a few at a time)", async () => {
  const { HistoryStore } = await import("../chat/history.ts");
  const dataDir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dataDir}/history`);
    const store = await HistoryStore.open(`${dataDir}/history`);
    for (let i = 0; i < 300; i++) store.append(`room-${i}`, "alice", `hi ${i}`);
    await store.close();
    const { child, stdout, stderr } = startProcess(
      [
        "-c",
        `ulimit -n 64 && exec "${Deno.execPath()}" task chat --port 0 --auth-url http://127.0.0.1:9`,
      ],
      dataDir,
      {},
      "sh",
    );
    await stdout.waitFor(/^chat: listening on /).catch((err) => {
      throw new Error(`${err}\n${stderr.lines.join("\n")}`);
    });
    child.kill("SIGTERM");
    assert.equal((await child.status).code, 0, stderr.lines.join("\n"));
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("out of file descriptors, deno task start neither crashes nor drops its open connections, and accepts again once they are free", async () => {
  const dataDir = await Deno.makeTempDir();
  const { child, stdout, stderr } = startProcess(
    [
      "-c",
      `ulimit -n 128 && exec "${Deno.execPath()}" task start --auth-port 0 --chat-port 0`,
    ],
    dataDir,
    {},
    "sh",
  );
  let held: Deno.TcpConn[] = [];
  try {
    const authUrl = (await stdout.waitFor(/^auth: listening on /)).split(" ")
      .pop()!;
    const chatPort = Number(
      (await stdout.waitFor(/^chat: listening on /)).split(":").pop(),
    );
    const alice = await TestClient.connect(
      `ws://127.0.0.1:${chatPort}/ws`,
      await login(authUrl, "alice"),
    );
    // Idle connections until the server can take no more: its accept fails
    // and the runtime's listener is gone (the connect is refused).
    held = await connectUntilRefused(
      chatPort,
      () => stderr.lines.some((l) => l.includes("chat: listener stopped")),
    ).catch((err) => {
      // What the server said, for a run where its limit was never reached.
      throw new Error(
        `${err.message}; its stderr:\n${stderr.lines.join("\n")}`,
      );
    });
    await stderr.waitFor(
      /^chat: listener stopped reason=".*Too many open files/,
    );
    // The open connection goes on.
    alice.send({ type: "message", text: "still here" });
    assert.equal((await alice.nextOfType("message")).text, "still here");
    for (const conn of held.splice(0)) conn.close();
    // Listening again: a new connection gets in (asked until it does; the
    // first retry is 100 ms on).
    const bob = await retryUntil(
      async () =>
        TestClient.connect(
          `ws://127.0.0.1:${chatPort}/ws`,
          await login(authUrl, "bob"),
        ),
      10_000,
    );
    await stderr.waitFor(/^chat: listener accepting connections again$/);
    bob.send({ type: "message", text: "back" });
    assert.equal((await alice.nextOfType("message")).text, "back");
    await terminatesCleanly(child, stdout, stderr);
  } finally {
    for (const conn of held) conn.close();
    await stopChild(child);
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("SIGHUP (the terminal closed) shuts the servers down like SIGTERM: close 1001, history flushed, exit 0", async (t) => {
  const permissions = [
    "--allow-net",
    "--allow-read",
    "--allow-write",
    "--allow-env",
  ];
  await t.step("main.ts (deno task start)", async () => {
    const dataDir = await Deno.makeTempDir();
    const { child, stdout, stderr } = startProcess(
      [
        "run",
        ...permissions,
        "main.ts",
        "--auth-port",
        "0",
        "--chat-port",
        "0",
      ],
      dataDir,
    );
    try {
      const authUrl = (await stdout.waitFor(/^auth: listening on /)).split(" ")
        .pop()!;
      const chatPort = (await stdout.waitFor(/^chat: listening on /)).split(":")
        .pop()!;
      const alice = await TestClient.connect(
        `ws://127.0.0.1:${chatPort}/ws`,
        await login(authUrl, "alice"),
      );
      alice.send({ type: "message", text: "before the hangup" });
      await alice.nextOfType("message");
      child.kill("SIGHUP");
      assert.equal((await alice.closed).code, 1001);
      assert.equal(
        (await statusWithin(child, 15_000)).code,
        0,
        stderr.lines.join("\n"),
      );
      assert.match(
        await Deno.readTextFile(`${dataDir}/history/lobby.jsonl`),
        /before the hangup/,
      );
      // A clean stop: the next start does not take it for a crash.
      await assert.rejects(Deno.stat(`${dataDir}/history/.running`));
      await Promise.all([stdout.done, stderr.done]);
    } finally {
      await stopChild(child);
      await Deno.remove(dataDir, { recursive: true });
    }
  });
  for (const entry of ["chat/main.ts", "auth/main.ts"]) {
    await t.step(entry, async () => {
      const dataDir = await Deno.makeTempDir();
      const { child, stdout, stderr } = startProcess(
        [
          "run",
          ...permissions,
          entry,
          "--port",
          "0",
          ...(entry === "chat/main.ts"
            ? ["--auth-url", "http://127.0.0.1:9"]
            : []),
        ],
        dataDir,
      );
      try {
        await stdout.waitFor(/listening on /);
        child.kill("SIGHUP");
        assert.equal(
          (await statusWithin(child, 15_000)).code,
          0,
          stderr.lines.join("\n"),
        );
        await Promise.all([stdout.done, stderr.done]);
        assert.match(stderr.lines.join("\n"), /shutting down/);
      } finally {
        await stopChild(child);
        await Deno.remove(dataDir, { recursive: true });
      }
    });
  }
});

Deno.test("kill -9 right after a message was delivered loses neither it nor its client_id: a resend after the restart is not broadcast again", async () => {
  const dataDir = await Deno.makeTempDir();
  const start = async () => {
    const proc = startProcess(
      [
        "run",
        "--allow-net",
        "--allow-read",
        "--allow-write",
        "--allow-env",
        "main.ts",
        "--port",
        "0",
      ],
      dataDir,
    );
    const authUrl = (await proc.stdout.waitFor(/^auth: listening on /))
      .split(" ").pop()!;
    const chatUrl = `ws://127.0.0.1:${
      (await proc.stdout.waitFor(/^chat: listening on /)).split(":").pop()
    }/ws`;
    return { ...proc, authUrl, chatUrl };
  };
  let run = await start();
  try {
    const aliceToken = await login(run.authUrl, "alice");
    const bobToken = await login(run.authUrl, "bob");
    const alice = await TestClient.connect(run.chatUrl, aliceToken);
    const bob = await TestClient.connect(run.chatUrl, bobToken);
    const frame = { type: "message", text: "said once", client_id: "c-1" };
    alice.send(frame);
    const echo = await alice.nextOfType("message");
    assert.equal((await bob.nextOfType("message")).id, echo.id);
    run.child.kill("SIGKILL");
    await run.child.status;
    await Promise.all([alice.closed, bob.closed]);
    run = await start();
    // The sessions are on disk: the same tokens work.
    const bob2 = await TestClient.connect(run.chatUrl, bobToken);
    const welcome = bob2.frames.find((f) => f.type === "welcome")!;
    const history = welcome.history as { id: string; text: string }[];
    assert.deepEqual(
      history.map((m) => [m.id, m.text]),
      [[echo.id, "said once"]],
    );
    const alice2 = await TestClient.connect(run.chatUrl, aliceToken);
    alice2.send(frame);
    const again = await alice2.nextOfType("message");
    assert.equal(again.id, echo.id, "the original echo, not a new message");
    alice2.send({ type: "message", text: "next" });
    await alice2.nextOfType("message");
    const seen = await bob2.nextOfType("message");
    assert.equal(seen.text, "next", "bob never got the resend");
    await alice2.close();
    await bob2.close();
  } finally {
    await stopChild(run.child);
    await Promise.all([run.stdout.done, run.stderr.done]);
    await Deno.remove(dataDir, { recursive: true });
  }
});
