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

/** How a check is asked for. */
export interface TokenCheckOptions {
  /**
   * A check nobody waits on (a session re-check): it goes after the checks
   * of upgrades, and leaves them a few places.
   */
  background?: boolean;
}

/** Checks a token; see {@linkcode createTokenValidator}. */
export type TokenValidator = (
  token: string,
  options?: TokenCheckOptions,
) => Promise<TokenCheck>;

/** Places in flight that background checks leave to upgrades. */
const RESERVED_FOR_UPGRADES = 2;
/**
 * Largest `/validate_tokens` body: well under the auth server's 64 KiB, so
 * that odd (long, quote-laden) tokens cannot make a batch refused whole.
 */
const MAX_BATCH_BYTES = 32 * 1024;
/** After a 404 to `/validate_tokens`, how long until a batch is tried again. */
const BATCH_RETRY_MS = 60_000;

interface Waiting {
  token: string;
  deadline: number;
  settled: boolean;
  background: boolean;
  /** Goes alone (its batch got an answer that could not be used). */
  single: boolean;
  resolve: (check: TokenCheck) => void;
  reject: (err: unknown) => void;
  timer: ReturnType<typeof setTimeout>;
}

/**
 * Returns a function that checks a token. Concurrent checks of one token
 * share a single request, and at most `maxInFlight` requests run at once
 * (a connect storm reuses a few kept-alive connections instead of opening
 * hundreds); background checks (re-checks) wait behind those of upgrades
 * and leave them two places. Checks that wait for a place go together: one
 * lone check is the contract's `/validate_token`; several queued at once (a
 * crowd, the session re-checks) are one `/validate_tokens` request of up to
 * {@linkcode MAX_BATCH_TOKENS} (and 32 KiB). An auth server without it
 * (404) gets one `/validate_token` per check for a minute before a batch is
 * tried again; a batch answered otherwise unusably goes again one check at
 * a time. Throws {@linkcode AuthUnavailableError} when there is no
 * trustworthy answer in time: callers fail closed.
 */
export function createTokenValidator(
  options: TokenValidatorOptions,
): TokenValidator {
  const { authUrl, timeoutMs = 2000, maxInFlight = 8 } = options;
  const inFlight = new Map<
    string,
    { promise: Promise<TokenCheck>; w: Waiting }
  >();
  let queue: Waiting[] = [];
  let active = 0;
  let batchesOffUntil = 0;
  let pumping = false;
  const baseUrl = () => typeof authUrl === "function" ? authUrl() : authUrl;

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
      if (Array.isArray(checks)) {
        batch.forEach((w, i) => settle(w, checks[i]!));
        return;
      }
      const again = batch.filter((w) => !w.settled);
      if (checks === "unsupported") {
        // An auth server of the contract alone: one token per request.
        batchesOffUntil = performance.now() + BATCH_RETRY_MS;
      } else {
        for (const w of again) w.single = true;
      }
      queue = [...again, ...queue];
    } catch (err) {
      const error = err instanceof AuthUnavailableError
        ? err
        : unavailable(base, err);
      for (const w of batch) settle(w, error);
    } finally {
      clearTimeout(timer);
    }
  };

  /** The next request's checks: upgrades' first, then background ones. */
  const takeBatch = (): Waiting[] => {
    const batching = performance.now() >= batchesOffUntil;
    const ordered = [
      ...queue.filter((w) => !w.background),
      ...queue.filter((w) => w.background),
    ];
    const batch: Waiting[] = [];
    let bytes = 16;
    for (const w of ordered) {
      const size = JSON.stringify(w.token).length + 1;
      if (
        batch.length > 0 &&
        (w.single || batch.length >= MAX_BATCH_TOKENS ||
          bytes + size > MAX_BATCH_BYTES)
      ) break;
      batch.push(w);
      bytes += size;
      if (w.single || !batching) break;
    }
    const taken = new Set(batch);
    queue = queue.filter((w) => !taken.has(w));
    return batch;
  };

  const pump = (): void => {
    pumping = false;
    for (;;) {
      // Checks whose time ran out while queued have been answered already.
      queue = queue.filter((w) => !w.settled);
      if (queue.length === 0) return;
      const upgrades = queue.some((w) => !w.background);
      const places = upgrades
        ? maxInFlight
        : Math.max(1, maxInFlight - RESERVED_FOR_UPGRADES);
      if (active >= places) return;
      const batch = takeBatch();
      active++;
      send(baseUrl(), batch).finally(() => {
        active--;
        pump();
      });
    }
  };

  return function validateToken(
    token: string,
    options: TokenCheckOptions = {},
  ): Promise<TokenCheck> {
    const background = options.background ?? false;
    const known = inFlight.get(token);
    if (known !== undefined) {
      // An upgrade waiting on a re-check's request moves it up the queue.
      if (!background) known.w.background = false;
      return known.promise;
    }
    let w!: Waiting;
    const promise = new Promise<TokenCheck>((resolve, reject) => {
      w = {
        token,
        deadline: performance.now() + timeoutMs,
        settled: false,
        background,
        single: false,
        resolve,
        reject,
        timer: setTimeout(() => {
          settle(
            w,
            unavailable(
              baseUrl(),
              new DOMException("Timed out", "TimeoutError"),
            ),
          );
        }, timeoutMs),
      };
    }).finally(() => inFlight.delete(token));
    inFlight.set(token, { promise, w });
    queue.push(w);
    // Checks asked for in the same turn go together.
    if (!pumping) {
      pumping = true;
      queueMicrotask(pump);
    }
    return promise;
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
 * server does not have it (an auth server of the contract alone),
 * "unusable" for any other answer that is not one per token.
 */
async function requestChecks(
  base: string,
  tokens: string[],
  signal: AbortSignal,
): Promise<TokenCheck[] | "unsupported" | "unusable"> {
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
    return "unusable";
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
