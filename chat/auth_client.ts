/**
 * Checks session tokens with the auth server's `/validate_token`.
 *
 * @module
 */

/** What the auth server says of a token. */
export type TokenCheck =
  | { valid: true; username: string; expiresAt: number }
  | { valid: false };

/** The auth server could not give an answer (down, slow, or broken). */
export class AuthUnavailableError extends Error {
  override name = "AuthUnavailableError";
}

/** Options of {@linkcode createTokenValidator}. */
export interface TokenValidatorOptions {
  /** Base URL of the auth server, or a function giving it. */
  authUrl: string | (() => string);
  /** Longest wait for an answer, queueing included. Default 2000 ms. */
  timeoutMs?: number;
  /** Requests in flight at once; more wait their turn. Default 8. */
  maxInFlight?: number;
}

/** Tokens asked about in one `/validate_tokens` request, at most (the auth server's limit). */
export const MAX_BATCH_TOKENS = 100;

interface Waiting {
  token: string;
  deadline: number;
  settled: boolean;
  resolve: (check: TokenCheck) => void;
  reject: (err: unknown) => void;
  timer: ReturnType<typeof setTimeout>;
}

/**
 * Returns a function that checks a token. Concurrent checks of one token
 * share a single request, and at most `maxInFlight` requests run at once
 * (a connect storm reuses a few kept-alive connections instead of opening
 * hundreds). Checks that wait for a place go together: one lone check is
 * the contract's `/validate_token`; several queued at once (a crowd, the
 * session re-checks) are one `/validate_tokens` request of up to
 * {@linkcode MAX_BATCH_TOKENS}, or, from an auth server without it (404),
 * one `/validate_token` each from then on. Throws
 * {@linkcode AuthUnavailableError} when there is no trustworthy answer in
 * time: callers fail closed.
 */
export function createTokenValidator(
  options: TokenValidatorOptions,
): (token: string) => Promise<TokenCheck> {
  const { authUrl, timeoutMs = 2000, maxInFlight = 8 } = options;
  const inFlight = new Map<string, Promise<TokenCheck>>();
  const queue: Waiting[] = [];
  let active = 0;
  let batches = true;
  let pumping = false;

  const settle = (w: Waiting, outcome: TokenCheck | Error): void => {
    if (w.settled) return;
    w.settled = true;
    clearTimeout(w.timer);
    if (outcome instanceof Error) w.reject(outcome);
    else w.resolve(outcome);
  };

  const send = async (base: string, batch: Waiting[]): Promise<void> => {
    // Not AbortSignal.timeout: its timer would outlive the answer and keep
    // every check's objects alive for the whole timeout.
    const controller = new AbortController();
    const last = Math.max(...batch.map((w) => w.deadline));
    const timer = setTimeout(
      () => controller.abort(new DOMException("Timed out", "TimeoutError")),
      Math.max(0, last - performance.now()),
    );
    try {
      if (batch.length === 1) {
        const check = await requestCheck(
          base,
          batch[0]!.token,
          controller.signal,
        );
        settle(batch[0]!, check);
        return;
      }
      const checks = await requestChecks(
        base,
        batch.map((w) => w.token),
        controller.signal,
      );
      if (checks === "unsupported") {
        // An auth server of the contract alone: one token per request.
        batches = false;
        queue.unshift(...batch.filter((w) => !w.settled));
        return;
      }
      batch.forEach((w, i) => settle(w, checks[i]!));
    } catch (err) {
      const error = err instanceof AuthUnavailableError
        ? err
        : unavailable(base, err);
      for (const w of batch) settle(w, error);
    } finally {
      clearTimeout(timer);
    }
  };

  const pump = (): void => {
    pumping = false;
    while (active < maxInFlight) {
      // Checks whose time ran out while queued have been answered already.
      while (queue.length > 0 && queue[0]!.settled) queue.shift();
      if (queue.length === 0) return;
      const size = batches ? MAX_BATCH_TOKENS : 1;
      const batch = queue.splice(0, size).filter((w) => !w.settled);
      if (batch.length === 0) continue;
      active++;
      const base = typeof authUrl === "function" ? authUrl() : authUrl;
      send(base, batch).finally(() => {
        active--;
        pump();
      });
    }
  };

  return function validateToken(token: string): Promise<TokenCheck> {
    let pending = inFlight.get(token);
    if (pending === undefined) {
      pending = new Promise<TokenCheck>((resolve, reject) => {
        const w: Waiting = {
          token,
          deadline: performance.now() + timeoutMs,
          settled: false,
          resolve,
          reject,
          timer: setTimeout(() => {
            const base = typeof authUrl === "function" ? authUrl() : authUrl;
            settle(
              w,
              unavailable(
                base,
                new DOMException("Timed out", "TimeoutError"),
              ),
            );
          }, timeoutMs),
        };
        queue.push(w);
      }).finally(() => inFlight.delete(token));
      inFlight.set(token, pending);
      // Checks asked for in the same turn go together.
      if (!pumping) {
        pumping = true;
        queueMicrotask(pump);
      }
    }
    return pending;
  };
}

