import assert from "node:assert/strict";
import {
  login,
  rawUpgrade,
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
    const alice = await TestClient.connect(
      stack.chat.url,
      await login(stack.auth.url, "alice"),
    );
    for (let i = 0; i < 20; i++) {
      alice.send({ type: "message", text: `spam ${i}` });
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
    const bob = await TestClient.connect(
      stack.chat.url,
      await login(stack.auth.url, "bob"),
    );
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

Deno.test("a client that stops reading is closed with 1013 while others keep receiving", async () => {
  const stack = await startStack();
  try {
    const slowToken = await login(stack.auth.url, "slow");
    const alice = await TestClient.connect(
      stack.chat.url,
      await login(stack.auth.url, "alice"),
    );
    const bob = await TestClient.connect(
      stack.chat.url,
      await login(stack.auth.url, "bob"),
    );
    // A raw TCP client that completes the handshake and then never reads.
    const slow = await Deno.connect({
      hostname: "127.0.0.1",
      port: stack.chat.port,
    });
    await slow.write(new TextEncoder().encode(
      [
        "GET /ws HTTP/1.1",
        `Host: 127.0.0.1:${stack.chat.port}`,
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        `Authorization: Bearer ${slowToken}`,
        "",
        "",
      ].join("\r\n"),
    ));
    await bob.next((f) => f.type === "join" && f.user === "slow");
    const text = "x".repeat(3900);
    const total = 2000;
    const started = Date.now();
    for (let i = 0; i < total; i++) {
      alice.send({ type: "message", text: `${i} ${text}` });
    }
    const last = await bob.next(
      (f) => f.type === "message" && String(f.text).startsWith(`${total - 1} `),
      15_000,
    );
    assert.ok(last);
    const received = bob.frames.filter((f) => f.type === "message").length;
    assert.equal(received, total);
    const gone = await bob.next(
      (f) => f.type === "leave" && f.user === "slow",
      5000,
    );
    assert.equal(gone.room, "lobby");
    assert.equal(stack.chat.connections, 2);
    assert.ok(Date.now() - started < 15_000);
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
  await t.step("expired", async () => {
    const stack = await startStack({
      sessionTtlSeconds: 1,
      chatLimits: { recheckIntervalMs: 100 },
    });
    try {
      const alice = await TestClient.connect(
        stack.chat.url,
        await login(stack.auth.url, "alice"),
      );
      assert.equal((await alice.closed).code, 1008);
    } finally {
      await stack.close();
    }
  });
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
  } finally {
    await stack.close();
  }
});

Deno.test("shutdown closes every WebSocket with 1001 and flushes history", async () => {
  const stack = await startStack({ historyFlushMs: 60_000 });
  try {
    const alice = await TestClient.connect(
      stack.chat.url,
      await login(stack.auth.url, "alice"),
    );
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
