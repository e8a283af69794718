import assert from "node:assert/strict";
import {
  AuthUnavailableError,
  createTokenValidator,
} from "../chat/auth_client.ts";

/**
 * An HTTP server in the auth server's place that holds every request until
 * released, counting how many it holds at once.
 */
function holdingServer() {
  let held = 0;
  let maxHeld = 0;
  let release = () => {};
  let released = new Promise<void>((resolve) => release = resolve);
  const arrivals: (() => void)[] = [];
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      held++;
      maxHeld = Math.max(maxHeld, held);
      for (const wake of arrivals.splice(0)) wake();
      await released;
      held--;
      const token = /^Bearer (.+)$/.exec(req.headers.get("authorization") ?? "")
        ?.[1];
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
    } finally {
      clearInterval(pump);
    }
    assert.equal(auth.maxHeld, 3);
    assert.deepEqual(
      results.map((r) => r.valid && r.username),
      Array.from({ length: 10 }, (_, i) => `user-t${i}`),
    );
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
