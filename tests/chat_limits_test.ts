import assert from "node:assert/strict";
import { tokenHash } from "../token_hash.ts";
import {
  clientWireFrame,
  closedWithin,
  connectAs,
  login,
  openRawWebSocket,
  rawUpgrade,
  readRawFrames,
  retryUntil,
  type Stack,
  startStack,
  TestClient,
  waitFor,
} from "./_harness.ts";

Deno.test("messages over the per-user rate get rate_limited with retry_after_ms", async () => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: { messageBurst: 3, messagesPerSecond: 0.5 },
  });
  try {
    const token = await login(stack.auth.url, "alice");
    const a1 = await TestClient.connect(stack.chat.url, token);
    const a2 = await TestClient.connect(stack.chat.url, token);
    // The bucket is the user's, shared by both connections.
    a1.send({ type: "message", text: "1" });
    a2.send({ type: "message", text: "2" });
    a1.send({ type: "message", text: "3" });
    await a1.next((f) => f.text === "3");
    a2.send({ type: "message", text: "4" });
    const err = await a2.nextOfType("error");
    assert.equal(err.error, "rate_limited");
    assert.equal(typeof err.retry_after_ms, "number");
    assert.ok(
      Number(err.retry_after_ms) > 0 && Number(err.retry_after_ms) <= 2000,
    );
    await a2.sync();
    await a1.close();
    await a2.close();
  } finally {
    await stack.close();
  }
});

Deno.test("sustained flooding closes the connection with 1008", async () => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: { messageBurst: 2, messagesPerSecond: 0.1, floodStrikes: 5 },
  });
  try {
    const alice = await connectAs(stack, "alice");
    // A client that keeps sending whatever it is told, one frame per answer.
    for (let i = 0; i < 50 && alice.socket.readyState === WebSocket.OPEN; i++) {
      alice.send({ type: "message", text: `spam ${i}` });
      await alice.next((f) => f.type === "message" || f.type === "error").catch(
        () => {},
      );
    }
    const event = await alice.closed;
    assert.equal(event.code, 1008);
    const limited = alice.frames.filter((f) =>
      f.error === "rate_limited"
    ).length;
    assert.ok(
      limited >= 4,
      `expected warnings before the close, got ${limited}`,
    );
  } finally {
    await stack.close();
  }
});

Deno.test("a join that would create a room beyond maxRooms gets too_many_rooms; existing rooms can still be joined, and an emptied room makes space", async () => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: { maxRooms: 3 },
  });
  try {
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    // lobby, a (with history) and b (members only): three.
    alice.send({ type: "join", room: "a" });
    await alice.next((f) => f.type === "joined" && f.room === "a");
    alice.send({ type: "message", room: "a", text: "kept" });
    await alice.next((f) => f.type === "message" && f.text === "kept");
    alice.send({ type: "leave", room: "a" });
    await alice.next((f) => f.type === "left" && f.room === "a");
    bob.send({ type: "join", room: "b" });
    await bob.next((f) => f.type === "joined" && f.room === "b");

    alice.send({ type: "join", room: "c" });
    const refused = await alice.next((f) => f.type === "error");
    assert.equal(refused.error, "too_many_rooms");
    assert.match(String(refused.message), /^Cannot create #c: /);
    // Rooms that exist stay open to everyone.
    alice.send({ type: "join", room: "a" });
    await alice.next((f) => f.type === "joined" && f.room === "a");
    alice.send({ type: "join", room: "b" });
    await alice.next((f) => f.type === "joined" && f.room === "b");
    // b empties (no history): it is gone, and c fits.
    for (const client of [alice, bob]) {
      client.send({ type: "leave", room: "b" });
      await client.next((f) => f.type === "left" && f.room === "b");
    }
    alice.send({ type: "join", room: "c" });
    await alice.next((f) => f.type === "joined" && f.room === "c");
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a join past the rooms a connection may be in gets too_many_rooms, with the limits off too; leaving one makes space", async () => {
  const stack = await startStack({
    rateLimits: false,
    chatLimits: { maxRoomsPerConnection: 2 },
  });
  try {
    const alice = await connectAs(stack, "alice");
    alice.send({ type: "join", room: "a" });
    await alice.next((f) => f.type === "joined" && f.room === "a");
    alice.send({ type: "join", room: "b" });
    const refused = await alice.next((f) => f.type === "error");
    assert.equal(refused.error, "too_many_rooms");
    assert.match(String(refused.message), /at most 2 rooms/);
    // Already in: a re-join is no new room.
    alice.send({ type: "join", room: "lobby" });
    await alice.next((f) => f.type === "joined" && f.room === "lobby");
    alice.send({ type: "leave", room: "a" });
    await alice.next((f) => f.type === "left" && f.room === "a");
    alice.send({ type: "join", room: "b" });
    await alice.next((f) => f.type === "joined" && f.room === "b");
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("binary frames count toward the frame rate: a flood of them is refused, then closed with 1008", async () => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: { frameBurst: 5, framesPerSecond: 0.1, floodStrikes: 3 },
  });
  try {
    const alice = await connectAs(stack, "alice");
    for (let i = 0; i < 50 && alice.socket.readyState === WebSocket.OPEN; i++) {
      alice.socket.send(new Uint8Array([1, 2, 3]));
      await alice.next((f) => f.type === "error").catch(() => {});
    }
    assert.notEqual(alice.socket.readyState, WebSocket.OPEN, "never closed");
    const event = await alice.closed;
    assert.equal(event.code, 1008);
    const errors = alice.frames.filter((f) => f.type === "error");
    assert.equal(
      errors.filter((f) => f.error === "invalid_frame").length,
      5,
      JSON.stringify(errors),
    );
    assert.ok(errors.some((f) => f.error === "rate_limited"));
  } finally {
    await stack.close();
  }
});