function unavailable(base: string, err: unknown): AuthUnavailableError {
  return new AuthUnavailableError(
    `Cannot reach the auth server at ${base}: ${
      err instanceof Error ? err.message : err
    }`,
  );
}

async function requestCheck(
  base: string,
  token: string,
  signal: AbortSignal,
): Promise<TokenCheck> {
  let res: Response;
  let body: unknown;
  try {
    res = await fetch(new URL("/validate_token", base), {
      method: "POST",
      headers: { authorization: `Bearer ${token}` },
      signal,
    });
    body = await res.json().catch(() => undefined);
  } catch (err) {
    throw unavailable(base, err);
  }
  if (res.status === 401) return { valid: false };
  if (
    res.status === 200 && typeof body === "object" && body !== null &&
    "valid" in body && body.valid === true && "username" in body &&
    typeof body.username === "string" && "expires_at" in body &&
    typeof body.expires_at === "string"
  ) {
    const expiresAt = Date.parse(body.expires_at);
    if (!Number.isNaN(expiresAt)) {
      return { valid: true, username: body.username, expiresAt };
    }
  }
  throw new AuthUnavailableError(
    `The auth server at ${base} answered ${res.status} to /validate_token`,
  );
}

/**
 * Asks `/validate_tokens` about several tokens; "unsupported" when the auth
 * server does not have it (an auth server of the contract alone).
 */
async function requestChecks(
  base: string,
  tokens: string[],
  signal: AbortSignal,
): Promise<TokenCheck[] | "unsupported"> {
  let res: Response;
  let body: unknown;
  try {
    res = await fetch(new URL("/validate_tokens", base), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ tokens }),
      signal,
    });
    body = await res.json().catch(() => undefined);
  } catch (err) {
    throw unavailable(base, err);
  }
  if (res.status === 404 || res.status === 405) return "unsupported";
  const results = res.status === 200 && typeof body === "object" &&
      body !== null && "results" in body && Array.isArray(body.results) &&
      body.results.length === tokens.length
    ? body.results.map(readCheck)
    : [];
  if (results.length !== tokens.length || results.includes(undefined)) {
    throw new AuthUnavailableError(
      `The auth server at ${base} answered ${res.status} to /validate_tokens`,
    );
  }
  return results as TokenCheck[];
}

/** One answer of `/validate_tokens`, or undefined when it is not one. */
function readCheck(result: unknown): TokenCheck | undefined {
  if (typeof result !== "object" || result === null) return undefined;
  if ("valid" in result && result.valid === false) return { valid: false };
  if (
    "valid" in result && result.valid === true && "username" in result &&
    typeof result.username === "string" && "expires_at" in result &&
    typeof result.expires_at === "string"
  ) {
    const expiresAt = Date.parse(result.expires_at);
    if (!Number.isNaN(expiresAt)) {
      return { valid: true, username: result.username, expiresAt };
    }
  }
  return undefined;
}
