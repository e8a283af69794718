import assert from "node:assert/strict";
import { type AuthServer, createAuthServer } from "../auth/server.ts";
import {
  AuthUnavailableError,
  createTokenValidator,
} from "../chat/auth_client.ts";

/**
 * An HTTP server in the auth server's place, of the contract alone (no
 * `/validate_tokens`: 404), that holds every `/validate_token` request until
 * released, counting how many it holds at once.
 */
function holdingServer() {
  let held = 0;
  let maxHeld = 0;
  let batchAsks = 0;
  const heldTokens: string[] = [];
  let release = () => {};
  let released = new Promise<void>((resolve) => release = resolve);
  const arrivals: (() => void)[] = [];
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      if (new URL(req.url).pathname !== "/validate_token") {
        batchAsks++;
        return Response.json({ error: "not_found", message: "No" }, {
          status: 404,
        });
      }
      const token = /^Bearer (.+)$/.exec(req.headers.get("authorization") ?? "")
        ?.[1];
      held++;
      heldTokens.push(token ?? "");
      maxHeld = Math.max(maxHeld, held);
      for (const wake of arrivals.splice(0)) wake();
      await released;
      held--;
      if (token === "revoked") {
        return Response.json({ valid: false, error: "invalid_token" }, {
          status: 401,
        });
      }
      return Response.json({
        valid: true,
        username: `user-${token}`,
        expires_at: "2030-01-01T00:00:00.000Z",
      });
    },
  );
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    get held() {
      return held;
    },
    get maxHeld() {
      return maxHeld;
    },
    /** The tokens of the `/validate_token` requests, in arrival order. */
    heldTokens,
    /** Requests to `/validate_tokens` (answered 404). */
    get batchAsks() {
      return batchAsks;
    },
    /** Resolves once `n` requests are held at once. */
    async until(n: number) {
      while (held < n) {
        await new Promise<void>((resolve) => arrivals.push(resolve));
      }
    },
    releaseAll() {
      release();
      released = new Promise<void>((resolve) => release = resolve);
    },
    close: () => server.shutdown(),
  };
}

/** Runs `fn` against the real auth server on port 0 in a fresh directory. */
async function withAuthServer(
  fn: (auth: AuthServer) => Promise<void>,
): Promise<void> {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_client_" });
  const auth = await createAuthServer({
    port: 0,
    dataDir,
    chatUrl: "ws://127.0.0.1:9/ws",
    rateLimits: false,
  });
  try {
    await fn(auth);
  } finally {
    await auth.shutdown();
    await Deno.remove(dataDir, { recursive: true });
  }
}

/** Registers and logs in `username` at the real auth server; its token. */
async function loginToken(auth: AuthServer, username: string): Promise<string> {
  const body = JSON.stringify({ username, password: "secretpw1" });
  const post = (path: string) =>
    fetch(new URL(path, auth.url), { method: "POST", body })
      .then((res) => res.json());
  await post("/register");
  return (await post("/login")).token;
}

Deno.test("token checks: at most maxInFlight requests at once, the rest wait their turn", async () => {
  const auth = holdingServer();
  try {
    const validate = createTokenValidator({
      authUrl: auth.url,
      maxInFlight: 3,
    });
    const checks = Array.from({ length: 10 }, (_, i) => validate(`t${i}`));
    await auth.until(3);
    // Time for a client without the bound to send the other seven.
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(auth.held, 3);
    // Answer whatever arrives until every check is answered.
    const pump = setInterval(() => auth.releaseAll(), 5);
    let results;
    try {
      results = await Promise.all(checks);
      await Promise.all([validate("x"), validate("y")]);
    } finally {
      clearInterval(pump);
    }
    assert.equal(auth.maxHeld, 3);
    assert.deepEqual(
      results.map((r) => r.valid && r.username),
      Array.from({ length: 10 }, (_, i) => `user-t${i}`),
    );
    // The ten asked together went as one /validate_tokens first; after its
    // 404, one /validate_token each, and no batch is tried again.
    assert.equal(auth.batchAsks, 1);
  } finally {
    await auth.close();
  }
});

Deno.test("token checks: concurrent checks of one token share a request; a revoked token is invalid", async () => {
  const auth = holdingServer();
  try {
    const validate = createTokenValidator({ authUrl: auth.url });
    const same = [validate("a"), validate("a"), validate("revoked")];
    await auth.until(2);
    auth.releaseAll();
    const [a1, a2, revoked] = await Promise.all(same);
    assert.equal(auth.maxHeld, 2);
    assert.equal(a1, a2);
    assert.deepEqual(revoked, { valid: false });
  } finally {
    await auth.close();
  }
});