Deno.test("a flood that arrives in one write is answered, then closed with 1008 or 1009", async (t) => {
  const stack = await startStack({ rateLimits: true });
  try {
    const token = await login(stack.auth.url, "alice");
    const concat = (frames: Uint8Array[]) => {
      const all = new Uint8Array(frames.reduce((n, f) => n + f.length, 0));
      let at = 0;
      for (const f of frames) {
        all.set(f, at);
        at += f.length;
      }
      return all;
    };
    await t.step(
      "200 pings at once: rate_limited warnings, then 1008",
      async () => {
        const conn = await openRawWebSocket(stack.chat.port, token);
        try {
          const ping = clientWireFrame(1, '{"type":"ping"}');
          await conn.write(concat(Array.from({ length: 200 }, () => ping)));
          const reading = await readRawFrames(conn);
          assert.equal(reading.closeCode, 1008);
          const frames = reading.texts.flatMap((t) => t.split("\n"))
            .map((l) => JSON.parse(l));
          assert.equal(frames[0].type, "welcome");
          assert.ok(frames.some((f) => f.type === "pong"));
          assert.ok(frames.some((f) => f.error === "rate_limited"));
        } finally {
          conn.close();
        }
      },
    );
    await t.step(
      "a ping then a 70 KiB frame at once: pong, then 1009",
      async () => {
        const conn = await openRawWebSocket(stack.chat.port, token);
        try {
          await conn.write(concat([
            clientWireFrame(1, '{"type":"ping"}'),
            clientWireFrame(1, "x".repeat(70 * 1024)),
            clientWireFrame(1, '{"type":"ping"}'),
          ]));
          const reading = await readRawFrames(conn);
          assert.equal(reading.closeCode, 1009);
          const types = reading.texts.flatMap((t) => t.split("\n"))
            .map((l) => JSON.parse(l).type);
          assert.deepEqual(types, ["welcome", "pong"]);
        } finally {
          conn.close();
        }
      },
    );
  } finally {
    await stack.close();
  }
});

Deno.test("connections over the per-user or per-address cap get 429 before any upgrade", async (t) => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: { maxConnectionsPerUser: 2, maxConnectionsPerAddress: 3 },
  });
  try {
    const token = await login(stack.auth.url, "alice");
    const a1 = await TestClient.connect(stack.chat.url, token);
    const a2 = await TestClient.connect(stack.chat.url, token);
    await t.step("per user", async () => {
      const res = await rawUpgrade(stack.chat.port, "/ws", {
        authorization: `Bearer ${token}`,
      });
      assert.equal(res.status, 429);
      assert.equal(JSON.parse(res.body).error, "too_many_connections");
    });
    const bob = await connectAs(stack, "bob");
    await t.step("per address", async () => {
      const carol = await login(stack.auth.url, "carol");
      const res = await rawUpgrade(stack.chat.port, "/ws", {
        authorization: `Bearer ${carol}`,
      });
      assert.equal(res.status, 429);
      assert.equal(JSON.parse(res.body).error, "too_many_connections");
    });
    await t.step("a closed connection frees its place", async () => {
      await a1.close();
      await waitFor(
        () => stack.chat.connections === 2,
        5000,
        "the close to be seen",
      );
      const again = await TestClient.connect(stack.chat.url, token);
      await again.close();
    });
    await a2.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("simultaneous upgrades of one user cannot pass the per-user cap together", async () => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: { maxConnectionsPerUser: 3 },
  });
  const conns: Deno.Conn[] = [];
  try {
    const token = await login(stack.auth.url, "alice");
    conns.push(
      ...await Promise.all(
        Array.from(
          { length: 12 },
          () => openRawWebSocket(stack.chat.port, token),
        ),
      ),
    );
    const statuses = await Promise.all(conns.map(async (conn) => {
      const buf = new Uint8Array(64);
      const n = await conn.read(buf);
      return Number(
        new TextDecoder().decode(buf.subarray(0, n ?? 0)).split(" ")[1],
      );
    }));
    assert.equal(statuses.filter((s) => s === 101).length, 3, `${statuses}`);
    assert.equal(statuses.filter((s) => s === 429).length, 9, `${statuses}`);
  } finally {
    for (const conn of conns) conn.close();
    await stack.close();
  }
});

