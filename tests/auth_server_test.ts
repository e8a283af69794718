import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type AuthServer,
  type AuthServerOptions,
  createAuthServer,
} from "../auth/server.ts";
import { hashPassword } from "../auth/password.ts";
import { defaultChatUrl } from "../config.ts";

const PASSWORD = "correct horse battery";

interface Answer {
  status: number;
  headers: Headers;
  body: unknown;
}

/** Runs `fn` against a fresh server on port 0 in a fresh temp dir. */
async function withServer(
  options: Partial<AuthServerOptions>,
  fn: (server: AuthServer, dataDir: string) => Promise<void>,
): Promise<void> {
  const dataDir = options.dataDir ??
    await Deno.makeTempDir({ prefix: "auth_server_" });
  const server = await createAuthServer({
    port: 0,
    chatUrl: "ws://127.0.0.1:9/ws",
    rateLimits: false,
    ...options,
    dataDir,
  });
  try {
    await fn(server, dataDir);
  } finally {
    await server.shutdown();
    if (options.dataDir === undefined) {
      await Deno.remove(dataDir, { recursive: true });
    }
  }
}

async function call(
  url: string,
  path: string,
  body?: unknown,
  init: RequestInit = {},
): Promise<Answer> {
  const res = await fetch(`${url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: body === undefined
      ? undefined
      : typeof body === "string"
      ? body
      : JSON.stringify(body),
    ...init,
  });
  const text = await res.text();
  return {
    status: res.status,
    headers: res.headers,
    body: text === "" ? undefined : JSON.parse(text),
  };
}

function field(answer: Answer, name: string): unknown {
  const body = answer.body;
  return typeof body === "object" && body !== null && name in body
    ? Object.getOwnPropertyDescriptor(body, name)?.value
    : undefined;
}

async function register(url: string, username: string, password = PASSWORD) {
  return await call(url, "/register", { username, password });
}

async function loginToken(
  url: string,
  username: string,
  password = PASSWORD,
): Promise<string> {
  const answer = await call(url, "/login", { username, password });
  assert.equal(answer.status, 200, JSON.stringify(answer.body));
  const token = field(answer, "token");
  assert.equal(typeof token, "string");
  return String(token);
}

async function readJson(path: string): Promise<Record<string, unknown>> {
  const value: unknown = JSON.parse(await Deno.readTextFile(path));
  assert.ok(typeof value === "object" && value !== null);
  return { ...value };
}

async function storedUsers(dataDir: string): Promise<Record<string, unknown>> {
  const file = await readJson(join(dataDir, "users.json"));
  assert.equal(file.version, 1);
  const users = file.users;
  assert.ok(typeof users === "object" && users !== null);
  return { ...users };
}

async function storedSessions(
  dataDir: string,
): Promise<Record<string, unknown>> {
  const file = await readJson(join(dataDir, "sessions.json"));
  assert.equal(file.version, 1);
  const sessions = file.sessions;
  assert.ok(typeof sessions === "object" && sessions !== null);
  return { ...sessions };
}

function sha256Hex(text: string): Promise<string> {
  return crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)).then(
    (d) =>
      Array.from(new Uint8Array(d), (b) => b.toString(16).padStart(2, "0"))
        .join(""),
  );
}

Deno.test("register, login, validate and logout follow the contract", async () => {
  await withServer({}, async ({ url }, dataDir) => {
    const reg = await register(url, "Alice");
    assert.equal(reg.status, 201);
    assert.deepEqual(reg.body, { username: "Alice" });
    assert.equal(reg.headers.get("content-type"), "application/json");

    const taken = await register(url, "aLiCe");
    assert.equal(taken.status, 409);
    assert.equal(field(taken, "error"), "username_taken");
    assert.equal(typeof field(taken, "message"), "string");

    const login = await call(url, "/login", {
      username: "ALICE",
      password: PASSWORD,
    });
    assert.equal(login.status, 200);
    assert.equal(field(login, "username"), "Alice", "as stored");
    assert.equal(field(login, "chat_url"), "ws://127.0.0.1:9/ws");
    const token = String(field(login, "token"));
    assert.match(token, /^[A-Za-z0-9_-]{43}$/);
    const expiresAt = String(field(login, "expires_at"));
    assert.match(expiresAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
    const ttl = Date.parse(expiresAt) - Date.now();
    assert.ok(ttl > 86_000_000 && ttl <= 86_400_000, `ttl ${ttl}`);

    const byHeader = await call(url, "/validate_token", undefined, {
      headers: { authorization: `Bearer ${token}` },
    });
    assert.equal(byHeader.status, 200);
    assert.deepEqual(byHeader.body, {
      valid: true,
      username: "Alice",
      expires_at: expiresAt,
    });
    const byBody = await call(url, "/validate_token", { token });
    assert.deepEqual(byBody.body, byHeader.body);

    // Only the SHA-256 of the token is stored, never the token.
    const sessionsText = await Deno.readTextFile(
      join(dataDir, "sessions.json"),
    );
    assert.ok(!sessionsText.includes(token));
    const sessions = await storedSessions(dataDir);
    assert.deepEqual(Object.keys(sessions), [await sha256Hex(token)]);
    const usersText = await Deno.readTextFile(join(dataDir, "users.json"));
    assert.ok(!usersText.includes(PASSWORD));
    assert.match(
      usersText,
      /"password_hash": "\$argon2id\$v=19\$m=19456,t=2,p=1\$/,
    );

    const out = await call(url, "/logout", undefined, {
      headers: { authorization: `Bearer ${token}` },
    });
    assert.equal(out.status, 204);
    assert.equal(out.body, undefined);
    const after = await call(url, "/validate_token", { token });
    assert.equal(after.status, 401);
    assert.deepEqual(Object.keys(after.body ?? {}).sort(), [
      "error",
      "message",
      "valid",
    ]);
    assert.equal(field(after, "valid"), false);
    assert.equal(field(after, "error"), "invalid_token");
    const again = await call(url, "/logout", undefined, {
      headers: { authorization: `Bearer ${token}` },
    });
    assert.equal(again.status, 401);
    assert.equal(field(again, "error"), "invalid_token");
    assert.deepEqual(await storedSessions(dataDir), {});
  });
});

Deno.test("/validate_token answers 401 with valid false for a missing, malformed or unknown token", async (t) => {
  await withServer({}, async ({ url }) => {
    const cases: [string, unknown, Record<string, string>][] = [
      ["no body and no header", undefined, {}],
      ["an empty object", {}, {}],
      ["a number token", { token: 42 }, {}],
      ["an unknown token", { token: "x".repeat(43) }, {}],
      ["an unknown bearer token", undefined, { authorization: "Bearer nope" }],
      ["a Basic header", undefined, { authorization: "Basic dXNlcjpwYXNz" }],
    ];
    for (const [what, body, headers] of cases) {
      await t.step(what, async () => {
        const answer = await call(url, "/validate_token", body, { headers });
        assert.equal(answer.status, 401);
        assert.equal(field(answer, "valid"), false);
        assert.equal(field(answer, "error"), "invalid_token");
        assert.equal(typeof field(answer, "message"), "string");
      });
    }
    const malformed = await call(url, "/validate_token", "{nope");
    assert.equal(malformed.status, 400);
    assert.equal(field(malformed, "error"), "invalid_json");
  });
});

Deno.test("validation errors answer the contract codes in the contract order", async (t) => {
  await withServer({}, async ({ url }) => {
    await register(url, "carol");
    const cases: [string, string, unknown, number, string][] = [
      ["register", "not JSON", "{nope", 400, "invalid_json"],
      ["register", "an array", "[1,2]", 400, "invalid_json"],
      ["register", "null", "null", 400, "invalid_json"],
      ["register", "an empty body", "", 400, "invalid_json"],
      [
        "register",
        "no username",
        { password: PASSWORD },
        400,
        "invalid_username",
      ],
      [
        "register",
        "a number username",
        { username: 7, password: PASSWORD },
        400,
        "invalid_username",
      ],
      [
        "register",
        "a 2-character username",
        { username: "ab", password: PASSWORD },
        400,
        "invalid_username",
      ],
      [
        "register",
        "a 33-character username",
        { username: "a".repeat(33), password: PASSWORD },
        400,
        "invalid_username",
      ],
      [
        "register",
        "a username with a space",
        { username: "a b c" },
        400,
        "invalid_username",
      ],
      [
        "register",
        "no password",
        { username: "dave" },
        400,
        "invalid_password",
      ],
      [
        "register",
        "a 7-character password",
        { username: "dave", password: "1234567" },
        400,
        "invalid_password",
      ],
      [
        "register",
        "a 1025-character password",
        { username: "dave", password: "x".repeat(1025) },
        400,
        "invalid_password",
      ],
      [
        "register",
        "8 emoji (16 UTF-16 units, 8 code points)",
        { username: "emoji8", password: "\u{1F600}".repeat(8) },
        201,
        "",
      ],
      [
        "register",
        "1024 emoji",
        { username: "emoji1024", password: "\u{1F600}".repeat(1024) },
        201,
        "",
      ],
      [
        "register",
        "7 emoji",
        { username: "emoji7", password: "\u{1F600}".repeat(7) },
        400,
        "invalid_password",
      ],
      ["login", "not JSON", "{nope", 400, "invalid_json"],
      ["login", "no username", { password: PASSWORD }, 400, "invalid_username"],
      ["login", "no username and no password", {}, 400, "invalid_username"],
      [
        "login",
        "a rule-breaking username",
        { username: "a b", password: PASSWORD },
        401,
        "invalid_credentials",
      ],
      ["login", "no password", { username: "carol" }, 400, "invalid_password"],
      [
        "login",
        "a rule-breaking username and no password",
        { username: "a!" },
        400,
        "invalid_password",
      ],
      [
        "login",
        "a rule-breaking username and a number password",
        { username: "a!", password: 5 },
        400,
        "invalid_password",
      ],
      [
        "login",
        "a number password",
        { username: "carol", password: 12345678 },
        400,
        "invalid_password",
      ],
      [
        "login",
        "a too short password",
        { username: "carol", password: "short" },
        401,
        "invalid_credentials",
      ],
    ];
    for (const [route, what, body, status, code] of cases) {
      await t.step(
        `/${route} with ${what} answers ${status} ${code}`,
        async () => {
          const answer = await call(url, `/${route}`, body);
          assert.equal(answer.status, status, JSON.stringify(answer.body));
          if (code !== "") {
            assert.equal(field(answer, "error"), code);
            assert.equal(typeof field(answer, "message"), "string");
          }
        },
      );
    }
  });
});

Deno.test("an unknown user and a wrong password get the same status, body and cost", async () => {
  await withServer({}, async ({ url }) => {
    await register(url, "erin");
    const timed = async (username: string) => {
      const start = performance.now();
      const answer = await call(url, "/login", {
        username,
        password: "wrong password",
      });
      return { answer, ms: performance.now() - start };
    };
    const known = [];
    const unknown = [];
    for (let i = 0; i < 3; i++) {
      known.push(await timed("erin"));
      unknown.push(await timed("nobody"));
    }
    for (const { answer } of [...known, ...unknown]) {
      assert.equal(answer.status, 401);
      assert.deepEqual(answer.body, known[0]?.answer.body);
      assert.deepEqual(
        [...answer.headers.keys()].filter((k) => k !== "date"),
        [...(known[0]?.answer.headers.keys() ?? [])].filter((k) =>
          k !== "date"
        ),
      );
    }
    assert.equal(field(known[0]!.answer, "error"), "invalid_credentials");
    const median = (xs: { ms: number }[]) =>
      xs.map((x) => x.ms).sort((a, b) => a - b)[1] ?? 0;
    // Both pay one Argon2id hash (tens of ms); an unknown user is not answered early.
    assert.ok(
      median(unknown) > median(known) / 2,
      `known ${median(known)} ms, unknown ${median(unknown)} ms`,
    );
  });
});

Deno.test("unknown paths answer 404 and wrong methods 405 with Allow", async () => {
  await withServer({}, async ({ url }) => {
    const missing = await call(url, "/nope", { a: 1 });
    assert.equal(missing.status, 404);
    assert.equal(field(missing, "error"), "not_found");
    const wrong = await call(url, "/login", undefined, { method: "GET" });
    assert.equal(wrong.status, 405);
    assert.equal(wrong.headers.get("allow"), "POST");
    assert.equal(field(wrong, "error"), "method_not_allowed");
    const headLogin = await call(url, "/login", undefined, { method: "HEAD" });
    assert.equal(headLogin.status, 405);
    assert.equal(headLogin.headers.get("allow"), "POST");
    const health = await call(url, "/health", { a: 1 });
    assert.equal(health.status, 405);
    assert.equal(health.headers.get("allow"), "GET, HEAD");
    const ok = await call(url, "/health", undefined, { method: "GET" });
    assert.equal(ok.status, 200);
    assert.deepEqual(ok.body, { status: "ok" });
  });
});

Deno.test("HEAD /health answers 200 with the GET headers and no body", async () => {
  await withServer({}, async ({ url }) => {
    const res = await fetch(`${url}/health`, { method: "HEAD" });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), "application/json");
    assert.equal(
      res.headers.get("content-length"),
      String(JSON.stringify({ status: "ok" }).length),
    );
    assert.equal(await res.text(), "");
    // On the wire: the head only, and the connection serves the next request.
    const { hostname, port } = new URL(url);
    const conn = await Deno.connect({ hostname, port: Number(port) });
    try {
      await conn.write(
        new TextEncoder().encode(
          "HEAD /health HTTP/1.1\r\nhost: x\r\n\r\n" +
            "GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
        ),
      );
      const reader = conn.readable.getReader();
      let text = "";
      const decoder = new TextDecoder();
      while (!text.endsWith('{"status":"ok"}')) {
        const { done, value } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
      }
      reader.releaseLock();
      const answers = text.split(/(?=HTTP\/1\.1 )/);
      assert.equal(answers.length, 2, text);
      assert.match(answers[0] ?? "", /^HTTP\/1\.1 200 [^]*\r\n\r\n$/);
      assert.match(answers[1] ?? "", /^HTTP\/1\.1 200 [^]*\{"status":"ok"\}$/);
    } finally {
      conn.close();
    }
  });
});

/** Sends raw bytes and returns what the server answers before the connection ends. */
async function rawExchange(
  url: string,
  head: string,
  bodyParts: Uint8Array[],
): Promise<string> {
  const { hostname, port } = new URL(url);
  const conn = await Deno.connect({ hostname, port: Number(port) });
  try {
    const writer = conn.writable.getWriter();
    await writer.write(new TextEncoder().encode(head));
    for (const part of bodyParts) await writer.write(part);
    writer.releaseLock();
    // The request is deliberately left unfinished: an answer proves the server did not wait for the rest.
    const reader = conn.readable.getReader();
    let text = "";
    const decoder = new TextDecoder();
    while (!text.includes("\r\n\r\n") || !text.includes("}")) {
      const { done, value } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
    reader.releaseLock();
    return text;
  } finally {
    conn.close();
  }
}

Deno.test("a body declared over 64 KiB answers 413 with Connection: close without the server reading it", async () => {
  await withServer({}, async ({ url }) => {
    const answer = await rawExchange(
      url,
      "POST /register HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" +
        "content-length: 104857600\r\n\r\n",
      [new TextEncoder().encode('{"username":')],
    );
    assert.match(answer, /^HTTP\/1\.1 413 /);
    assert.match(answer, /\r\nconnection: close\r\n/i);
    assert.match(answer, /"error":"payload_too_large"/);
  });
});

Deno.test("a chunked body without Content-Length is cut off at 64 KiB with 413 and Connection: close", async () => {
  await withServer({}, async ({ url }) => {
    const chunk = new Uint8Array(16 * 1024).fill(0x20);
    const framed = new Uint8Array([
      ...new TextEncoder().encode(`${chunk.length.toString(16)}\r\n`),
      ...chunk,
      ...new TextEncoder().encode("\r\n"),
    ]);
    // Five 16 KiB chunks (80 KiB) and no final chunk: the stream never ends.
    const answer = await rawExchange(
      url,
      "POST /login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" +
        "transfer-encoding: chunked\r\n\r\n",
      Array(5).fill(framed),
    );
    assert.match(answer, /^HTTP\/1\.1 413 /);
    assert.match(answer, /\r\nconnection: close\r\n/i);
    assert.match(answer, /"error":"payload_too_large"/);
  });
});

Deno.test("a streamed fetch body over 64 KiB answers 413 with Connection: close before it is all sent", async () => {
  await withServer({}, async ({ url }) => {
    let sent = 0;
    const body = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent >= 64 * 1024 * 1024) return controller.close();
        sent += 64 * 1024;
        controller.enqueue(new Uint8Array(64 * 1024).fill(0x20));
      },
    });
    const res = await fetch(`${url}/register`, { method: "POST", body });
    assert.equal(res.status, 413);
    assert.match(res.headers.get("connection") ?? "", /\bclose\b/i);
    assert.equal((await res.json()).error, "payload_too_large");
    assert.ok(sent < 64 * 1024 * 1024, `sent ${sent} bytes`);
    await body.cancel().catch(() => {});
  });
});

Deno.test("a body over 64 KiB is 413 on the routes that do not read it too (logout, a Bearer validate_token, health)", async () => {
  await withServer({}, async ({ url }) => {
    await register(url, "bigbody");
    const token = await loginToken(url, "bigbody");
    const big = JSON.stringify({ pad: "x".repeat(65 * 1024) });
    const auth = { authorization: `Bearer ${token}` };
    for (
      const [path, method] of [
        ["/validate_token", "POST"],
        ["/logout", "POST"],
      ]
    ) {
      const res = await fetch(`${url}${path}`, {
        method,
        headers: auth,
        body: big,
      });
      assert.equal(res.status, 413, path);
      assert.equal((await res.json()).error, "payload_too_large", path);
    }
    // Refused, so not logged out.
    const check = await call(url, "/validate_token", { token });
    assert.equal(check.status, 200);
    const health = await rawExchange(
      url,
      "GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: 70000\r\n\r\n",
      [],
    );
    assert.match(health, /^HTTP\/1\.1 413 /);
  });
});

Deno.test("a request body that stalls gets 408 request_timeout; one cut short logs no stack trace", async () => {
  const logged: string[] = [];
  await withServer({
    limits: { bodyTimeoutMs: 200 },
    log: (line) => logged.push(line),
  }, async ({ url }) => {
    const answer = await rawExchange(
      url,
      "POST /register HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" +
        "content-length: 1000\r\n\r\n",
      [new TextEncoder().encode('{"username":')],
    );
    assert.match(answer, /^HTTP\/1\.1 408 /);
    assert.match(answer, /"error":"request_timeout"/);

    // Half a body, then the client goes away.
    const { hostname, port } = new URL(url);
    const conn = await Deno.connect({ hostname, port: Number(port) });
    await conn.write(new TextEncoder().encode(
      "POST /login HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{",
    ));
    conn.close();
    // A request after it is answered: the cut one has been handled by then
    // (its read fails at once) or is still waiting for its deadline.
    const health = await fetch(`${url}/health`);
    await health.body?.cancel();
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.ok(
      !logged.some((line) => line.includes(" auth error ")),
      logged.join("\n"),
    );
  });
});

Deno.test("a password with a lone surrogate is no text: 400 invalid_password at /register, 401 at /login", async () => {
  await withServer({}, async ({ url }) => {
    const reg = await register(url, "surrogate", "\ud800".repeat(8));
    assert.equal(reg.status, 400);
    assert.equal(field(reg, "error"), "invalid_password");
    // The same password and its U+FFFD look-alike stay apart.
    assert.equal(
      (await register(url, "surrogate", "\ufffd".repeat(8))).status,
      201,
    );
    const login = await call(url, "/login", {
      username: "surrogate",
      password: "\udfff".repeat(8),
    });
    assert.equal(login.status, 401);
    assert.equal(field(login, "error"), "invalid_credentials");
    await loginToken(url, "surrogate", "\ufffd".repeat(8));
  });
});

Deno.test("logout revokes only the session it names", async () => {
  await withServer({}, async ({ url }) => {
    await register(url, "frank");
    const first = await loginToken(url, "frank");
    const second = await loginToken(url, "frank");
    assert.notEqual(first, second);
    const out = await call(url, "/logout", undefined, {
      headers: { authorization: `Bearer ${first}` },
    });
    assert.equal(out.status, 204);
    assert.equal(
      (await call(url, "/validate_token", { token: first })).status,
      401,
    );
    assert.equal(
      (await call(url, "/validate_token", { token: second })).status,
      200,
    );
    const noHeader = await call(url, "/logout", { token: second });
    assert.equal(noHeader.status, 401);
    assert.equal(field(noHeader, "error"), "invalid_token");
  });
});

Deno.test("a logout whose write failed is written when asked again, or at shutdown, and stays revoked after a restart", async (t) => {
  for (const retry of [true, false]) {
    await t.step(retry ? "asked again" : "at shutdown", async () => {
      const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
      const away = `${dataDir}.away`;
      let token = "";
      try {
        await withServer({ dataDir }, async ({ url }) => {
          await register(url, "gwen");
          token = await loginToken(url, "gwen");
          const logout = () =>
            call(url, "/logout", undefined, {
              headers: { authorization: `Bearer ${token}` },
            });
          // The directory moved away: the write fails, as on a full disk.
          await Deno.rename(dataDir, away);
          const failed = await logout();
          assert.equal(failed.status, 503);
          assert.equal(field(failed, "error"), "storage_unavailable");
          assert.equal(
            (await call(url, "/validate_token", { token })).status,
            401,
            "revoked at once",
          );
          await Deno.rename(away, dataDir);
          if (retry) {
            assert.equal((await logout()).status, 204);
            assert.equal((await logout()).status, 401);
          }
        });
        await withServer({ dataDir }, async ({ url }) => {
          const check = await call(url, "/validate_token", { token });
          assert.equal(check.status, 401);
          assert.equal(field(check, "valid"), false);
        });
      } finally {
        await Deno.remove(away, { recursive: true }).catch(() => {});
        await Deno.remove(dataDir, { recursive: true });
      }
    });
  }
});

Deno.test("a login beyond maxSessionsPerUser ends that user's oldest sessions (not with RATE_LIMITS=off)", async (t) => {
  for (const rateLimits of [true, false]) {
    await t.step(`rateLimits: ${rateLimits}`, async () => {
      await withServer(
        { rateLimits, limits: { maxSessionsPerUser: 3 } },
        async ({ url }, dataDir) => {
          await register(url, "maya");
          await register(url, "other");
          const other = await loginToken(url, "other");
          const tokens = [];
          for (let i = 0; i < 5; i++) {
            tokens.push(await loginToken(url, "maya"));
          }
          const statuses = [];
          for (const token of [...tokens, other]) {
            statuses.push(
              (await call(url, "/validate_token", { token })).status,
            );
          }
          assert.deepEqual(
            statuses,
            rateLimits
              ? [401, 401, 200, 200, 200, 200]
              : [200, 200, 200, 200, 200, 200],
          );
          const file = JSON.parse(
            await Deno.readTextFile(`${dataDir}/sessions.json`),
          );
          const owners = Object.values(file.sessions).map((s) =>
            (s as { username: string }).username
          );
          assert.equal(
            owners.filter((u) => u === "maya").length,
            rateLimits ? 3 : 5,
          );
        },
      );
    });
  }
});

Deno.test("a session expires after its TTL on the injected clock and is pruned from the file", async () => {
  let now = Date.parse("2030-01-01T00:00:00.000Z");
  await withServer(
    { sessionTtlSeconds: 60, now: () => now },
    async ({ url }, dataDir) => {
      await register(url, "grace");
      const login = await call(url, "/login", {
        username: "grace",
        password: PASSWORD,
      });
      assert.equal(field(login, "expires_at"), "2030-01-01T00:01:00.000Z");
      const token = String(field(login, "token"));
      now += 59_999;
      assert.equal((await call(url, "/validate_token", { token })).status, 200);
      now += 1;
      const expired = await call(url, "/validate_token", { token });
      assert.equal(expired.status, 401);
      assert.equal(field(expired, "valid"), false);
      // The next session write leaves the expired one out.
      await loginToken(url, "grace");
      const sessions = await storedSessions(dataDir);
      assert.equal(Object.keys(sessions).length, 1);
      assert.ok(!(await sha256Hex(token) in sessions));
    },
  );
});

Deno.test("expired sessions are dropped when the server starts", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    const live = "a".repeat(64);
    const dead = "b".repeat(64);
    // Their user exists: sessions of unknown users are dropped anyway.
    await Deno.writeTextFile(
      join(dataDir, "users.json"),
      JSON.stringify({
        version: 1,
        users: {
          xavier: {
            username: "xavier",
            password_hash: await hashPassword(PASSWORD),
            created_at: "2020-01-01T00:00:00.000Z",
          },
        },
      }),
    );
    await Deno.writeTextFile(
      join(dataDir, "sessions.json"),
      JSON.stringify({
        version: 1,
        sessions: {
          [live]: {
            username: "xavier",
            created_at: "2020-01-01T00:00:00.000Z",
            expires_at: "2999-01-01T00:00:00.000Z",
          },
          [dead]: {
            username: "xavier",
            created_at: "2020-01-01T00:00:00.000Z",
            expires_at: "2020-01-02T00:00:00.000Z",
          },
        },
      }),
    );
    await withServer({ dataDir }, async () => {
      assert.deepEqual(Object.keys(await storedSessions(dataDir)), [live]);
    });
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a login rehashes a stored hash of lower cost", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    const weak = await hashPassword(PASSWORD, {
      memory: 4096,
      passes: 1,
      parallelism: 1,
    });
    await Deno.writeTextFile(
      join(dataDir, "users.json"),
      JSON.stringify({
        version: 1,
        users: {
          heidi: {
            username: "Heidi",
            password_hash: weak,
            created_at: "2020-01-01T00:00:00.000Z",
          },
        },
      }),
    );
    await withServer({ dataDir }, async ({ url }) => {
      await loginToken(url, "heidi");
      const users = await storedUsers(dataDir);
      const heidi = users.heidi;
      assert.ok(typeof heidi === "object" && heidi !== null);
      const hash = Object.getOwnPropertyDescriptor(heidi, "password_hash")
        ?.value;
      assert.match(String(hash), /^\$argon2id\$v=19\$m=19456,t=2,p=1\$/);
      assert.notEqual(hash, weak);
      // The new hash still accepts the password.
      await loginToken(url, "Heidi");
    });
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("failed logins are throttled per username with Retry-After", async () => {
  const lines: string[] = [];
  await withServer(
    { rateLimits: true, log: (line) => lines.push(line) },
    async ({ url }) => {
      await register(url, "ivan");
      for (let i = 0; i < 5; i++) {
        const answer = await call(url, "/login", {
          username: "ivan",
          password: "wrong password",
        });
        assert.equal(answer.status, 401);
      }
      const throttled = await call(url, "/login", {
        username: "IVAN",
        password: PASSWORD,
      });
      assert.equal(throttled.status, 429);
      assert.equal(field(throttled, "error"), "rate_limited");
      assert.match(throttled.headers.get("retry-after") ?? "", /^[1-9]\d*$/);
      // An unknown username is throttled just the same: no enumeration through 429.
      for (let i = 0; i < 5; i++) {
        await call(url, "/login", {
          username: "ghost",
          password: "wrong pass",
        });
      }
      const ghost = await call(url, "/login", {
        username: "ghost",
        password: "wrong pass",
      });
      assert.equal(ghost.status, 429);
      // Another account from the same address is not locked.
      await register(url, "judy");
      await loginToken(url, "judy");
    },
  );
  assert.ok(
    lines.some((l) =>
      / auth login throttled user=IVAN addr=127\.0\.0\.1 /.test(l)
    ),
  );
  assert.ok(
    lines.some((l) => / auth login fail user=ivan addr=127\.0\.0\.1 /.test(l)),
  );
  assert.ok(
    lines.some((l) => / auth register ok user=ivan addr=127\.0\.0\.1/.test(l)),
  );
  assert.ok(
    lines.some((l) => / auth login ok user=judy addr=127\.0\.0\.1/.test(l)),
  );
  for (const line of lines) {
    assert.ok(
      !line.includes(PASSWORD) && !line.includes("wrong password"),
      line,
    );
  }
});

Deno.test("registrations are throttled per address with Retry-After", async () => {
  await withServer({ rateLimits: true }, async ({ url }) => {
    for (const name of ["kim1", "kim2", "kim3"]) {
      assert.equal((await register(url, name)).status, 201);
    }
    const fourth = await register(url, "kim4");
    assert.equal(fourth.status, 429);
    assert.equal(field(fourth, "error"), "rate_limited");
    assert.equal(fourth.headers.get("retry-after"), "6");
  });
});

Deno.test("refused registrations (400, 413) do not use the registration budget; a 409 does", async () => {
  await withServer({ rateLimits: true }, async ({ url }) => {
    const refused: [unknown, number, string][] = [
      ["not json", 400, "invalid_json"],
      [{ username: "x!", password: PASSWORD }, 400, "invalid_username"],
      [{ password: PASSWORD }, 400, "invalid_username"],
      [{ username: "olga", password: "short" }, 400, "invalid_password"],
      [{ username: "olga" }, 400, "invalid_password"],
      [
        { username: "olga", password: "x".repeat(70 * 1024) },
        413,
        "payload_too_large",
      ],
    ];
    // Twice over: 12 refusals, four times the burst of 3.
    for (const [body, status, code] of [...refused, ...refused]) {
      const answer = await call(url, "/register", body);
      assert.equal(answer.status, status, code);
      assert.equal(field(answer, "error"), code);
    }
    assert.equal((await register(url, "olga")).status, 201);
    // A taken name costs a registration: /register must not list users fast.
    assert.equal((await register(url, "OLGA")).status, 409);
    assert.equal((await register(url, "olga2")).status, 201);
    const fourth = await register(url, "olga3");
    assert.equal(fourth.status, 429);
    assert.equal(field(fourth, "error"), "rate_limited");
    assert.equal(fourth.headers.get("retry-after"), "6");
  });
});

Deno.test("throttle limits are configurable", async () => {
  await withServer(
    {
      rateLimits: true,
      limits: { registrationBurst: 1, loginFreeFailures: 1 },
    },
    async ({ url }) => {
      assert.equal((await register(url, "lena")).status, 201);
      assert.equal((await register(url, "lena2")).status, 429);
      assert.equal(
        (await call(url, "/login", {
          username: "lena",
          password: "bad password",
        }))
          .status,
        401,
      );
      assert.equal(
        (await call(url, "/login", { username: "lena", password: PASSWORD }))
          .status,
        429,
      );
    },
  );
});

Deno.test("with 1 hash thread and 2 waiting, 8 simultaneous logins: 3 are served, 5 get 503 busy with Retry-After (and a log line each), and /validate_token does not wait", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    // A costlier stored hash keeps each check long (about 0.2 s), so all 8
    // requests are in before the first check ends: the count is exact.
    const slow = await hashPassword(PASSWORD, {
      memory: 19456,
      passes: 12,
      parallelism: 1,
    });
    await Deno.writeTextFile(
      join(dataDir, "users.json"),
      JSON.stringify({
        version: 1,
        users: {
          mona: {
            username: "mona",
            password_hash: slow,
            created_at: "2020-01-01T00:00:00.000Z",
          },
        },
      }),
    );
    const lines: string[] = [];
    await withServer(
      {
        dataDir,
        limits: { hashThreads: 1, maxHashWaiting: 2 },
        log: (line) => lines.push(line),
      },
      async ({ url }) => {
        const token = await loginToken(url, "mona");
        const logins = Array.from(
          { length: 8 },
          () => call(url, "/login", { username: "mona", password: PASSWORD }),
        );
        const start = performance.now();
        const check = await call(url, "/validate_token", { token });
        const validateMs = performance.now() - start;
        assert.equal(check.status, 200);
        const answers = await Promise.all(logins);
        const statuses = answers.map((a) => a.status).sort().join();
        assert.equal(statuses, "200,200,200,503,503,503,503,503");
        for (const b of answers.filter((a) => a.status === 503)) {
          assert.equal(field(b, "error"), "busy");
          assert.equal(typeof field(b, "message"), "string");
          assert.equal(b.headers.get("retry-after"), "1");
        }
        assert.ok(validateMs < 100, `validate took ${validateMs} ms`);
      },
    );
    const busy = lines.filter((l) =>
      / auth login busy user=mona addr=127\.0\.0\.1$/.test(l)
    );
    assert.equal(busy.length, 5, lines.join("\n"));
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("100 concurrent registrations are all kept after a restart, in few file writes", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    let writes = 0;
    // 100 at once is past the default hashing line (4 + 64): raise it, as
    // the limits allow, so that every one waits for its hash.
    await withServer({
      dataDir,
      limits: { maxHashWaiting: 96 },
    }, async ({ url, store }) => {
      const answers = await Promise.all(
        Array.from({ length: 100 }, (_, i) => register(url, `user${i}`)),
      );
      assert.deepEqual(answers.map((a) => a.status), Array(100).fill(201));
      writes = store.fileWrites;
    });
    assert.ok(writes <= 15, `${writes} file writes`);
    assert.equal(Object.keys(await storedUsers(dataDir)).length, 100);
    await withServer({ dataDir }, async ({ url }) => {
      await Promise.all(
        [0, 42, 99].map((i) => loginToken(url, `USER${i}`)),
      );
      assert.equal((await register(url, "User7")).status, 409);
    });
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("data files are mode 0600 and no temporary file is left, even one a crash left", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    const stale = join(dataDir, ".users.json.tmp-0123abcd");
    await Deno.writeTextFile(stale, "{half");
    await withServer({ dataDir }, async ({ url }) => {
      await Promise.all(
        Array.from({ length: 10 }, (_, i) => register(url, `nina${i}`)),
      );
      await loginToken(url, "nina1");
    });
    const names = [];
    for await (const entry of Deno.readDir(dataDir)) names.push(entry.name);
    assert.deepEqual(names.sort(), [".lock", "sessions.json", "users.json"]);
    for (const name of ["users.json", "sessions.json"]) {
      const mode = (await Deno.stat(join(dataDir, name))).mode ?? 0;
      assert.equal((mode & 0o777).toString(8), "600", name);
    }
    // Human-readable: pretty-printed.
    assert.match(
      await Deno.readTextFile(join(dataDir, "users.json")),
      /\n {2}"users": \{\n/,
    );
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

/** A well-formed Argon2id PHC string (of no password in particular). */
const PHC =
  "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$aGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGg";

Deno.test("a file that does not parse stops the server at start, named in the message and left unchanged", async (t) => {
  const cases: [string, string][] = [
    ["users.json", '{"version":1,"users":{"a":'],
    ["users.json", '{"version":2,"users":{}}'],
    ["users.json", '{"version":1,"users":{"a":{"username":"a"}}}'],
    ...[
      ["bob", "bob", "nope", PHC],
      ["bob", "bob", "2026-01-01T00:00:00.000Z", "plaintext"],
      // The PHC pattern, but nothing Argon2id could verify (each would lock
      // its user out for good): no passes, too little memory, and a salt
      // whose base64 length does not decode.
      ["bob", "bob", "2026-01-01T00:00:00.000Z", PHC.replace("t=2", "t=0")],
      ["bob", "bob", "2026-01-01T00:00:00.000Z", PHC.replace("m=19456", "m=7")],
      [
        "bob",
        "bob",
        "2026-01-01T00:00:00.000Z",
        PHC.replace("c2FsdHNhbHRzYWx0c2FsdA", "c2FsdHNhbHRzY"),
      ],
      ["a b", "a b", "2026-01-01T00:00:00.000Z", PHC],
      ["bob", "alice", "2026-01-01T00:00:00.000Z", PHC],
      ["Bob", "Bob", "2026-01-01T00:00:00.000Z", PHC],
    ].map(([key, username, created, hash]): [string, string] => [
      "users.json",
      JSON.stringify({
        version: 1,
        users: {
          [key!]: { username, password_hash: hash, created_at: created },
        },
      }),
    ]),
    ["sessions.json", "not json"],
    ["sessions.json", '{"version":1,"sessions":[]}'],
    ["users.json", ""],
  ];
  for (const [name, content] of cases) {
    await t.step(`${name} containing ${JSON.stringify(content)}`, async () => {
      const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
      try {
        const path = join(dataDir, name);
        await Deno.writeTextFile(path, content);
        const err = await createAuthServer({
          port: 0,
          dataDir,
          chatUrl: "ws://x/ws",
        }).then(
          (server) => server.shutdown().then(() => undefined),
          (e) => e,
        );
        assert.ok(err instanceof Error, "the server must not start");
        assert.ok(err.message.includes(path), err.message);
        assert.equal(await Deno.readTextFile(path), content);
        // The lock was released: a fixed file lets a server start.
        await Deno.remove(path);
        await withServer({ dataDir }, () => Promise.resolve());
      } finally {
        await Deno.remove(dataDir, { recursive: true });
      }
    });
  }
});

Deno.test("a data directory the server cannot use stops the start with a message naming it", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    // The lock file cannot be opened. (The runtime's "Permission denied"
    // without a path, which the server then names itself, needs a user
    // other than root to happen.)
    await Deno.mkdir(join(dataDir, ".lock"));
    await assert.rejects(
      createAuthServer({ port: 0, dataDir, chatUrl: "ws://x/ws" }),
      (err: unknown) => err instanceof Error && err.message.includes(dataDir),
    );
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a second server on the same data directory refuses to start until the first stops", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    await withServer({ dataDir }, async () => {
      await assert.rejects(
        createAuthServer({ port: 0, dataDir, chatUrl: "ws://x/ws" }),
        (err: unknown) =>
          err instanceof Error && /lock/.test(err.message) &&
          err.message.includes(dataDir),
      );
    });
    await withServer({ dataDir }, () => Promise.resolve());
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("shutdown finishes requests in flight and keeps their changes", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    const server = await createAuthServer({
      port: 0,
      dataDir,
      chatUrl: "ws://x/ws",
      rateLimits: false,
    });
    const pending = Promise.all(
      Array.from({ length: 5 }, (_, i) => register(server.url, `oscar${i}`)),
    );
    // Let the requests reach the server before shutting down.
    while (server.store.userCount === 0) {
      await new Promise((r) => setTimeout(r, 5));
    }
    const stopped = server.shutdown();
    const answers = await pending;
    await stopped;
    await server.finished;
    await server.shutdown();
    assert.deepEqual(answers.map((a) => a.status), Array(5).fill(201));
    assert.equal(Object.keys(await storedUsers(dataDir)).length, 5);
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a login hands out the chat URL the function gives at that moment", async () => {
  let chatUrl = "ws://127.0.0.1:1/ws";
  await withServer({ chatUrl: () => chatUrl }, async ({ url }) => {
    await register(url, "pat");
    chatUrl = "ws://127.0.0.1:4242/ws";
    const answer = await call(url, "/login", {
      username: "pat",
      password: PASSWORD,
    });
    assert.equal(field(answer, "chat_url"), "ws://127.0.0.1:4242/ws");
  });
});

Deno.test("the auth server's address is the one it bound (localhost is 127.0.0.1), as the chat server's is", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    const server = await createAuthServer({
      hostname: "localhost",
      port: 0,
      dataDir,
      chatUrl: "ws://x/ws",
    });
    try {
      assert.equal(server.hostname, "127.0.0.1");
      assert.equal(server.url, `http://127.0.0.1:${server.port}`);
      const res = await fetch(`${server.url}/health`);
      assert.deepEqual(await res.json(), { status: "ok" });
    } finally {
      await server.shutdown();
    }
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("with the chat server bound to every address, /login hands out the chat port on the name the client used to reach the auth server", async () => {
  assert.equal(defaultChatUrl("127.0.0.1", 8080), "ws://127.0.0.1:8080/ws");
  assert.equal(defaultChatUrl("::1", 8080), "ws://[::1]:8080/ws");
  await withServer(
    { chatUrl: defaultChatUrl("0.0.0.0", 4321) },
    async ({ url }) => {
      await register(url, "alice");
      const direct = await call(url, "/login", {
        username: "alice",
        password: PASSWORD,
      });
      assert.equal(field(direct, "chat_url"), "ws://127.0.0.1:4321/ws");
      // As from another machine, by the server's name (raw, to set Host).
      const body = JSON.stringify({ username: "alice", password: PASSWORD });
      const answer = await rawExchange(
        url,
        "POST /login HTTP/1.1\r\nhost: chat.example.org:8000\r\n" +
          "content-type: application/json\r\nconnection: close\r\n" +
          `content-length: ${body.length}\r\n\r\n`,
        [new TextEncoder().encode(body)],
      );
      assert.match(answer, /^HTTP\/1\.1 200 /);
      assert.match(answer, /"chat_url":"ws:\/\/chat\.example\.org:4321\/ws"/);
    },
  );
});

Deno.test("sessions of a user removed from users.json while stopped do not validate after the restart, and leave the sessions file", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_server_" });
  try {
    let aliceToken = "";
    let bobToken = "";
    await withServer({ dataDir }, async ({ url }) => {
      assert.equal((await register(url, "alice")).status, 201);
      assert.equal((await register(url, "Bob")).status, 201);
      aliceToken = await loginToken(url, "alice");
      bobToken = await loginToken(url, "Bob");
    });
    // The operator deletes bob by hand while the server is stopped.
    const usersPath = join(dataDir, "users.json");
    const file = await readJson(usersPath);
    const users = { ...await storedUsers(dataDir) };
    delete users["bob"];
    await Deno.writeTextFile(
      usersPath,
      JSON.stringify({ ...file, users }, null, 2),
    );
    const lines: string[] = [];
    await withServer(
      { dataDir, log: (line) => lines.push(line) },
      async ({ url }) => {
        const bobHash = await sha256Hex(bobToken);
        assert.deepEqual(Object.keys(await storedSessions(dataDir)), [
          await sha256Hex(aliceToken),
        ]);
        assert.equal(
          lines.filter((l) =>
            /auth start dropped 1 session of users not in .*users\.json$/
              .test(l)
          ).length,
          1,
          lines.join("\n"),
        );
        const one = await call(url, "/validate_token", { token: bobToken });
        assert.equal(one.status, 401);
        assert.equal(field(one, "valid"), false);
        const batch = await call(url, "/validate_tokens", {
          tokens: [bobToken, aliceToken],
        });
        assert.equal(batch.status, 200);
        assert.deepEqual(field(batch, "results"), [
          { valid: false },
          {
            valid: true,
            username: "alice",
            expires_at: field(
              await call(url, "/validate_token", { token: aliceToken }),
              "expires_at",
            ),
          },
        ]);
        const out = await call(url, "/logout", undefined, {
          headers: { authorization: `Bearer ${bobToken}` },
        });
        assert.equal(out.status, 401);
        assert.ok(!(bobHash in await storedSessions(dataDir)));
      },
    );
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a data file that cannot be written answers 503 storage_unavailable with Retry-After and logs one line naming it, without a stack", async () => {
  const lines: string[] = [];
  await withServer(
    { log: (line) => lines.push(line) },
    async ({ url }, dataDir) => {
      assert.equal((await register(url, "alice")).status, 201);
      const token = await loginToken(url, "alice");
      try {
        // Each file replaced by a non-empty directory: renaming the temp file
        // over it fails, even as root, as a full disk fails the write.
        for (const name of ["users.json", "sessions.json"]) {
          await Deno.remove(join(dataDir, name));
          await Deno.mkdir(join(dataDir, name, "in_the_way"), {
            recursive: true,
          });
        }
        const failures = [
          ["/register", await register(url, "bob")],
          [
            "/login",
            await call(url, "/login", {
              username: "alice",
              password: PASSWORD,
            }),
          ],
          [
            "/logout",
            await call(url, "/logout", undefined, {
              headers: { authorization: `Bearer ${token}` },
            }),
          ],
        ] as const;
        for (const [path, answer] of failures) {
          assert.equal(answer.status, 503, path);
          assert.equal(answer.headers.get("retry-after"), "5", path);
          assert.deepEqual(answer.body, {
            error: "storage_unavailable",
            message:
              "Cannot save the change: the server cannot save its data right now",
          }, path);
          const file = path === "/register" ? "users.json" : "sessions.json";
          const logged = lines.filter((l) =>
            l.includes(`auth error POST "${path}"`)
          );
          assert.equal(logged.length, 1, lines.join("\n"));
          assert.match(
            logged[0] ?? "",
            new RegExp(
              `: storage_unavailable file="[^"]*/${
                file.replace(".", "\\.")
              }" error="[^"\\\\]*\\(os error \\d+\\)"$`,
            ),
          );
        }
        assert.doesNotMatch(lines.join("\n"), /\bat |\\n/);
        assert.equal(
          (await call(url, "/validate_token", { token })).status,
          401,
        );
      } finally {
        // Room again: the shutdown saves the logout.
        for (const name of ["users.json", "sessions.json"]) {
          await Deno.remove(join(dataDir, name), { recursive: true });
        }
      }
    },
  );
});
