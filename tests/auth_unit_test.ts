import assert from "node:assert/strict";
import {
  DUMMY_HASH,
  formatPasswordHash,
  hashPassword,
  needsRehash,
  parsePasswordHash,
  verifyPassword,
} from "../auth/password.ts";
import { HashBusyError, HashLimiter } from "../auth/hash_limiter.ts";
import {
  DEFAULT_AUTH_LIMITS,
  LoginThrottle,
  RegistrationThrottle,
} from "../auth/rate_limit.ts";
import { drainBody, readJsonObject } from "../auth/read_json_object.ts";
import { HttpError } from "../auth/http_error.ts";
import { AuthStore } from "../auth/json_store.ts";
import { createAuthHandler } from "../auth/handler.ts";

Deno.test("a password hash is an Argon2id PHC string with the current cost that verifies only its password", async () => {
  const stored = await hashPassword("correct horse");
  assert.match(
    stored,
    /^\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$/,
  );
  assert.equal(await verifyPassword("correct horse", stored), true);
  assert.equal(await verifyPassword("correct horsf", stored), false);
  assert.equal(needsRehash(stored), false);
});

Deno.test("passwords are NFC-normalised before hashing", async () => {
  const composed = "caf\u00e9 au lait";
  const decomposed = "cafe\u0301 au lait";
  const stored = await hashPassword(decomposed);
  assert.equal(await verifyPassword(composed, stored), true);
});

Deno.test("a hash with a lower cost than the current one needs a rehash", async () => {
  const weak = await hashPassword("correct horse", {
    memory: 1024,
    passes: 1,
    parallelism: 1,
  });
  assert.match(weak, /\$m=1024,t=1,p=1\$/);
  assert.equal(await verifyPassword("correct horse", weak), true);
  assert.equal(needsRehash(weak), true);
});

Deno.test("the dummy hash parses, has the current cost and matches no password", async () => {
  const parsed = parsePasswordHash(DUMMY_HASH);
  assert.ok(parsed);
  assert.deepEqual(parsed.params, {
    memory: 19456,
    passes: 2,
    parallelism: 1,
  });
  assert.equal(await verifyPassword("anything at all", DUMMY_HASH), false);
  assert.equal(formatPasswordHash(parsed), DUMMY_HASH);
});

Deno.test("a stored hash that does not parse never verifies", async () => {
  assert.equal(parsePasswordHash("$2b$10$abc"), undefined);
  assert.equal(await verifyPassword("password", "not a hash"), false);
});

Deno.test("the hash limiter runs a bounded number of jobs and refuses once the waiting line is full", async () => {
  const limiter = new HashLimiter({ concurrency: 2, maxWaiting: 1 });
  const gates = [Promise.withResolvers<void>(), Promise.withResolvers<void>()];
  let maxRunning = 0;
  const job = (gate: Promise<void>) => async () => {
    maxRunning = Math.max(maxRunning, limiter.running);
    await gate;
    return "done";
  };
  const first = limiter.run(job(gates[0]!.promise));
  const second = limiter.run(job(gates[1]!.promise));
  const third = limiter.run(job(Promise.resolve()));
  assert.equal(limiter.running, 2);
  assert.equal(limiter.waiting, 1);
  await assert.rejects(limiter.run(job(Promise.resolve())), HashBusyError);
  gates[0]!.resolve();
  gates[1]!.resolve();
  assert.deepEqual(await Promise.all([first, second, third]), [
    "done",
    "done",
    "done",
  ]);
  assert.equal(maxRunning, 2);
  assert.equal(limiter.running, 0);
});

Deno.test("a username gets a few free failures, then a doubling wait capped at the maximum", () => {
  let now = 1_000_000;
  const limits = {
    ...DEFAULT_AUTH_LIMITS,
    loginBackoffBaseMs: 1000,
    loginBackoffMaxMs: 4000,
  };
  const throttle = new LoginThrottle(limits, () => now);
  for (let i = 0; i < 5; i++) {
    assert.equal(throttle.admit("alice", `10.0.0.${i}`).ok, true);
  }
  const denied = throttle.admit("alice", "10.0.0.9");
  assert.deepEqual(denied, { ok: false, retryAfterMs: 1000 });
  const waits: number[] = [];
  for (let i = 0; i < 4; i++) {
    const admission = throttle.admit("alice", "10.0.0.9");
    assert.equal(admission.ok, false);
    if (!admission.ok) {
      waits.push(admission.retryAfterMs);
      now += admission.retryAfterMs;
    }
    assert.equal(throttle.admit("alice", "10.0.0.9").ok, true);
  }
  assert.deepEqual(waits, [1000, 2000, 4000, 4000]);
  // Another username is not affected.
  assert.equal(throttle.admit("bob", "10.0.0.9").ok, true);
});

