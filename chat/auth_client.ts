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

/**
 * Returns a function that checks a token. Concurrent checks of one token
 * share a single request, and at most `maxInFlight` requests run at once
 * (a connect storm reuses a few kept-alive connections instead of opening
 * hundreds). Throws {@linkcode AuthUnavailableError} when there is no
 * trustworthy answer in time: callers fail closed.
 */
export function createTokenValidator(
  options: TokenValidatorOptions,
): (token: string) => Promise<TokenCheck> {
  const { authUrl, timeoutMs = 2000, maxInFlight = 8 } = options;
  const inFlight = new Map<string, Promise<TokenCheck>>();
  const waiting: (() => void)[] = [];
  let active = 0;
  const acquire = (signal: AbortSignal): Promise<void> => {
    if (active < maxInFlight) {
      active++;
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const grant = () => {
        signal.removeEventListener("abort", onAbort);
        resolve();
      };
      const onAbort = () => {
        waiting.splice(waiting.indexOf(grant), 1);
        reject(signal.reason);
      };
      waiting.push(grant);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  };
  // A finished request hands its place straight to the next in line.
  const release = () => {
    const next = waiting.shift();
    if (next !== undefined) next();
    else active--;
  };
  const check = async (base: string, token: string): Promise<TokenCheck> => {
    // Not AbortSignal.timeout: its timer would outlive the answer and keep
    // every check's objects alive for the whole timeout.
    const controller = new AbortController();
    const timer = setTimeout(
      () => controller.abort(new DOMException("Timed out", "TimeoutError")),
      timeoutMs,
    );
    try {
      try {
        await acquire(controller.signal);
      } catch (err) {
        throw unavailable(base, err);
      }
      try {
        return await requestCheck(base, token, controller.signal);
      } finally {
        release();
      }
    } finally {
      clearTimeout(timer);
    }
  };
  return function validateToken(token: string): Promise<TokenCheck> {
    let pending = inFlight.get(token);
    if (pending === undefined) {
      const base = typeof authUrl === "function" ? authUrl() : authUrl;
      pending = check(base, token).finally(() => inFlight.delete(token));
      inFlight.set(token, pending);
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
