import assert from "node:assert/strict";
import { MAX_PAGE_BYTES } from "../chat/protocol.ts";
import {
  connectAs,
  login,
  rawUpgrade,
  retryUntil,
  startStack,
  TestClient,
} from "./_harness.ts";

Deno.test("a connection without a valid token gets 401 JSON and no WebSocket", async (t) => {
  const logged: string[] = [];
  const stack = await startStack({ log: (line) => logged.push(line) });
  try {
    await t.step("missing token", async () => {
      const res = await rawUpgrade(stack.chat.port, "/ws");
      assert.equal(res.status, 401);
      assert.equal(JSON.parse(res.body).error, "invalid_token");
    });
    await t.step("unknown token, in the header and in the query", async () => {
      const a = await rawUpgrade(stack.chat.port, "/ws", {
        authorization: "Bearer nope",
      });
      assert.equal(a.status, 401);
      const b = await rawUpgrade(stack.chat.port, "/ws?token=nope");
      assert.equal(b.status, 401);
      assert.equal(JSON.parse(b.body).error, "invalid_token");
    });
    await t.step("revoked token", async () => {
      const token = await login(stack.auth.url, "revoked");
      const ok = await rawUpgrade(stack.chat.port, "/ws", {
        authorization: `Bearer ${token}`,
      });
      assert.equal(ok.status, 101);
      const out = await fetch(`${stack.auth.url}/logout`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}` },
      });
      await out.body?.cancel();
      assert.equal(out.status, 204);
      const res = await rawUpgrade(stack.chat.port, "/ws", {
        authorization: `Bearer ${token}`,
      });
      assert.equal(res.status, 401);
    });
    await t.step(
      "a token that is not printable ASCII: 401, and never logged",
      async () => {
        for (
          const token of ["SECRET%00TOKEN", "SECRET%0ATOKEN", "SECRET%C3%A9"]
        ) {
          const res = await rawUpgrade(stack.chat.port, `/ws?token=${token}`);
          assert.equal(res.status, 401, token);
          assert.equal(JSON.parse(res.body).error, "invalid_token");
        }
        assert.ok(!logged.some((line) => line.includes("SECRET")));
      },
    );
    await t.step("a browser's ?token= works", async () => {
      const token = await login(stack.auth.url, "browser");
      const client = new TestClient(`${stack.chat.url}?token=${token}`);
      const welcome = await client.nextOfType("welcome");
      assert.equal(welcome.username, "browser");
      await client.close();
    });
  } finally {
    await stack.close();
  }
});

Deno.test("non-upgrade requests get 426, other paths 404, /health 200", async () => {
  const stack = await startStack();
  try {
    const res = await fetch(`${stack.chat.httpUrl}/ws`);
    assert.equal(res.status, 426);
    assert.equal((await res.json()).error, "upgrade_required");
    for (const method of ["POST", "PUT", "DELETE"]) {
      const other = await fetch(`${stack.chat.httpUrl}/ws`, {
        method,
        body: "x",
      });
      assert.equal(other.status, 426, method);
      assert.equal((await other.json()).error, "upgrade_required");
    }
    const nf = await fetch(`${stack.chat.httpUrl}/nope`);
    assert.equal(nf.status, 404);
    assert.equal((await nf.json()).error, "not_found");
    const health = await fetch(`${stack.chat.httpUrl}/health`);
    assert.equal((await health.json()).status, "ok");
    const head = await fetch(`${stack.chat.httpUrl}/health`, {
      method: "HEAD",
    });
    assert.equal(head.status, 200);
    assert.equal(await head.text(), "");
    const post = await fetch(`${stack.chat.httpUrl}/health`, {
      method: "POST",
    });
    assert.equal(post.status, 405);
    assert.equal(post.headers.get("allow"), "GET, HEAD");
    await post.body?.cancel();
  } finally {
    await stack.close();
  }
});

Deno.test("a malformed WebSocket handshake gets 400 JSON, not a server error", async () => {
  // One connection per address: a reservation kept by a refused handshake
  // would refuse the last connect below.
  const stack = await startStack({
    rateLimits: true,
    chatLimits: { maxConnectionsPerAddress: 1 },
  });
  try {
    const token = await login(stack.auth.url, "alice");
    const broken: Record<string, string>[] = [
      { "sec-websocket-key": "" },
      { connection: "" },
    ];
    for (const headers of broken) {
      const res = await rawUpgrade(stack.chat.port, "/ws", {
        ...headers,
        authorization: `Bearer ${token}`,
      });
      assert.equal(res.status, 400, JSON.stringify(headers));
      assert.equal(JSON.parse(res.body).error, "invalid_request");
    }
    assert.equal(stack.chat.connections, 0);
    // The refused attempts gave their address reservations back.
    const alice = await TestClient.connect(stack.chat.url, token);
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("an unreachable or slow auth server gives 503 auth_unavailable, not 401 and not a hang", async () => {
  const { createChatServer } = await import("../chat/server.ts");
  const dataDir = await Deno.makeTempDir();
  // A listener that accepts and never answers: a hung auth server.
  const silent = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const c of silent) held.push(c);
  })();
  const closedPort = (() => {
    const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = l.addr.port;
    l.close();
    return port;
  })();
  for (
    const authUrl of [
      `http://127.0.0.1:${closedPort}`,
      `http://127.0.0.1:${silent.addr.port}`,
    ]
  ) {
    const logs: string[] = [];
    const chat = await createChatServer({
      port: 0,
      dataDir,
      authUrl,
      authTimeoutMs: 300,
      log: (line) => logs.push(line),
    });
    try {
      const started = Date.now();
      const res = await rawUpgrade(chat.port, "/ws", {
        authorization: "Bearer abc",
      });
      assert.equal(res.status, 503);
      assert.equal(JSON.parse(res.body).error, "auth_unavailable");
      assert.ok(Date.now() - started < 2000);
      // More refusals of the same outage: not one log line each.
      for (let i = 0; i < 3; i++) {
        const again = await rawUpgrade(chat.port, "/ws", {
          authorization: "Bearer abc",
        });
        assert.equal(again.status, 503);
      }
      // (The watch of the session events logs its own line, once.)
      assert.equal(
        logs.filter((l) => l.includes("Cannot reach the auth server")).length,
        1,
        logs.join("\n"),
      );
    } finally {
      await chat.shutdown();
    }
  }
  silent.close();
  for (const c of held) c.close();
  await accepting.catch(() => {});
  await Deno.remove(dataDir, { recursive: true });
});

Deno.test("welcome gives the user, the lobby, its users and its recent history", async () => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    for (let i = 1; i <= 55; i++) {
      alice.send({ type: "message", text: `m${i}` });
    }
    await alice.next((f) => f.type === "message" && f.text === "m55");
    const bob = new TestClient(
      stack.chat.url,
      await login(stack.auth.url, "Bob"),
    );
    const welcome = await bob.nextOfType("welcome");
    assert.equal(welcome.username, "Bob");
    assert.equal(welcome.room, "lobby");
    assert.deepEqual(welcome.rooms, ["lobby"]);
    assert.deepEqual(welcome.users, ["Bob", "alice"]);
    const history = welcome.history as { text: string; id: string }[];
    assert.equal(history.length, 50);
    assert.equal(history[0]!.text, "m6");
    assert.equal(history[49]!.text, "m55");
    assert.equal(history[49]!.id, "55");
    const join = await alice.nextOfType("join");
    assert.deepEqual([join.room, join.user], ["lobby", "Bob"]);
    await bob.close();
    const leave = await alice.nextOfType("leave");
    assert.deepEqual([leave.room, leave.user], ["lobby", "Bob"]);
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a message reaches everyone in the room; only the sender's echo carries client_id", async () => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    const alice2 = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    alice.send({ type: "message", text: "  hi all  ", client_id: "c-1" });
    const echo = await alice.nextOfType("message");
    const other = await alice2.nextOfType("message");
    const seen = await bob.nextOfType("message");
    assert.equal(echo.text, "hi all");
    assert.equal(echo.client_id, "c-1");
    assert.equal(other.client_id, "c-1");
    assert.equal(seen.client_id, undefined);
    assert.equal(seen.from, "alice");
    assert.equal(seen.room, "lobby");
    assert.equal(seen.id, echo.id);
    assert.ok(!Number.isNaN(Date.parse(String(seen.ts))));
    for (const c of [alice, alice2, bob]) await c.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a text frame that is not a JSON object is a message whose text is the frame", async () => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    for (const raw of ["hello", "null", "[1,2]", "42"]) {
      alice.send(raw);
      const m = await alice.nextOfType("message");
      assert.equal(m.text, raw);
    }
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("bad frames get error frames and the connection stays open", async (t) => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    const cases: [string, unknown, string][] = [
      ["unknown type", { type: "explode" }, "invalid_frame"],
      ["missing type", { text: "x" }, "invalid_frame"],
      ["empty text", { type: "message", text: "   " }, "invalid_frame"],
      ["non-string text", { type: "message", text: 5 }, "invalid_frame"],
      [
        "too long",
        { type: "message", text: "x".repeat(4001) },
        "message_too_long",
      ],
      ["bad room name", { type: "join", room: "no spaces" }, "invalid_frame"],
      [
        "room too long",
        { type: "join", room: "a".repeat(33) },
        "invalid_frame",
      ],
      [
        "room not joined",
        { type: "message", text: "x", room: "dev" },
        "unknown_room",
      ],
      ["who of a missing room", { type: "who", room: "ghost" }, "unknown_room"],
      [
        "history of a missing room",
        { type: "history", room: "ghost" },
        "unknown_room",
      ],
      [
        "before and after",
        { type: "history", before: "5", after: "1" },
        "invalid_frame",
      ],
      ["limit 0", { type: "history", limit: 0 }, "invalid_frame"],
      ["limit 501", { type: "history", limit: 501 }, "invalid_frame"],
      ["dm to nobody", { type: "dm", to: "nobody", text: "x" }, "unknown_user"],
      // No account can have it, so no user with that name is connected.
      ["dm to a bad name", { type: "dm", to: "x", text: "x" }, "unknown_user"],
      ["dm to a name with a space", {
        type: "dm",
        to: "no body",
        text: "x",
      }, "unknown_user"],
      ["dm to a number", { type: "dm", to: 5, text: "x" }, "invalid_frame"],
      // U+212A lower-cases to an ASCII "k", but is not one.
      [
        "join the Kelvin sign",
        { type: "join", room: "\u212a" },
        "invalid_frame",
      ],
    ];
    for (const [name, frame, code] of cases) {
      await t.step(name, async () => {
        alice.send(JSON.stringify(frame));
        const err = await alice.nextOfType("error");
        assert.equal(err.error, code);
        assert.equal(typeof err.message, "string");
      });
    }
    await t.step("4000 emoji (code points) are not too long", async () => {
      alice.send({ type: "message", text: "😀".repeat(4000) });
      const m = await alice.next((f) =>
        f.type === "message" || f.type === "error"
      );
      assert.equal(m.type, "message");
    });
    await t.step("a binary frame is invalid", async () => {
      alice.socket.send(new Uint8Array([1, 2, 3]));
      assert.equal((await alice.nextOfType("error")).error, "invalid_frame");
    });
    await alice.sync();
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a frame over 64 KiB closes the connection with 1009", async () => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    alice.send({ type: "message", text: "x".repeat(70_000) });
    const event = await alice.closed;
    assert.equal(event.code, 1009);
  } finally {
    await stack.close();
  }
});