Deno.test("an address that logged in before is not locked out by a stranger's failures", () => {
  let now = 1_000_000;
  const throttle = new LoginThrottle(DEFAULT_AUTH_LIMITS, () => now);
  const own = throttle.admit("alice", "10.0.0.1");
  assert.ok(own.ok);
  throttle.succeeded(own.ticket);
  for (let i = 0; i < 5; i++) throttle.admit("alice", "192.0.2.66");
  assert.equal(throttle.admit("alice", "192.0.2.66").ok, false);
  const again = throttle.admit("alice", "10.0.0.1");
  assert.ok(again.ok, "the owner's address still gets in");
  throttle.succeeded(again.ticket);
  assert.equal(
    throttle.admit("alice", "192.0.2.66").ok,
    false,
    "the owner's login does not reset the stranger's lock",
  );
  // The trusted address loses its exemption once it fails too often itself.
  now += 1;
  let last;
  for (let i = 0; i < 6; i++) last = throttle.admit("alice", "10.0.0.1");
  assert.equal(last?.ok, false);
});

Deno.test("an address may fail at most its hourly budget of logins", () => {
  let now = 0;
  const limits = { ...DEFAULT_AUTH_LIMITS, loginFailuresPerAddressHour: 10 };
  const throttle = new LoginThrottle(limits, () => now);
  for (let i = 0; i < 10; i++) {
    assert.equal(throttle.admit(`user${i}`, "10.0.0.1").ok, true);
  }
  const denied = throttle.admit("other", "10.0.0.1");
  assert.deepEqual(denied, { ok: false, retryAfterMs: 360_000 });
  now += 360_000;
  assert.equal(throttle.admit("other", "10.0.0.1").ok, true);
});

Deno.test("failed-login state is forgotten after its window so the maps stay bounded", () => {
  let now = 0;
  const throttle = new LoginThrottle(DEFAULT_AUTH_LIMITS, () => now);
  for (let i = 0; i < 1000; i++) {
    throttle.admit(`user${i}`, `10.0.${i >> 8}.${i & 255}`);
  }
  assert.ok(throttle.size >= 1000);
  now += 2 * 3_600_000;
  throttle.admit("late", "10.9.9.9");
  assert.ok(throttle.size <= 2, `size ${throttle.size}`);
});

Deno.test("tracked keys never exceed the configured maximum", () => {
  const throttle = new LoginThrottle(
    { ...DEFAULT_AUTH_LIMITS, maxTrackedKeys: 50 },
    () => 0,
  );
  for (let i = 0; i < 500; i++) throttle.admit(`user${i}`, `10.0.0.${i & 7}`);
  assert.ok(throttle.size <= 100, `size ${throttle.size}`);
  const registrations = new RegistrationThrottle(
    { ...DEFAULT_AUTH_LIMITS, maxTrackedKeys: 50 },
    () => 0,
  );
  for (let i = 0; i < 500; i++) registrations.take(`10.0.${i >> 8}.${i & 255}`);
  assert.ok(registrations.size <= 50);
});

Deno.test("registrations per address are a burst of 3, then one per 6 s", () => {
  let now = 0;
  const throttle = new RegistrationThrottle(DEFAULT_AUTH_LIMITS, () => now);
  assert.deepEqual([1, 2, 3].map(() => throttle.take("10.0.0.1")), [0, 0, 0]);
  assert.equal(throttle.take("10.0.0.1"), 6000);
  assert.equal(throttle.take("10.0.0.2"), 0);
  now += 6000;
  assert.equal(throttle.take("10.0.0.1"), 0);
  assert.equal(throttle.take("10.0.0.1"), 6000);
  throttle.refund("10.0.0.1");
  assert.equal(throttle.take("10.0.0.1"), 0, "a refund gives one back");
  assert.equal(throttle.take("10.0.0.1"), 6000);
});

function post(body: BodyInit | null, headers: Record<string, string> = {}) {
  return new Request("http://localhost/x", { method: "POST", body, headers });
}