Deno.test("token checks: a check still queued when the time is up fails closed", async () => {
  const auth = holdingServer();
  try {
    const validate = createTokenValidator({
      authUrl: auth.url,
      maxInFlight: 1,
      timeoutMs: 300,
    });
    const first = assert.rejects(validate("slow"), AuthUnavailableError);
    await auth.until(1);
    await assert.rejects(validate("queued"), AuthUnavailableError);
    await first;
    // The place is given back: a later check is answered.
    const pump = setInterval(() => auth.releaseAll(), 5);
    let result;
    try {
      result = await validate("later");
    } finally {
      clearInterval(pump);
    }
    assert.equal(result.valid && result.username, "user-later");
  } finally {
    auth.releaseAll();
    await auth.close();
  }
});

Deno.test("token checks asked for together go to the real auth server as one /validate_tokens request", async () => {
  await withAuthServer(async (auth) => {
    // Counts the requests by path on the way (a proxy in front of it).
    const paths: string[] = [];
    const proxy = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (req) => {
        const url = new URL(req.url);
        paths.push(url.pathname);
        return fetch(new URL(url.pathname, auth.url), {
          method: req.method,
          headers: req.headers,
          body: req.body,
        });
      },
    );
    try {
      const tokens: string[] = [];
      for (const name of ["ann", "ben", "cat"]) {
        tokens.push(await loginToken(auth, name));
      }
      await fetch(new URL("/logout", auth.url), {
        method: "POST",
        headers: { authorization: `Bearer ${tokens[1]}` },
      }).then((r) => r.body?.cancel());
      const validate = createTokenValidator({
        authUrl: `http://127.0.0.1:${proxy.addr.port}`,
      });
      const results = await Promise.all(
        [...tokens, "unknown", tokens[0]!].map((token) => validate(token)),
      );
      assert.deepEqual(
        results.map((r) => r.valid ? r.username : false),
        ["ann", false, "cat", false, "ann"],
      );
      assert.deepEqual(paths, ["/validate_tokens"]);
      // A lone check is the contract's own request.
      const alone = await validate(tokens[2]!);
      assert.equal(alone.valid && alone.username, "cat");
      assert.deepEqual(paths, ["/validate_tokens", "/validate_token"]);
    } finally {
      await proxy.shutdown();
    }
  });
});

Deno.test("/validate_tokens answers in order, and refuses what is not 1 to 100 token strings", async () => {
  await withAuthServer(async (auth) => {
    const post = async (body: string) => {
      const res = await fetch(new URL("/validate_tokens", auth.url), {
        method: "POST",
        body,
      });
      return { status: res.status, body: await res.json() };
    };
    const ok = await post(JSON.stringify({ tokens: ["a", "b"] }));
    assert.deepEqual(ok, {
      status: 200,
      body: { results: [{ valid: false }, { valid: false }] },
    });
    for (
      const bad of [
        "[]",
        "{}",
        '{"tokens":[]}',
        '{"tokens":"a"}',
        '{"tokens":[1]}',
        JSON.stringify({ tokens: Array.from({ length: 101 }, () => "t") }),
      ]
    ) {
      const answer = await post(bad);
      assert.equal(answer.status, 400, bad);
      assert.equal(answer.body.error, "invalid_json", bad);
    }
  });
});

Deno.test("token checks: re-checks (background) leave places to upgrades, which go first", async () => {
  const auth = holdingServer();
  try {
    const validate = createTokenValidator({
      authUrl: auth.url,
      maxInFlight: 3,
    });
    const background = Array.from(
      { length: 5 },
      (_, i) => validate(`bg${i}`, { background: true }),
    );
    await auth.until(1);
    // One place at most for them (three less two kept for upgrades).
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(auth.held, 1);
    const upgrade = validate("up");
    await auth.until(2);
    assert.deepEqual(auth.heldTokens, ["bg0", "up"]);
    // An upgrade with the token of a queued re-check takes it along at once.
    const promoted = validate("bg3");
    await auth.until(3);
    assert.deepEqual(auth.heldTokens, ["bg0", "up", "bg3"]);
    assert.equal(promoted, background[3]);
    const pump = setInterval(() => auth.releaseAll(), 5);
    try {
      assert.equal((await upgrade).valid, true);
      assert.equal((await Promise.all(background)).length, 5);
    } finally {
      clearInterval(pump);
    }
  } finally {
    await auth.close();
  }
});