Deno.test("rooms: join, current room, who, rooms, leave and presence", async () => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    alice.send({ type: "join", room: "Dev" });
    const joined = await alice.nextOfType("joined");
    assert.equal(joined.room, "dev");
    assert.deepEqual(joined.users, ["alice"]);
    assert.deepEqual(joined.history, []);
    bob.send({ type: "join", room: "dev" });
    assert.deepEqual((await bob.nextOfType("joined")).users, ["alice", "bob"]);
    const presence = await alice.next((f) =>
      f.type === "join" && f.room === "dev"
    );
    assert.equal(presence.user, "bob");
    // No room: the current room, the last one joined.
    alice.send({ type: "message", text: "in dev" });
    assert.equal((await bob.nextOfType("message")).room, "dev");
    alice.send({ type: "who" });
    assert.deepEqual(await alice.nextOfType("who"), {
      type: "who",
      room: "dev",
      users: ["alice", "bob"],
    });
    // Re-joining answers with the room's history, now holding the message.
    alice.send({ type: "join", room: "dev" });
    const rejoined = await alice.nextOfType("joined");
    assert.deepEqual(
      (rejoined.history as { text: string }[]).map((m) => m.text),
      ["in dev"],
    );
    alice.send({ type: "rooms" });
    const rooms = await alice.nextOfType("rooms");
    assert.deepEqual(rooms.rooms, [{ name: "dev", users: 2 }, {
      name: "lobby",
      users: 2,
    }]);
    alice.send({ type: "leave", room: "dev" });
    assert.deepEqual(await alice.nextOfType("left"), {
      type: "left",
      room: "dev",
    });
    const gone = await bob.next((f) => f.type === "leave" && f.room === "dev");
    assert.equal(gone.user, "alice");
    bob.send({ type: "who", room: "dev" });
    assert.deepEqual((await bob.nextOfType("who")).users, ["bob"]);
    // Back in lobby as current; lobby can be left, then nothing is current.
    alice.send({ type: "message", text: "lobby again" });
    assert.equal((await alice.nextOfType("message")).room, "lobby");
    alice.send({ type: "leave", room: "lobby" });
    await alice.nextOfType("left");
    alice.send({ type: "message", text: "nowhere" });
    assert.equal((await alice.nextOfType("error")).error, "unknown_room");
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("presence waits to be batched, but is never overtaken by what follows it", async () => {
  // Presence alone would wait 10 s: the message must take it along.
  const stack = await startStack({
    chatLimits: { presenceCoalesceMs: 10_000 },
  });
  try {
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    bob.send({ type: "message", text: "hi" });
    bob.send({ type: "leave", room: "lobby" });
    await bob.nextOfType("left");
    // Bob's leave is queued for alice: her pong takes it along.
    alice.send({ type: "ping" });
    await alice.nextOfType("pong");
    const seen = alice.frames.filter((f) => f.type !== "welcome").map((f) =>
      `${f.type}:${f.user ?? f.from ?? ""}`
    );
    assert.deepEqual(seen, ["join:bob", "message:bob", "leave:bob", "pong:"]);
    assert.ok(
      alice.rawFrames.some((raw) =>
        /"type":"join".*\n.*"type":"message"/.test(raw)
      ),
      "the join went out in the same frame as the message",
    );
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("presence is announced on a user's first connection in a room and last one out", async () => {
  const stack = await startStack();
  try {
    const token = await login(stack.auth.url, "alice");
    const bob = await connectAs(stack, "bob");
    const a1 = await TestClient.connect(stack.chat.url, token);
    await bob.nextOfType("join");
    const a2 = await TestClient.connect(stack.chat.url, token);
    a2.send({ type: "join", room: "lobby" });
    const again = await a2.nextOfType("joined");
    assert.deepEqual(again.users, ["alice", "bob"]);
    await a1.close();
    await bob.sync();
    await a2.close();
    const leave = await bob.nextOfType("leave");
    assert.equal(leave.user, "alice");
    // Between the two: exactly one join and one leave for alice.
    const presence = bob.frames.filter((f) =>
      f.type === "join" || f.type === "leave"
    );
    assert.deepEqual(presence.map((f) => f.type), ["join", "leave"]);
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a direct message reaches all of the recipient's and the sender's connections", async () => {
  const stack = await startStack();
  try {
    const at = await login(stack.auth.url, "alice");
    const a1 = await TestClient.connect(stack.chat.url, at);
    const a2 = await TestClient.connect(stack.chat.url, at);
    const bt = await login(stack.auth.url, "bob");
    const b1 = await TestClient.connect(stack.chat.url, bt);
    const b2 = await TestClient.connect(stack.chat.url, bt);
    const carol = await connectAs(stack, "carol");
    a1.send({ type: "dm", to: "BOB", text: "psst" });
    a1.send({ type: "dm", to: "bob", text: "again" });
    for (const c of [a1, a2, b1, b2]) {
      const dm = await c.nextOfType("dm");
      assert.equal(dm.from, "alice");
      assert.equal(dm.to, "bob");
      assert.equal(dm.text, "psst");
      // Ids are numbers in a string, increasing, as room messages' are.
      assert.match(String(dm.id), /^[1-9]\d*$/);
      const next = await c.nextOfType("dm");
      assert.ok(BigInt(String(next.id)) > BigInt(String(dm.id)));
    }
    await carol.sync();
    assert.equal(carol.frames.filter((f) => f.type === "dm").length, 0);
    for (const c of [a1, a2, b1, b2, carol]) await c.close();
  } finally {
    await stack.close();
  }
});

Deno.test("history pages back with before, resumes with after, and reports a gap", async () => {
  const stack = await startStack({ historyKeep: 20 });
  try {
    const alice = await connectAs(stack, "alice");
    for (let i = 1; i <= 30; i++) {
      alice.send({ type: "message", text: `m${i}` });
    }
    await alice.next((f) => f.type === "message" && f.text === "m30");
    alice.send({ type: "history", before: "25", limit: 3 });
    const back = await alice.nextOfType("history");
    assert.deepEqual((back.messages as { id: string }[]).map((m) => m.id), [
      "22",
      "23",
      "24",
    ]);
    alice.send({ type: "history", room: "lobby", after: "27" });
    const resume = await alice.nextOfType("history");
    assert.deepEqual((resume.messages as { id: string }[]).map((m) => m.id), [
      "28",
      "29",
      "30",
    ]);
    assert.equal(resume.gap, undefined);
    alice.send({ type: "history", after: "5", limit: 2 });
    const gap = await alice.nextOfType("history");
    assert.equal(gap.gap, true);
    assert.deepEqual((gap.messages as { id: string }[]).map((m) => m.id), [
      "11",
      "12",
    ]);
    alice.send({ type: "history", limit: 500 });
    assert.equal(
      ((await alice.nextOfType("history")).messages as unknown[]).length,
      20,
    );
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("history survives a restart of the chat server and ids keep increasing", async () => {
  const stack = await startStack();
  try {
    const token = await login(stack.auth.url, "alice");
    const alice = await TestClient.connect(stack.chat.url, token);
    alice.send({ type: "join", room: "dev" });
    await alice.nextOfType("joined");
    alice.send({ type: "message", text: "one" });
    alice.send({ type: "message", text: "two" });
    await alice.next((f) => f.type === "message" && f.text === "two");
    await stack.chat.shutdown();
    assert.equal((await alice.closed).code, 1001);
    const lines =
      (await Deno.readTextFile(`${stack.dataDir}/history/dev.jsonl`)).trim()
        .split("\n");
    assert.equal(lines.length, 2);
    await stack.restartChat();
    const again = await TestClient.connect(stack.chat.url, token);
    again.send({ type: "join", room: "dev" });
    const joined = await again.nextOfType("joined");
    assert.deepEqual(
      (joined.history as { text: string }[]).map((m) => m.text),
      ["one", "two"],
    );
    again.send({ type: "message", text: "three" });
    assert.equal((await again.nextOfType("message")).id, "3");
    again.send({ type: "rooms" });
    const rooms = await again.nextOfType("rooms");
    assert.ok(
      (rooms.rooms as { name: string }[]).some((r) => r.name === "dev"),
    );
    await again.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a repeated client_id is not stored or broadcast again, even after a reconnect", async () => {
  const stack = await startStack();
  try {
    const token = await login(stack.auth.url, "alice");
    const alice = await TestClient.connect(stack.chat.url, token);
    const bob = await connectAs(stack, "bob");
    alice.send({ type: "message", text: "once", client_id: "abc" });
    const first = await alice.nextOfType("message");
    await alice.close();
    const again = await TestClient.connect(stack.chat.url, token);
    again.send({ type: "message", text: "once", client_id: "abc" });
    const echo = await again.nextOfType("message");
    assert.equal(echo.id, first.id);
    assert.equal(echo.client_id, "abc");
    again.send({ type: "message", text: "after" });
    await bob.next((f) => f.type === "message" && f.text === "after");
    assert.equal(
      bob.frames.filter((f) => f.type === "message" && f.text === "once")
        .length,
      1,
    );
    again.send({ type: "history", limit: 10 });
    const h = await again.nextOfType("history");
    assert.deepEqual((h.messages as { text: string }[]).map((m) => m.text), [
      "once",
      "after",
    ]);
    await again.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a client_id sent before a restart of the chat server is still recognised after it, and nobody sees it in history", async () => {
  const stack = await startStack();
  try {
    const token = await login(stack.auth.url, "alice");
    const alice = await TestClient.connect(stack.chat.url, token);
    alice.send({ type: "message", text: "once", client_id: "abc" });
    const first = await alice.nextOfType("message");
    await stack.chat.shutdown();
    assert.equal((await alice.closed).code, 1001);
    await stack.restartChat();
    const bob = await connectAs(stack, "bob");
    const again = await TestClient.connect(stack.chat.url, token);
    again.send({ type: "message", text: "once", client_id: "abc" });
    const echo = await again.nextOfType("message");
    assert.equal(echo.id, first.id);
    assert.equal(echo.client_id, "abc");
    again.send({ type: "message", text: "after" });
    await bob.next((f) => f.type === "message" && f.text === "after");
    assert.equal(
      bob.frames.filter((f) => f.type === "message" && f.text === "once")
        .length,
      0,
    );
    bob.send({ type: "history", limit: 10 });
    const h = await bob.nextOfType("history");
    const messages = h.messages as Record<string, unknown>[];
    assert.deepEqual(messages.map((m) => m.text), ["once", "after"]);
    assert.ok(messages.every((m) => !("client_id" in m)), JSON.stringify(h));
    const welcome = bob.frames.find((f) => f.type === "welcome")!;
    assert.ok(!JSON.stringify(welcome).includes("abc"));
    await again.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a client_id is recognised after a restart even when more than the kept count of messages came after it", async () => {
  const stack = await startStack({ historyKeep: 5 });
  try {
    const token = await login(stack.auth.url, "alice");
    const alice = await TestClient.connect(stack.chat.url, token);
    alice.send({ type: "message", text: "original", client_id: "e1" });
    const first = await alice.nextOfType("message");
    for (let i = 0; i < 12; i++) alice.send({ type: "message", text: `m${i}` });
    await alice.next((f) => f.type === "message" && f.text === "m11");
    await stack.chat.shutdown();
    assert.equal((await alice.closed).code, 1001);
    await stack.restartChat();
    const bob = await connectAs(stack, "bob");
    const again = await TestClient.connect(stack.chat.url, token);
    again.send({ type: "message", text: "resent", client_id: "e1" });
    const echo = await again.nextOfType("message");
    assert.equal(echo.id, first.id);
    assert.equal(echo.text, "original");
    again.send({ type: "message", text: "after" });
    await bob.next((f) => f.type === "message" && f.text === "after");
    assert.ok(
      !bob.frames.some((f) => f.text === "resent" || f.text === "original"),
    );
    await again.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("several messages sent at once arrive coalesced in fewer frames", async () => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    await alice.sync();
    const before = bob.rawFrames.length;
    for (let i = 0; i < 20; i++) {
      alice.send({ type: "message", text: `burst ${i}` });
    }
    await bob.next((f) => f.text === "burst 19");
    const texts = bob.frames.filter((f) => f.type === "message").map((f) =>
      f.text
    );
    assert.deepEqual(texts, Array.from({ length: 20 }, (_, i) => `burst ${i}`));
    assert.ok(bob.rawFrames.length - before < 20, "expected coalesced frames");
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a turn's messages to a room go out as one shared frame, and each connection's frames stay in order", async (t) => {
  // Everything a client sends within 300 ms lands in one flush.
  const stack = await startStack({ chatLimits: { coalesceMs: 300 } });
  try {
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    alice.send({ type: "join", room: "dev" });
    bob.send({ type: "join", room: "dev" });
    await alice.nextOfType("joined");
    await bob.nextOfType("joined");
    await alice.next((f) => f.type === "join" && f.user === "bob");
    const seenBy = (client: TestClient, from: number) =>
      client.frames.slice(from).map((f) =>
        f.type === "message"
          ? `${f.room}:${f.text}${f.client_id ? `+${f.client_id}` : ""}`
          : `${f.type}${f.room ? `:${f.room}` : ""}${
            f.user ? `:${f.user}` : ""
          }`
      );

    await t.step(
      "its own answers and errors between the messages",
      async () => {
        const a = alice.frames.length;
        const b = bob.frames.length;
        const raw = alice.rawFrames.length;
        bob.send({
          type: "message",
          room: "lobby",
          text: "m1",
          client_id: "c1",
        });
        bob.send({ type: "who", room: "lobby" });
        bob.send({ type: "message", room: "lobby", text: "m2" });
        bob.send({ type: "message", room: "nowhere", text: "lost" });
        bob.send({ type: "message", room: "lobby", text: "m3" });
        await bob.next((f) => f.text === "m3");
        await alice.next((f) => f.text === "m3");
        assert.deepEqual(seenBy(bob, b), [
          "lobby:m1+c1",
          "who:lobby",
          "lobby:m2",
          "error",
          "lobby:m3",
        ]);
        assert.deepEqual(seenBy(alice, a), [
          "lobby:m1",
          "lobby:m2",
          "lobby:m3",
        ]);
        // Alice needed nothing else: the three came as the one shared frame.
        assert.equal(alice.rawFrames.length - raw, 1);
      },
    );

    await t.step("leaving and coming back within the turn", async () => {
      const a = alice.frames.length;
      const b = bob.frames.length;
      bob.send({ type: "message", room: "lobby", text: "before" });
      bob.send({ type: "leave", room: "lobby" });
      bob.send({ type: "join", room: "lobby" });
      bob.send({ type: "message", room: "lobby", text: "after" });
      await alice.next((f) => f.text === "after");
      await bob.next((f) => f.text === "after");
      // Bob has "before" once (with the room's history in joined), "after" once.
      assert.deepEqual(seenBy(bob, b), [
        "lobby:before",
        "left:lobby",
        "joined:lobby",
        "lobby:after",
      ]);
      assert.deepEqual(seenBy(alice, a), [
        "lobby:before",
        "leave:lobby:bob",
        "join:lobby:bob",
        "lobby:after",
      ]);
    });

    await t.step("messages to two rooms, in turn", async () => {
      const a = alice.frames.length;
      const b = bob.frames.length;
      for (
        const [room, text] of [
          ["lobby", "l1"],
          ["dev", "d1"],
          ["lobby", "l2"],
          ["dev", "d2"],
        ]
      ) {
        alice.send({ type: "message", room, text });
      }
      await alice.next((f) => f.text === "d2");
      await bob.next((f) => f.text === "d2");
      const want = ["lobby:l1", "dev:d1", "lobby:l2", "dev:d2"];
      assert.deepEqual(seenBy(alice, a), want);
      assert.deepEqual(seenBy(bob, b), want);
    });
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a connection that arrives while a room's messages wait for the flush gets them in its welcome, not again", async () => {
  // The room's batch waits 1 s; its history reaches the file within 20 ms.
  const stack = await startStack({
    chatLimits: { coalesceMs: 1000 },
    historyFlushMs: 20,
  });
  try {
    const alice = await connectAs(stack, "alice");
    alice.send({ type: "message", text: "before carol" });
    // In the file: taken by the server, not sent yet.
    await retryUntil(async () => {
      const file = await Deno.readTextFile(
        `${stack.dataDir}/history/lobby.jsonl`,
      );
      if (!file.includes("before carol")) throw new Error("not in the file");
    }, 5000);
    const carol = await connectAs(stack, "carol");
    const welcome = carol.frames.find((f) => f.type === "welcome")!;
    const history = welcome.history as { text: string }[];
    assert.deepEqual(history.map((m) => m.text), ["before carol"]);
    alice.send({ type: "message", text: "after carol" });
    await carol.next((f) => f.text === "after carol");
    await alice.next((f) => f.text === "after carol");
    assert.deepEqual(
      carol.frames.filter((f) => f.type === "message").map((f) => f.text),
      ["after carol"],
    );
    assert.deepEqual(
      alice.frames.filter((f) => f.type === "message").map((f) => f.text),
      ["before carol", "after carol"],
    );
    await alice.close();
    await carol.close();
  } finally {
    await stack.close();
  }
});

Deno.test("history pages stop at MAX_PAGE_BYTES of messages; paging on reaches every message once", async () => {
  // 300 messages of 8 KB in UTF-8 (4 K characters: the limit counts bytes,
  // not characters), 2.4 MB: one page of them would pass the connection's
  // whole unsent-data budget.
  const dataDir = await Deno.makeTempDir({ prefix: "chat_test_" });
  const text = "\u00e9".repeat(3990);
  await Deno.mkdir(`${dataDir}/history`);
  await Deno.writeTextFile(
    `${dataDir}/history/lobby.jsonl`,
    Array.from({ length: 300 }, (_, i) =>
      JSON.stringify({
        type: "message",
        id: String(i + 1),
        room: "lobby",
        from: "alice",
        text: `${i} ${text}`,
        ts: "2026-01-01T00:00:00.000Z",
      }) + "\n").join(""),
  );
  const stack = await startStack({ dataDir, historyKeep: 1000 });
  try {
    const alice = await connectAs(stack, "alice");
    const bytes = (messages: unknown[]) =>
      new TextEncoder().encode(messages.map((m) => JSON.stringify(m)).join(""))
        .length;
    type Page = { id: string; text: string }[];
    // The newest first, going back with `before`.
    const back: Page[] = [];
    let before: string | undefined;
    for (let i = 0; i < 20; i++) {
      alice.send({ type: "history", limit: 500, ...(before && { before }) });
      const page = (await alice.nextOfType("history")).messages as Page;
      if (page.length === 0) break;
      assert.ok(bytes(page) <= MAX_PAGE_BYTES, `page of ${bytes(page)} bytes`);
      back.unshift(page);
      before = page[0]!.id;
    }
    assert.ok(back.length >= 10, `${back.length} pages`);
    assert.ok(back.at(-1)!.at(-1)!.text.startsWith("299 "));
    // Full pages: one 8 KB message more would have passed the limit.
    assert.ok(bytes(back.at(-1)!) > MAX_PAGE_BYTES - 8100);
    const ids = back.flat().map((m) => Number(m.id));
    assert.deepEqual(ids, Array.from({ length: 300 }, (_, i) => i + 1));
    // The oldest first, going on with `after`.
    const forward: Page = [];
    let after = "0";
    for (let i = 0; i < 20; i++) {
      alice.send({ type: "history", after, limit: 500 });
      const answer = await alice.nextOfType("history");
      const page = answer.messages as Page;
      assert.equal(answer.gap, undefined);
      if (page.length === 0) break;
      assert.ok(bytes(page) <= MAX_PAGE_BYTES, `page of ${bytes(page)} bytes`);
      forward.push(...page);
      after = page.at(-1)!.id;
    }
    assert.deepEqual(forward.map((m) => Number(m.id)), ids);
    // The recent history of a welcome keeps to the same limit.
    const bob = await connectAs(stack, "bob");
    const welcome = bob.frames.find((f) => f.type === "welcome")!;
    const recent = welcome.history as Page;
    assert.ok(recent.length > 0 && recent.length < 50, `${recent.length}`);
    assert.ok(bytes(recent) <= MAX_PAGE_BYTES);
    assert.equal(recent.at(-1)!.id, "300");
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("the rooms answer follows every change of who is where (it is built once per change)", async () => {
  const stack = await startStack();
  try {
    const alice = await connectAs(stack, "alice");
    const alice2 = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    const rooms = async () => {
      bob.send({ type: "rooms" });
      return (await bob.nextOfType("rooms")).rooms;
    };
    const lobby = (users: number) => ({ name: "lobby", users });
    assert.deepEqual(await rooms(), [lobby(2)]);
    alice.send({ type: "join", room: "dev" });
    await alice.nextOfType("joined");
    assert.deepEqual(await rooms(), [{ name: "dev", users: 1 }, lobby(2)]);
    // A second connection of the same user is not a second user.
    alice2.send({ type: "join", room: "dev" });
    await alice2.nextOfType("joined");
    assert.deepEqual(await rooms(), [{ name: "dev", users: 1 }, lobby(2)]);
    bob.send({ type: "join", room: "ops" });
    await bob.nextOfType("joined");
    bob.send({ type: "message", room: "ops", text: "kept" });
    await bob.nextOfType("message");
    assert.deepEqual(await rooms(), [
      { name: "dev", users: 1 },
      lobby(2),
      { name: "ops", users: 1 },
    ]);
    // Empty again: a room without history goes, one with history stays.
    bob.send({ type: "leave", room: "ops" });
    await bob.nextOfType("left");
    alice.send({ type: "leave", room: "dev" });
    await alice.nextOfType("left");
    assert.deepEqual(await rooms(), [
      { name: "dev", users: 1 },
      lobby(2),
      { name: "ops", users: 0 },
    ]);
    await alice2.close();
    await alice.close();
    // Their closes reach the server on its next turns.
    await retryUntil(async () => {
      assert.deepEqual(await rooms(), [lobby(1), { name: "ops", users: 0 }]);
    }, 5000);
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a flood past the history's memory budget costs its own room's oldest messages, not the others' history", async () => {
  const stack = await startStack({ historyMaxBytes: 200_000 });
  try {
    const alice = await connectAs(stack, "alice");
    for (let i = 1; i <= 5; i++) alice.send({ type: "message", text: `q${i}` });
    await alice.next((f) => f.type === "message" && f.text === "q5");
    const mallory = await connectAs(stack, "mallory");
    mallory.send({ type: "join", room: "flood" });
    await mallory.nextOfType("joined");
    const long = "y".repeat(3990);
    for (let i = 1; i <= 60; i++) {
      mallory.send({ type: "message", text: `${i} ${long}` });
    }
    await mallory.next((f) =>
      f.type === "message" && f.room === "flood" &&
      String(f.text).startsWith("60 ")
    );
    const bob = await connectAs(stack, "bob");
    const welcome = bob.frames.find((f) => f.type === "welcome")!;
    assert.deepEqual(
      (welcome.history as { text: string }[]).map((m) => m.text),
      ["q1", "q2", "q3", "q4", "q5"],
    );
    bob.send({ type: "history", room: "flood", after: "0", limit: 500 });
    const flood = await bob.nextOfType("history");
    assert.equal(flood.gap, true);
    const ids = (flood.messages as { id: string }[]).map((m) => Number(m.id));
    assert.ok(ids.length > 0 && ids.length < 25, `${ids.length} kept`);
    assert.equal(ids.at(-1), 60);
    for (const c of [alice, mallory, bob]) await c.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a message the server cannot write to its room's file is refused with storage_unavailable, sent to nobody, and taken once the file can be written again", async () => {
  const stack = await startStack({ historyFlushMs: 20, rateLimits: false });
  try {
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    alice.send({ type: "message", text: "one", client_id: "c-1" });
    await bob.next((f) => f.type === "message" && f.text === "one");
    // The room's file can no longer be written (a directory in its place
    // fails every append and every rewrite, as a full disk does, even for
    // root).
    const file = `${stack.dataDir}/history/lobby.jsonl`;
    await Deno.remove(file);
    await Deno.mkdir(`${file}/blocked`, { recursive: true });
    alice.send({ type: "message", text: "two", client_id: "c-2" });
    const refused = await alice.nextOfType("error");
    assert.equal(refused.error, "storage_unavailable");
    assert.equal(typeof refused.retry_after_ms, "number");
    assert.match(String(refused.message), /#lobby/);
    // Nobody got it: bob's next message frame is the one sent after the repair.
    await Deno.remove(file, { recursive: true });
    const echo = await retryUntil(async () => {
      alice.send({ type: "message", text: "two", client_id: "c-2" });
      const answer = await alice.next((f) =>
        f.type === "error" || (f.type === "message" && f.text === "two")
      );
      assert.equal(answer.type, "message", JSON.stringify(answer));
      return answer;
    }, 5000);
    assert.equal(echo.id, "2");
    const got = await bob.nextOfType("message");
    assert.equal(got.text, "two");
    assert.equal(got.id, "2");
    await stack.chat.shutdown();
    const lines = (await Deno.readTextFile(file)).trim().split("\n");
    assert.deepEqual(lines.map((l) => JSON.parse(l).text), ["one", "two"]);
  } finally {
    await stack.close();
  }
});