Deno.test("the body reader takes JSON objects and refuses everything else as invalid_json", async (t) => {
  assert.deepEqual(await readJsonObject(post('{"a":1}'), limit(100)), { a: 1 });
  for (const body of ["", "[1]", "null", "42", '"s"', "{", "\xff"]) {
    await t.step(`refuses ${JSON.stringify(body)}`, async () => {
      const err = await readJsonObject(post(body), limit(100)).catch((e) => e);
      assert.ok(err instanceof HttpError);
      assert.equal(err.status, 400);
      assert.equal(err.code, "invalid_json");
    });
  }
  const bad = new Uint8Array([0x7b, 0xff, 0x7d]);
  const err = await readJsonObject(post(bad), limit(100)).catch((e) => e);
  assert.equal(err.code, "invalid_json");
});

Deno.test("the body reader refuses a declared oversized body without reading it", async () => {
  let pulled = 0;
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      pulled++;
      controller.enqueue(new Uint8Array(10));
    },
  });
  const req = new Request("http://localhost/x", {
    method: "POST",
    body,
    headers: { "content-length": "1000" },
  });
  const err = await readJsonObject(req, limit(100)).catch((e) => e);
  assert.ok(err instanceof HttpError);
  assert.equal(err.status, 413);
  assert.equal(err.code, "payload_too_large");
  assert.equal(err.headers.connection, "close", "the rest is never read");
  assert.ok(pulled <= 1, `pulled ${pulled}`);
});

Deno.test("the body reader stops reading a streamed body at the limit", async () => {
  let pulled = 0;
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      pulled++;
      controller.enqueue(new Uint8Array(1024));
    },
  });
  const err = await readJsonObject(post(body), limit(64 * 1024)).catch((e) =>
    e
  );
  assert.ok(err instanceof HttpError);
  assert.equal(err.code, "payload_too_large");
  assert.equal(err.headers.connection, "close");
  assert.ok(pulled <= 66, `pulled ${pulled} chunks of 1 KiB`);
});

Deno.test("a body that stalls gets 408 at the deadline; one cut short is invalid_json, not a crash", async (t) => {
  await t.step("stalled", async () => {
    // Never ends, never errors: a client that sent half and waits.
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('{"username":'));
      },
    });
    const started = Date.now();
    const err = await readJsonObject(post(body), {
      maxBytes: 100,
      timeoutMs: 50,
    })
      .catch((e) => e);
    assert.ok(err instanceof HttpError);
    assert.equal(err.status, 408);
    assert.equal(err.code, "request_timeout");
    assert.equal(err.headers.connection, "close");
    assert.ok(Date.now() - started < 2_000);
  });
  await t.step("cut short", async () => {
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('{"username":'));
        controller.error(new Error("connection reset"));
      },
    });
    const err = await readJsonObject(post(body), limit(100)).catch((e) => e);
    assert.ok(err instanceof HttpError);
    assert.equal(err.status, 400);
    assert.equal(err.code, "invalid_json");
  });
});

Deno.test("a body nobody reads is still refused over the limit (declared or streamed)", async () => {
  await drainBody(post("x".repeat(100)), limit(100));
  const declared = await drainBody(
    post("x".repeat(101), { "content-length": "101" }),
    limit(100),
  ).catch((e) => e);
  assert.equal(declared.status, 413);
  const streamed = await drainBody(
    post(new Blob(["x".repeat(101)]).stream()),
    limit(100),
  ).catch((e) => e);
  assert.equal(streamed.status, 413);
});

function limit(maxBytes: number) {
  return { maxBytes, timeoutMs: 5_000 };
}

const info: Deno.ServeHandlerInfo = {
  remoteAddr: { transport: "tcp", hostname: "192.0.2.1", port: 40000 },
  completed: Promise.resolve(),
};

