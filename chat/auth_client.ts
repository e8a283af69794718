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
  /** Longest wait for an answer. Default 2000 ms. */
  timeoutMs?: number;
}

/**
 * Returns a function that checks a token. Concurrent checks of one token
 * share a single request. Throws {@linkcode AuthUnavailableError} when there
 * is no trustworthy answer: callers fail closed.
 */
export function createTokenValidator(
  options: TokenValidatorOptions,
): (token: string) => Promise<TokenCheck> {
  const { authUrl, timeoutMs = 2000 } = options;
  const inFlight = new Map<string, Promise<TokenCheck>>();
  return function validateToken(token: string): Promise<TokenCheck> {
    let pending = inFlight.get(token);
    if (pending === undefined) {
      const base = typeof authUrl === "function" ? authUrl() : authUrl;
      pending = requestCheck(base, token, timeoutMs).finally(() =>
        inFlight.delete(token)
      );
      inFlight.set(token, pending);
    }
    return pending;
  };
}

async function requestCheck(
  base: string,
  token: string,
  timeoutMs: number,
): Promise<TokenCheck> {
  let res: Response;
  let body: unknown;
  try {
    res = await fetch(new URL("/validate_token", base), {
      method: "POST",
      headers: {
        authorization: `Bearer ${token}`,
        "content-type": "application/json",
      },
      body: JSON.stringify({ token }),
      signal: AbortSignal.timeout(timeoutMs),
    });
    body = await res.json().catch(() => undefined);
  } catch (err) {
    throw new AuthUnavailableError(
      `Cannot reach the auth server at ${base}: ${
        err instanceof Error ? err.message : err
      }`,
    );
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