Deno.test("token checks: a batch the auth server cannot take (413 for long odd tokens, or any answer but results) goes again one by one", async (t) => {
  await t.step(
    "the real auth server, 70 tokens of 512 quotes and a valid one",
    () =>
      withAuthServer(async (auth) => {
        const token = await loginToken(auth, "ann");
        const validate = createTokenValidator({ authUrl: auth.url });
        const odd = Array.from(
          { length: 70 },
          (_, i) => `${i}${'"'.repeat(511)}`,
        );
        const results = await Promise.all(
          [...odd, token].map((t) => validate(t)),
        );
        assert.equal(results.filter((r) => !r.valid).length, 70);
        const last = results.at(-1)!;
        assert.equal(last.valid && last.username, "ann");
      }),
  );
  await t.step("an auth server answering 401 to /validate_tokens", async () => {
    const server = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (req) => {
        const token = req.headers.get("authorization")?.slice(7);
        if (new URL(req.url).pathname !== "/validate_token" || !token) {
          return Response.json({ valid: false }, { status: 401 });
        }
        return Response.json({
          valid: true,
          username: token,
          expires_at: "2030-01-01T00:00:00.000Z",
        });
      },
    );
    try {
      const validate = createTokenValidator({
        authUrl: `http://127.0.0.1:${server.addr.port}`,
      });
      const results = await Promise.all(
        ["ann", "bob"].map((t) => validate(t)),
      );
      assert.deepEqual(results.map((r) => r.valid && r.username), [
        "ann",
        "bob",
      ]);
    } finally {
      await server.shutdown();
    }
  });
});

Deno.test("an answer from the auth address that never ends is read no further than 1 MiB, and is an outage", async () => {
  let sent = 0;
  const chunk = new Uint8Array(64 * 1024).fill(32);
  const endless = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      new Response(
        new ReadableStream({
          pull(controller) {
            sent += chunk.length;
            controller.enqueue(chunk);
          },
        }),
        { headers: { "content-type": "application/json" } },
      ),
  );
  try {
    const validate = createTokenValidator({
      authUrl: `http://127.0.0.1:${endless.addr.port}`,
      timeoutMs: 10_000,
    });
    await assert.rejects(
      validate("some-token"),
      (err: unknown) => err instanceof AuthUnavailableError,
    );
    // What the server got out before it had to wait: the 1 MiB read, and
    // what the socket buffers hold.
    assert.ok(sent < 32 * 1024 * 1024, `${sent} bytes were taken`);
  } finally {
    await endless.shutdown();
  }
});

Deno.test("an answer naming a user outside the username rules (a line break, a space, 100,000 characters) is an outage, alone or in a batch", async () => {
  const names = ["a b\nchat: forged line", "x".repeat(100_000), "ab"];
  let asked = "";
  const liar = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      const answer = {
        valid: true,
        username: asked,
        expires_at: "2030-01-01T00:00:00.000Z",
      };
      if (new URL(req.url).pathname === "/validate_tokens") {
        const { tokens } = await req.json();
        return Response.json({ results: tokens.map(() => answer) });
      }
      return Response.json(answer);
    },
  );
  try {
    const validate = createTokenValidator({
      authUrl: `http://127.0.0.1:${liar.addr.port}`,
    });
    for (const name of names) {
      asked = name;
      await assert.rejects(
        validate(`token-${name.length}`),
        (err: unknown) =>
          err instanceof AuthUnavailableError &&
          err.message.endsWith("with a username outside the username rules"),
        JSON.stringify(name.slice(0, 20)),
      );
    }
    asked = "fine_name";
    const ok = await validate("token-ok");
    assert.equal(ok.valid && ok.username, "fine_name");
  } finally {
    await liar.shutdown();
  }
});

Deno.test("token checks reach an auth server behind a proxy under a path (AUTH_URL=http://host/auth), keeping the path", async () => {
  await withAuthServer(async (auth) => {
    const token = await loginToken(auth, "alice");
    // A reverse proxy that serves the auth server under /auth only.
    const proxy = Deno.serve(
      { hostname: "127.0.0.1", port: 0, onListen: () => {} },
      (req) => {
        const { pathname } = new URL(req.url);
        if (!pathname.startsWith("/auth/")) {
          return new Response("not here", { status: 404 });
        }
        return fetch(new URL(pathname.slice(5), auth.url), {
          method: req.method,
          headers: req.headers,
          body: req.body,
        });
      },
    );
    try {
      for (const suffix of ["/auth", "/auth/"]) {
        const validate = createTokenValidator({
          authUrl: `http://127.0.0.1:${proxy.addr.port}${suffix}`,
        });
        const check = await validate(token);
        assert.equal(check.valid, true, suffix);
        assert.equal(check.valid && check.username, "alice");
      }
    } finally {
      await proxy.shutdown();
    }
  });
});