Deno.test("the handler answers requests built with new Request", async (t) => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_unit_" });
  const store = await AuthStore.open(dataDir);
  const handle = createAuthHandler({ store, chatUrl: "ws://chat/ws" });
  try {
    await t.step("GET /health answers ok", async () => {
      const res = await handle(new Request("http://a/health"), info);
      assert.equal(res.status, 200);
      assert.deepEqual(await res.json(), { status: "ok" });
    });
    await t.step("HEAD /health answers 200 with no body", async () => {
      const res = await handle(
        new Request("http://a/health", { method: "HEAD" }),
        info,
      );
      assert.equal(res.status, 200);
      assert.equal(res.body, null);
      assert.equal(res.headers.get("content-type"), "application/json");
      assert.equal(res.headers.get("content-length"), "15");
    });
    await t.step("POST /health answers 405 allowing GET and HEAD", async () => {
      const res = await handle(
        new Request("http://a/health", { method: "POST", body: "{}" }),
        info,
      );
      assert.equal(res.status, 405);
      assert.equal(res.headers.get("allow"), "GET, HEAD");
      assert.equal((await res.json()).error, "method_not_allowed");
    });
    await t.step("an unknown path answers 404 not_found", async () => {
      const res = await handle(new Request("http://a/nope"), info);
      assert.equal(res.status, 404);
      assert.equal((await res.json()).error, "not_found");
    });
    await t.step("a wrong method answers 405 with Allow", async () => {
      const res = await handle(new Request("http://a/register"), info);
      assert.equal(res.status, 405);
      assert.equal(res.headers.get("allow"), "POST");
      assert.equal((await res.json()).error, "method_not_allowed");
    });
    await t.step("register then login hands out the chat URL", async () => {
      const body = JSON.stringify({ username: "Zed", password: "password1" });
      const reg = await handle(
        new Request("http://a/register", { method: "POST", body }),
        info,
      );
      assert.equal(reg.status, 201);
      assert.deepEqual(await reg.json(), { username: "Zed" });
      const res = await handle(
        new Request("http://a/login", { method: "POST", body }),
        info,
      );
      assert.equal(res.status, 200);
      const session = await res.json();
      assert.equal(session.chat_url, "ws://chat/ws");
      assert.equal(session.username, "Zed");
      assert.match(session.token, /^[A-Za-z0-9_-]{43}$/);
    });
  } finally {
    await store.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

function jsonPost(path: string, body: unknown): Request {
  return new Request(`http://a${path}`, {
    method: "POST",
    body: JSON.stringify(body),
  });
}

Deno.test("with the default limits, 68 requests needing a hash at once are all served and the 69th gets 503 busy", async (t) => {
  const { hashThreads, maxHashWaiting } = DEFAULT_AUTH_LIMITS;
  assert.equal(hashThreads, 4);
  assert.equal(maxHashWaiting, 64, "the contract's bound");
  const bound = hashThreads + maxHashWaiting;
  const dataDir = await Deno.makeTempDir({ prefix: "auth_unit_" });
  const store = await AuthStore.open(dataDir);
  // The throttles are off, as with RATE_LIMITS=off: the hash bound stays.
  const handle = createAuthHandler({
    store,
    chatUrl: "ws://chat/ws",
    rateLimits: false,
  });
  const password = "password1";
  try {
    // Every call below reaches the hash limiter before the first hash (tens of ms) ends.
    await t.step(`${bound} registrations at once are all served`, async () => {
      const answers = await Promise.all(
        Array.from(
          { length: bound },
          (_, i) =>
            handle(
              jsonPost("/register", { username: `user${i}`, password }),
              info,
            ),
        ),
      );
      for (const res of answers) await res.body?.cancel();
      assert.deepEqual(answers.map((r) => r.status), Array(bound).fill(201));
    });
    await t.step(
      `${
        bound + 1
      } logins at once: ${bound} are served, the last gets 503 busy with Retry-After`,
      async () => {
        const answers = await Promise.all(
          Array.from(
            { length: bound + 1 },
            (_, i) =>
              handle(
                jsonPost("/login", { username: `user${i % bound}`, password }),
                info,
              ),
          ),
        );
        const busy = answers.filter((r) => r.status === 503);
        const served = answers.filter((r) => r.status !== 503);
        for (const res of served) await res.body?.cancel();
        assert.deepEqual(served.map((r) => r.status), Array(bound).fill(200));
        assert.equal(busy.length, 1);
        assert.equal(busy[0]?.headers.get("retry-after"), "1");
        assert.equal((await busy[0]?.json()).error, "busy");
      },
    );
  } finally {
    await store.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a registration refused 503 busy does not use the registration budget", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_unit_" });
  const store = await AuthStore.open(dataDir);
  const handle = createAuthHandler({
    store,
    chatUrl: "ws://chat/ws",
    limits: { hashThreads: 1, maxHashWaiting: 0, registrationBurst: 2 },
  });
  const password = "password1";
  const register = (username: string) =>
    handle(jsonPost("/register", { username, password }), info);
  try {
    // Both reach the hash limiter before the first hash ends: one runs, one is refused.
    const pair = await Promise.all([register("ada"), register("bea")]);
    const bodies = await Promise.all(pair.map((r) => r.json()));
    assert.deepEqual(pair.map((r) => r.status).sort(), [201, 503]);
    assert.ok(bodies.some((b) => b.error === "busy"));
    const third = await register("cid");
    await third.body?.cancel();
    assert.equal(third.status, 201, "the busy one was refunded");
    const fourth = await register("dot");
    assert.equal(fourth.status, 429);
    assert.equal((await fourth.json()).error, "rate_limited");
  } finally {
    await store.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a logout whose write failed keeps the session ended, and is done only once it is on disk", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_unit_" });
  const store = await AuthStore.open(dataDir);
  try {
    const now = Date.now();
    await store.addUser({
      username: "ann",
      password_hash: await hashPassword("correct horse"),
      created_at: new Date(now).toISOString(),
    });
    await store.addSession("a".repeat(64), {
      username: "ann",
      createdAt: new Date(now).toISOString(),
      expiresAt: new Date(now + 3_600_000).toISOString(),
      expiresAtMs: now + 3_600_000,
    });
    // The directory gone: every write fails, as on a full disk.
    await Deno.remove(dataDir, { recursive: true });
    await assert.rejects(store.removeSession("a".repeat(64)));
    assert.equal(store.getSession("a".repeat(64)), undefined, "ended at once");
    // Asked again while writes fail: still a failure, not "no such session".
    await assert.rejects(store.removeSession("a".repeat(64)));
    await Deno.mkdir(dataDir);
    assert.equal(
      (await store.removeSession("a".repeat(64)))?.username,
      "ann",
    );
    const file = JSON.parse(
      await Deno.readTextFile(`${dataDir}/sessions.json`),
    );
    assert.deepEqual(Object.keys(file.sessions), []);
    assert.equal(await store.removeSession("a".repeat(64)), undefined);
  } finally {
    await store.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("the store's files are what JSON.stringify(.., null, 2) prints of their contents, through adds, changes, removals and expiry", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_unit_" });
  let clock = Date.UTC(2026, 0, 1);
  const store = await AuthStore.open(dataDir, { now: () => clock });
  // The file is what JSON.stringify(.., null, 2) prints of its contents,
  // members in the order given (the store's: JSON.parse puts keys that
  // look like numbers first).
  const pretty = async (name: string, order: string[]) => {
    const text = await Deno.readTextFile(`${dataDir}/${name}`);
    const member = name === "users.json" ? "users" : "sessions";
    const records = JSON.parse(text)[member];
    assert.deepEqual(Object.keys(records).sort(), [...order].sort());
    const object = order.length === 0
      ? "{}"
      : `{\n${
        order.map((k) =>
          `    ${JSON.stringify(k)}: ${
            JSON.stringify(records[k], null, 2).replaceAll("\n", "\n    ")
          }`
        ).join(",\n")
      }\n  }`;
    assert.equal(text, `{\n  "version": 1,\n  "${member}": ${object}\n}\n`);
    return records;
  };
  const session = (user: string, ttlMs: number) => ({
    username: user,
    createdAt: new Date(clock).toISOString(),
    expiresAt: new Date(clock + ttlMs).toISOString(),
    expiresAtMs: clock + ttlMs,
  });
  try {
    // Names that look like numbers, an escape and non-ASCII in the fields.
    for (const name of ["Zed", "123", 'q"uote', "émile"]) {
      assert.equal(
        await store.addUser({
          username: name,
          password_hash: `hash-of-${name}`,
          created_at: new Date(clock).toISOString(),
        }),
        true,
      );
    }
    const names = ["zed", "123", 'q"uote', "émile"];
    let users = await pretty("users.json", names);
    // Records cannot be changed in place (their printed text would go
    // stale); a change replaces the record and is printed again.
    const zed = store.getUser("zed")!;
    assert.throws(() => {
      (zed as { password_hash: string }).password_hash = "in place";
    }, TypeError);
    await store.setPasswordHash("ZED", "new-hash");
    users = await pretty("users.json", names);
    assert.equal(users.zed.password_hash, "new-hash");
    assert.equal(users["émile"].password_hash, "hash-of-émile");

    await store.addSession("a".repeat(64), session("Zed", 1000));
    await store.addSession("b".repeat(64), session("123", 60_000));
    let sessions = await pretty("sessions.json", [
      "a".repeat(64),
      "b".repeat(64),
    ]);
    assert.equal(sessions["a".repeat(64)].username, "Zed");
    // An expired session leaves the file at the next write.
    clock += 2000;
    await store.addSession("c".repeat(64), session("émile", 60_000));
    sessions = await pretty("sessions.json", ["b".repeat(64), "c".repeat(64)]);
    assert.equal(sessions["c".repeat(64)].username, "émile");
    await store.removeSession("b".repeat(64));
    await store.removeSession("c".repeat(64));
    assert.deepEqual(await pretty("sessions.json", []), {});
  } finally {
    await store.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});