Deno.test("an upgrade the client abandons during the token check gives its place back", async () => {
  const { createChatServer } = await import("../chat/server.ts");
  const dataDir = await Deno.makeTempDir();
  // An auth server that answers only when told to.
  let arrived = () => {};
  const arrival = new Promise<void>((resolve) => arrived = resolve);
  let answer = () => {};
  const answered = new Promise<void>((resolve) => answer = resolve);
  const auth = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async () => {
      arrived();
      await answered;
      return Response.json({
        valid: true,
        username: "alice",
        expires_at: new Date(Date.now() + 3_600_000).toISOString(),
      });
    },
  );
  const chat = await createChatServer({
    port: 0,
    dataDir,
    authUrl: `http://127.0.0.1:${auth.addr.port}`,
    limits: { maxConnectionsPerUser: 1, handshakeTimeoutMs: 300 },
    // An auth server of the contract only: no session events to watch.
    sessionEvents: "none",
  });
  try {
    const gone = await openRawWebSocket(chat.port, "t1");
    await arrival;
    gone.close();
    answer();
    // The abandoned socket never opens nor closes; after the handshake
    // deadline its place is free again.
    const statuses: number[] = [];
    const deadline = Date.now() + 5000;
    while (statuses.at(-1) !== 101 && Date.now() < deadline) {
      const res = await rawUpgrade(chat.port, "/ws", {
        authorization: "Bearer t1",
      });
      statuses.push(res.status);
      if (res.status !== 101) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
    assert.equal(statuses.at(-1), 101, `${statuses}`);
    // Before the deadline the abandoned upgrade still held the only place.
    assert.equal(statuses[0], 429, `${statuses}`);
  } finally {
    await chat.shutdown();
    await auth.shutdown();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("open sessions are re-checked once per distinct token, not per connection", async () => {
  const { createChatServer } = await import("../chat/server.ts");
  const dataDir = await Deno.makeTempDir();
  // An auth server that counts the checks of each token; "t2" can be revoked.
  const calls = new Map<string, number>();
  let revoked = "";
  const auth = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    (req) => {
      const token = req.headers.get("authorization")!.slice("Bearer ".length);
      calls.set(token, (calls.get(token) ?? 0) + 1);
      if (token === revoked) {
        return Response.json({ valid: false, error: "invalid_token" }, {
          status: 401,
        });
      }
      return Response.json({
        valid: true,
        username: `user-${token}`,
        expires_at: new Date(Date.now() + 3_600_000).toISOString(),
      });
    },
  );
  const chat = await createChatServer({
    port: 0,
    dataDir,
    authUrl: `http://127.0.0.1:${auth.addr.port}`,
    limits: { recheckIntervalMs: 300 },
    // An auth server of the contract only: the re-checks are all there is.
    sessionEvents: "none",
  });
  const clients: TestClient[] = [];
  try {
    for (const token of ["t1", "t1", "t1", "t2", "t2", "t3"]) {
      clients.push(await TestClient.connect(chat.url, token));
    }
    const upgrades = new Map(calls);
    // Wait for three rounds of re-checks of the one-connection session.
    await waitFor(
      () => (calls.get("t3") ?? 0) - (upgrades.get("t3") ?? 0) >= 3,
      5000,
      "three re-checks of t3",
    );
    const rechecks = (token: string) =>
      (calls.get(token) ?? 0) - (upgrades.get(token) ?? 0);
    // Three connections of t1 cost no more calls than the one of t3.
    assert.ok(
      rechecks("t1") <= rechecks("t3") + 1,
      `t1 ${rechecks("t1")}, t3 ${rechecks("t3")}`,
    );
    revoked = "t2";
    const [a, b] = await Promise.all([clients[3]!.closed, clients[4]!.closed]);
    assert.equal(a.code, 1008);
    assert.equal(b.code, 1008);
    // The other sessions stay.
    await clients[0]!.sync();
    await clients[5]!.sync();
  } finally {
    for (const c of clients) {
      if (c.socket.readyState === WebSocket.OPEN) await c.close();
    }
    await chat.shutdown();
    await auth.shutdown();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a client that stops reading is closed with 1013 while others keep receiving", async () => {
  const stack = await startStack();
  try {
    const slowToken = await login(stack.auth.url, "slow");
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    // A raw TCP client that completes the handshake and then never reads.
    const slow = await openRawWebSocket(stack.chat.port, slowToken);
    await bob.next((f) => f.type === "join" && f.user === "slow");
    // Batches that bob reads as they come, while the slow client's backlog grows.
    const text = "x".repeat(3900);
    let sent = 0;
    let dropped = false;
    while (!dropped && sent < 4000) {
      for (let i = 0; i < 100; i++) {
        alice.send({ type: "message", text: `${sent++} ${text}` });
      }
      const last = `${sent - 1} `;
      await bob.next(
        (f) => f.type === "message" && String(f.text).startsWith(last),
        5000,
      );
      dropped = bob.frames.some((f) => f.type === "leave" && f.user === "slow");
    }
    assert.ok(
      dropped,
      `the slow client was not dropped after ${sent} messages`,
    );
    const received = bob.frames.filter((f) => f.type === "message").length;
    assert.equal(received, sent);
    assert.equal(stack.chat.connections, 2);
    // Reading now drains what was buffered for it, up to the close frame.
    assert.equal(await readCloseCode(slow), 1013);
    slow.close();
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a connection whose session is revoked or expires is closed with 1008", async (t) => {
  await t.step("revoked by /logout", async () => {
    const stack = await startStack({ chatLimits: { recheckIntervalMs: 100 } });
    try {
      const token = await login(stack.auth.url, "alice");
      const other = await login(stack.auth.url, "alice");
      const alice = await TestClient.connect(stack.chat.url, token);
      const stays = await TestClient.connect(stack.chat.url, other);
      const res = await fetch(`${stack.auth.url}/logout`, {
        method: "POST",
        headers: { authorization: `Bearer ${token}` },
      });
      await res.body?.cancel();
      assert.equal((await alice.closed).code, 1008);
      // The user's other session is untouched.
      await stays.sync();
      await stays.close();
    } finally {
      await stack.close();
    }
  });
  await t.step(
    "ended in this process (endSessions): at once, an upgrade still opening too",
    async () => {
      // No re-check would come in time: a tick a second, every 30 s.
      const stack = await startStack({
        chatLimits: { recheckIntervalMs: 30_000 },
      });
      try {
        const token = await login(stack.auth.url, "alice");
        const other = await login(stack.auth.url, "alice");
        const alice = await TestClient.connect(stack.chat.url, token);
        const stays = await TestClient.connect(stack.chat.url, other);
        stack.chat.endSessions([tokenHash(token)]);
        const event = await alice.closed;
        assert.equal(event.code, 1008);
        assert.equal(event.reason, "session ended");
        // The auth server still says valid here (as for an upgrade whose
        // check came just before the logout): it opens, and is closed.
        const late = new TestClient(stack.chat.url, token);
        assert.equal((await late.closed).code, 1008);
        assert.equal(late.frames.length, 0);
        await stays.sync();
        await stays.close();
      } finally {
        await stack.close();
      }
    },
  );
  await t.step(
    "expired: at its expires_at, not at the next re-check",
    async () => {
      // Re-checks every 30 s (a tick a second): expiry must not wait for one.
      const stack = await startStack({
        sessionTtlSeconds: 1,
        chatLimits: { recheckIntervalMs: 30_000 },
      });
      let timer: ReturnType<typeof setTimeout> | undefined;
      try {
        const alice = await connectAs(stack, "alice");
        const event = await Promise.race([
          alice.closed,
          new Promise<never>((_, reject) =>
            timer = setTimeout(
              () => reject(new Error("not closed 5 s after expiry (TTL 1 s)")),
              6000,
            )
          ),
        ]);
        assert.equal(event.code, 1008);
        assert.equal(event.reason, "session expired");
      } finally {
        clearTimeout(timer);
        await stack.close();
      }
    },
  );
});

Deno.test("a Host header that names no host gets 400 invalid_request from both servers, not a 500", async () => {
  const stack = await startStack();
  try {
    const token = await login(stack.auth.url, "alice");
    const authPort = Number(new URL(stack.auth.url).port);
    // Paths that exist nowhere: "x/health?" must not turn them into /health.
    for (
      const host of ["a b", "[zz]", "[fe80::1%25eth0]", "x/health?", "x#"]
    ) {
      const plain = { upgrade: "", connection: "", host };
      for (
        const [port, path] of [[authPort, "/nowhere"], [
          stack.chat.port,
          "/nowhere",
        ]] as const
      ) {
        const res = await rawUpgrade(port, path, plain);
        assert.equal(res.status, 400, `${host} ${port}`);
        assert.equal(JSON.parse(res.body).error, "invalid_request");
      }
      const upgrade = await rawUpgrade(stack.chat.port, "/ws", {
        authorization: `Bearer ${token}`,
        host,
      });
      assert.equal(upgrade.status, 400, host);
    }
    assert.equal((await fetch(`${stack.chat.httpUrl}/health`)).status, 200);
  } finally {
    await stack.close();
  }
});

Deno.test("an upgrade from a foreign Origin gets 403; the own origin and ALLOWED_ORIGINS pass", async () => {
  const stack = await startStack({
    allowedOrigins: ["https://chat.example.org"],
  });
  try {
    const token = await login(stack.auth.url, "alice");
    const auth = { authorization: `Bearer ${token}` };
    const evil = await rawUpgrade(stack.chat.port, "/ws", {
      ...auth,
      origin: "https://evil.example",
    });
    assert.equal(evil.status, 403);
    assert.equal(JSON.parse(evil.body).error, "origin_not_allowed");
    const own = await rawUpgrade(stack.chat.port, "/ws", {
      ...auth,
      origin: `http://127.0.0.1:${stack.chat.port}`,
    });
    assert.equal(own.status, 101);
    const listed = await rawUpgrade(stack.chat.port, "/ws", {
      ...auth,
      origin: "https://chat.example.org",
    });
    assert.equal(listed.status, 101);
    // A page whose name was made to point here sends that name as Host
    // and as Origin: not the server's own unless listed.
    for (const host of ["evil.example", `evil.example:${stack.chat.port}`]) {
      const rebound = await rawUpgrade(stack.chat.port, "/ws", {
        ...auth,
        host,
        origin: `http://${host}`,
      });
      assert.equal(rebound.status, 403, host);
    }
    // The address it listens on, by the name it was given (here an
    // address; CHAT_HOST=chat.lan works the same), is its own whatever the
    // Host says.
    const listened = await rawUpgrade(stack.chat.port, "/ws", {
      ...auth,
      host: "chat.lan",
      origin: `http://127.0.0.1:${stack.chat.port}`,
    });
    assert.equal(listened.status, 101);
    for (const host of [`localhost:${stack.chat.port}`, "[::1]:8001"]) {
      const own = await rawUpgrade(stack.chat.port, "/ws", {
        ...auth,
        host,
        origin: `http://${host}`,
      });
      assert.equal(own.status, 101, host);
    }
  } finally {
    await stack.close();
  }
});

Deno.test("with a public address (CHAT_PUBLIC_URL), its path upgrades as well as /ws, and its origin is the server's own", async () => {
  const stack = await startStack({ publicUrl: "wss://chat.example.com/chat" });
  try {
    const token = await login(stack.auth.url, "alice");
    const auth = { authorization: `Bearer ${token}` };
    for (const path of ["/chat", "/ws"]) {
      assert.equal((await rawUpgrade(stack.chat.port, path, auth)).status, 101);
    }
    const other = await rawUpgrade(stack.chat.port, "/other", auth);
    assert.equal(other.status, 404);
    const page = await rawUpgrade(stack.chat.port, "/chat", {
      ...auth,
      origin: "https://chat.example.com",
    });
    assert.equal(page.status, 101);
    const evil = await rawUpgrade(stack.chat.port, "/chat", {
      ...auth,
      origin: "http://chat.example.com",
    });
    assert.equal(evil.status, 403, "wss: the page's origin is https");
  } finally {
    await stack.close();
  }
});

Deno.test("shutdown closes with 1001 a client that keeps sending all along (its close handshake is not cut short)", async () => {
  const stack = await startStack();
  try {
    for (let round = 0; round < 4; round++) {
      const flooder = await connectAs(stack, "flooder");
      let sent = 0;
      let stop = false;
      // Bounded: at most 20,000 frames, 5 a tick, until the close.
      const flood = (async () => {
        while (!stop && sent < 20_000) {
          try {
            for (let i = 0; i < 5; i++) {
              flooder.send({ type: "message", text: `m${sent++}` });
            }
          } catch {
            return;
          }
          await new Promise((resolve) => setTimeout(resolve, 0));
        }
      })();
      await flooder.next((f) => f.type === "message" && f.text === "m100");
      const down = stack.chat.shutdown();
      const event = await closedWithin(flooder, 5000);
      stop = true;
      await Promise.all([flood, down]);
      assert.equal(event.code, 1001, `round ${round}: ${event.reason}`);
      await stack.restartChat();
    }
  } finally {
    await stack.close();
  }
});

Deno.test("shutdown closes every WebSocket with 1001 and flushes history", async () => {
  const stack = await startStack({ historyFlushMs: 60_000 });
  try {
    const alice = await connectAs(stack, "alice");
    alice.send({ type: "message", text: "keep me" });
    await alice.nextOfType("message");
    await stack.chat.shutdown();
    assert.equal((await alice.closed).code, 1001);
    const text = await Deno.readTextFile(
      `${stack.dataDir}/history/lobby.jsonl`,
    );
    assert.match(text, /keep me/);
  } finally {
    await stack.close();
  }
});

Deno.test("shutdown stops accepting within moments, even with a peer that never answers the close", async () => {
  const stack = await startStack();
  const conn = await Deno.connect({
    hostname: "127.0.0.1",
    port: stack.chat.port,
  });
  try {
    const token = await login(stack.auth.url, "alice");
    await conn.write(
      new TextEncoder().encode(
        [
          "GET /ws HTTP/1.1",
          `host: 127.0.0.1:${stack.chat.port}`,
          "upgrade: websocket",
          "connection: Upgrade",
          "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
          "sec-websocket-version: 13",
          `authorization: Bearer ${token}`,
          "",
          "",
        ].join("\r\n"),
      ),
    );
    const head = new Uint8Array(4096);
    const n = await conn.read(head);
    assert.match(
      new TextDecoder().decode(head.subarray(0, n ?? 0)),
      /^HTTP\/1.1 101/,
    );
    // This peer never answers the close frame: the answers are waited for
    // 1 s at most before the listener stops.
    const shutdown = stack.chat.shutdown();
    const started = performance.now();
    // Meanwhile an upgrade, and /health, are told the server is going.
    const late = await rawUpgrade(stack.chat.port, "/ws", {
      authorization: `Bearer ${token}`,
    });
    assert.equal(late.status, 503);
    assert.equal(JSON.parse(late.body).error, "shutting_down");
    // Then refused (or reset if it reached the backlog just before it closed).
    for (;;) {
      const refused = await fetch(`${stack.chat.httpUrl}/health`).then(
        async (res) => {
          assert.equal(res.status, 503);
          assert.equal((await res.json()).error, "shutting_down");
          return false;
        },
        (err) => err instanceof TypeError,
      );
      if (refused) break;
      assert.ok(performance.now() - started < 3000, "still accepting");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await shutdown;
  } finally {
    conn.close();
    await stack.close();
  }
});

/** Reads raw server WebSocket frames until a close frame; returns its code. */
async function readCloseCode(conn: Deno.Conn): Promise<number> {
  let buf = new Uint8Array(0);
  let headerDone = false;
  const chunk = new Uint8Array(256 * 1024);
  while (true) {
    const n = await conn.read(chunk);
    if (n === null) throw new Error("connection ended before a close frame");
    const next = new Uint8Array(buf.length + n);
    next.set(buf);
    next.set(chunk.subarray(0, n), buf.length);
    buf = next;
    if (!headerDone) {
      const end = findHeaderEnd(buf);
      if (end < 0) continue;
      buf = buf.subarray(end);
      headerDone = true;
    }
    while (buf.length >= 2) {
      const opcode = buf[0]! & 0x0f;
      let len = buf[1]! & 0x7f;
      let offset = 2;
      if (len === 126) {
        if (buf.length < 4) break;
        len = (buf[2]! << 8) | buf[3]!;
        offset = 4;
      } else if (len === 127) {
        if (buf.length < 10) break;
        len = Number(
          new DataView(buf.buffer, buf.byteOffset + 2, 8).getBigUint64(0),
        );
        offset = 10;
      }
      if (buf.length < offset + len) break;
      if (opcode === 0x8) return (buf[offset]! << 8) | buf[offset + 1]!;
      buf = buf.subarray(offset + len);
    }
  }
}

function findHeaderEnd(buf: Uint8Array): number {
  for (let i = 3; i < buf.length; i++) {
    if (
      buf[i - 3] === 13 && buf[i - 2] === 10 && buf[i - 1] === 13 &&
      buf[i] === 10
    ) return i + 1;
  }
  return -1;
}

Deno.test("a peer that stops answering pings is dropped and its presence cleaned up", async () => {
  const stack = await startStack({ idleTimeoutSeconds: 1 });
  try {
    const ghostToken = await login(stack.auth.url, "ghost");
    const bob = await connectAs(stack, "bob");
    // Completes the handshake, then neither reads nor answers pings.
    const ghost = await openRawWebSocket(stack.chat.port, ghostToken);
    await bob.next((f) => f.type === "join" && f.user === "ghost");
    const leave = await bob.next(
      (f) => f.type === "leave" && f.user === "ghost",
      10_000,
    );
    assert.equal(leave.room, "lobby");
    assert.equal(stack.chat.connections, 1);
    // Bob, who answers pings, is still there.
    await bob.sync();
    ghost.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a client that waits retry_after_ms after each refusal is refused, never closed for flooding", async () => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: {
      messageBurst: 1,
      messagesPerSecond: 20,
      floodStrikes: 2,
      floodStrikesPerSecond: 0.001,
    },
  });
  try {
    const alice = await connectAs(stack, "alice");
    let refused = 0;
    // Sends the next line at once after an echo, and waits as told after a
    // refusal: one refusal per line at twice the rate.
    for (let i = 0; i < 16; i++) {
      alice.send({ type: "message", text: `line ${i}` });
      const answer = await alice.next((f) =>
        f.type === "message" || f.type === "error"
      );
      if (answer.type === "error") {
        assert.equal(answer.error, "rate_limited");
        refused++;
        await new Promise((resolve) =>
          setTimeout(resolve, Number(answer.retry_after_ms))
        );
      }
    }
    assert.ok(refused >= 5, `refusals: ${refused}`);
    assert.equal(alice.socket.readyState, WebSocket.OPEN);
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("a connection closed with 1013 keeps its place under the caps until its socket is gone", async () => {
  const stack = await startStack({
    rateLimits: true,
    chatLimits: {
      maxConnectionsPerUser: 2,
      messageBurst: 1_000_000,
      messagesPerSecond: 1_000_000,
      frameBurst: 1_000_000,
      framesPerSecond: 1_000_000,
    },
  });
  try {
    const slowToken = await login(stack.auth.url, "slow");
    const alice = await connectAs(stack, "alice");
    // Never reads: closed with 1013, but its socket (and what the runtime
    // buffered for it) stays as long as the peer keeps the connection.
    const slow = await openRawWebSocket(stack.chat.port, slowToken);
    await alice.next((f) => f.type === "join" && f.user === "slow");
    const text = "x".repeat(3900);
    let sent = 0;
    while (
      !alice.frames.some((f) => f.type === "leave" && f.user === "slow") &&
      sent < 4000
    ) {
      for (let i = 0; i < 100; i++) {
        alice.send({ type: "message", text: `${sent++} ${text}` });
      }
      const last = `${sent - 1} `;
      await alice.next(
        (f) => f.type === "message" && String(f.text).startsWith(last),
        5000,
      );
    }
    assert.ok(
      alice.frames.some((f) => f.type === "leave" && f.user === "slow"),
      `not dropped after ${sent} messages`,
    );
    // One place is left for "slow", not two.
    const second = await TestClient.connect(stack.chat.url, slowToken);
    const third = await rawUpgrade(stack.chat.port, "/ws", {
      authorization: `Bearer ${slowToken}`,
    });
    assert.equal(third.status, 429);
    // The peer goes away: the place comes back (asked until it does).
    slow.close();
    const again = await retryUntil(
      () => TestClient.connect(stack.chat.url, slowToken),
      5000,
    );
    await again.close();
    await second.close();
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("large answers count against a per-user byte budget: past it, rate_limited with retry_after_ms, served again once it refills", async () => {
  let clock = Date.UTC(2026, 0, 1);
  const dataDir = await Deno.makeTempDir({ prefix: "chat_test_" });
  await Deno.mkdir(`${dataDir}/history`);
  await Deno.writeTextFile(
    `${dataDir}/history/lobby.jsonl`,
    Array.from({ length: 20 }, (_, i) =>
      JSON.stringify({
        type: "message",
        id: String(i + 1),
        room: "lobby",
        from: "bob",
        text: `${i} ${"x".repeat(3990)}`,
        ts: "2026-01-01T00:00:00.000Z",
      }) + "\n").join(""),
  );
  const stack = await startStack({
    dataDir,
    now: () => clock,
    rateLimits: true,
    // A page of 10 of these messages is about 41 KB.
    chatLimits: { answerBurstBytes: 60_000, answerBytesPerSecond: 10_000 },
  });
  try {
    const token = await login(stack.auth.url, "alice");
    const a1 = await TestClient.connect(stack.chat.url, token);
    const a2 = await TestClient.connect(stack.chat.url, token);
    a1.send({ type: "history", limit: 10 });
    assert.equal(
      ((await a1.nextOfType("history")).messages as unknown[]).length,
      10,
    );
    // Into debt: the second page is served, the budget is now below zero.
    a1.send({ type: "history", limit: 10 });
    assert.equal(
      ((await a1.nextOfType("history")).messages as unknown[]).length,
      10,
    );
    // The budget is the user's: the other connection is refused too, and so
    // are `rooms` and `who`; a message is not an answer and still goes.
    for (const frame of [{ type: "rooms" }, { type: "who" }]) {
      a2.send(frame);
      const err = await a2.nextOfType("error");
      assert.equal(err.error, "rate_limited");
      const wait = Number(err.retry_after_ms);
      assert.ok(wait > 1000 && wait <= 3000, `${wait} ms`);
    }
    a2.send({ type: "message", text: "still said" });
    assert.equal((await a2.nextOfType("message")).text, "still said");
    // Once the debt is paid back (about 2.2 s on the server's clock).
    clock += 3000;
    a2.send({ type: "rooms" });
    assert.deepEqual((await a2.nextOfType("rooms")).rooms, [{
      name: "lobby",
      users: 1,
    }]);
    await a1.close();
    await a2.close();
  } finally {
    await stack.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("with RATE_LIMITS off the answer budget is lifted", async () => {
  const stack = await startStack({
    rateLimits: false,
    chatLimits: { answerBurstBytes: 1, answerBytesPerSecond: 1 },
  });
  try {
    const alice = await connectAs(stack, "alice");
    for (let i = 0; i < 5; i++) {
      alice.send({ type: "rooms" });
      assert.equal((await alice.nextOfType("rooms")).type, "rooms");
    }
    await alice.close();
  } finally {
    await stack.close();
  }
});

Deno.test("the answer budget charges the answer alone (not a join's presence to others), and its refusals never close a connection for flooding", async () => {
  const clock = Date.UTC(2026, 0, 1);
  const stack = await startStack({
    now: () => clock,
    rateLimits: true,
    chatLimits: {
      // Far under the presence a join into 48 connections sends (about
      // 3600 characters), far over the answer itself.
      answerBurstBytes: 2000,
      answerBytesPerSecond: 0.001,
      maxConnectionsPerAddress: 200,
    },
  });
  try {
    const crowd: TestClient[] = [];
    for (const name of ["bob", "carol", "dave"]) {
      const token = await login(stack.auth.url, name);
      for (let i = 0; i < 16; i++) {
        const c = await TestClient.connect(stack.chat.url, token);
        c.send({ type: "join", room: "dev" });
        await c.nextOfType("joined");
        crowd.push(c);
      }
    }
    const token = await login(stack.auth.url, "alice");
    const a1 = await TestClient.connect(stack.chat.url, token);
    a1.send({ type: "join", room: "dev" });
    await a1.nextOfType("joined");
    a1.send({ type: "who", room: "dev" });
    assert.equal((await a1.nextOfType("who")).room, "dev");
    // Now use the budget up; the other connection, never told to wait,
    // sends 35 requests at once: all refused, none closes it.
    for (let i = 0; i < 40; i++) {
      a1.send({ type: "rooms" });
      const f = await a1.next((f) => f.type === "rooms" || f.type === "error");
      if (f.type === "error") break;
    }
    const a2 = await TestClient.connect(stack.chat.url, token);
    for (let i = 0; i < 35; i++) a2.send({ type: "who", room: "lobby" });
    for (let i = 0; i < 35; i++) {
      assert.equal((await a2.nextOfType("error")).error, "rate_limited");
    }
    a2.send({ type: "ping" });
    assert.equal((await a2.nextOfType("pong")).type, "pong");
    assert.equal(a2.socket.readyState, WebSocket.OPEN);
    for (const c of [...crowd, a1, a2]) await c.close();
  } finally {
    await stack.close();
  }
});

/**
 * Logs `name` in and upgrades `count` times in a row (each socket dropped
 * at once), every one let through; returns the handshake's auth header.
 */
async function upgradesAs(
  stack: Stack,
  name: string,
  count: number,
): Promise<Record<string, string>> {
  const auth = {
    authorization: `Bearer ${await login(stack.auth.url, name)}`,
  };
  for (let i = 0; i < count; i++) {
    assert.equal((await rawUpgrade(stack.chat.port, "/ws", auth)).status, 101);
  }
  return auth;
}

Deno.test("the answer budget is not charged for the room's messages that go out before the answer", async () => {
  const clock = Date.UTC(2026, 0, 1);
  // One flush covers all of it; the budget does not refill (fixed clock).
  const stack = await startStack({
    now: () => clock,
    rateLimits: true,
    chatLimits: {
      coalesceMs: 300,
      answerBurstBytes: 5000,
      answerBytesPerSecond: 0.001,
    },
  });
  try {
    const alice = await connectAs(stack, "alice");
    const bob = await connectAs(stack, "bob");
    await alice.next((f) => f.type === "join" && f.user === "bob");
    // 9,000 characters of bob's messages to the lobby, still batched when
    // his two small questions (about 40 characters each) are answered.
    for (let i = 0; i < 3; i++) {
      bob.send({ type: "message", text: `${i} ${"x".repeat(3000)}` });
    }
    bob.send({ type: "who", room: "lobby" });
    bob.send({ type: "who", room: "lobby" });
    const seen: string[] = [];
    while (seen.length < 5) {
      const f = await bob.next((f) =>
        f.type === "who" || f.type === "error" || f.type === "message"
      );
      seen.push(f.type === "error" ? `error:${f.error}` : String(f.type));
    }
    assert.deepEqual(seen, ["message", "message", "message", "who", "who"]);
    await alice.close();
    await bob.close();
  } finally {
    await stack.close();
  }
});

Deno.test("connection attempts from one address are rate-limited before the token check; refusals by a cap cost nothing; RATE_LIMITS=off lifts it", async (t) => {
  await t.step("past the burst: 429 rate_limited, with the wait", async () => {
    const stack = await startStack({
      rateLimits: true,
      chatLimits: { connectBurst: 3, connectsPerSecond: 0.01 },
    });
    try {
      const auth = await upgradesAs(stack, "alice", 3);
      const res = await rawUpgrade(stack.chat.port, "/ws", auth);
      assert.equal(res.status, 429);
      const body = JSON.parse(res.body);
      assert.equal(body.error, "rate_limited");
      assert.ok(body.retry_after_ms > 1000, `${body.retry_after_ms}`);
      assert.match(res.head, /\r\nretry-after: \d+/i);
      // Refused before the token is checked: a bad token costs no auth call.
      const bad = await rawUpgrade(stack.chat.port, "/ws", {
        authorization: "Bearer nosuchtoken",
      });
      assert.equal(bad.status, 429);
      assert.equal(JSON.parse(bad.body).error, "rate_limited");
    } finally {
      await stack.close();
    }
  });
  await t.step(
    "an attempt refused by the address cap spends nothing",
    async () => {
      const stack = await startStack({
        rateLimits: true,
        chatLimits: {
          connectBurst: 2,
          connectsPerSecond: 0.01,
          maxConnectionsPerAddress: 1,
        },
      });
      try {
        const held = await connectAs(stack, "alice");
        const token = await login(stack.auth.url, "bob");
        const auth = { authorization: `Bearer ${token}` };
        for (let i = 0; i < 3; i++) {
          const res = await rawUpgrade(stack.chat.port, "/ws", auth);
          assert.equal(JSON.parse(res.body).error, "too_many_connections");
        }
        await held.close();
        await waitFor(
          () => stack.chat.connections === 0,
          5000,
          "the close to be seen",
        );
        const bob = await TestClient.connect(stack.chat.url, token);
        await bob.close();
      } finally {
        await stack.close();
      }
    },
  );
  await t.step("RATE_LIMITS=off", async () => {
    const stack = await startStack({
      rateLimits: false,
      chatLimits: { connectBurst: 1, connectsPerSecond: 0.01 },
    });
    try {
      await upgradesAs(stack, "alice", 3);
    } finally {
      await stack.close();
    }
  });
});
