/**
 * Checks session tokens with the auth server's `/validate_token`.
 *
 * @module
 */
import { USERNAME_RE } from "../username.ts";

/** What the auth server says of a token. */
export type TokenCheck =
  | {
    valid: true;
    username: string;
    expiresAt: number;
    /**
     * `performance.now()` when the request that got this answer was sent:
     * the answer is at least that recent (see `chat/session_watch.ts`).
     */
    askedAt?: number;
  }
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
  queuedAt: number;
  deadline: number;
  settled: boolean;
  /** Taken into a request (until it comes back to be sent again). */
  sent: boolean;
  background: boolean;
  /** Goes alone (its batch got an answer that could not be used). */
  single: boolean;
  resolve: (check: TokenCheck) => void;
  reject: (err: unknown) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** A first-in-first-out queue whose `shift` costs O(1). */
class Fifo<T> {
  #items: (T | undefined)[] = [];
  #head = 0;

  get size(): number {
    return this.#items.length - this.#head;
  }

  peek(): T | undefined {
    return this.#items[this.#head];
  }

  push(item: T): void {
    this.#items.push(item);
  }

  shift(): T | undefined {
    const item = this.#items[this.#head];
    this.#items[this.#head++] = undefined;
    if (this.#head >= 1024 && this.#head * 2 >= this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }

  /** Puts `items` first, in their order (rare: a batch sent back). */
  unshiftAll(items: T[]): void {
    if (items.length === 0) return;
    this.#items = [...items, ...this.#items.slice(this.#head)];
    this.#head = 0;
  }
}

/**
 * Returns a function that checks a token. Concurrent checks of one token
 * share a single request, and at most `maxInFlight` requests run at once
 * (a connect storm reuses a few kept-alive connections instead of opening
 * hundreds). Background checks (re-checks) go after those of upgrades and
 * leave them two places, until they have waited half the time limit: then
 * they count as upgrades, so that busy upgrades cannot hold them back for
 * good. Checks that wait for a place go together: one lone check is the
 * contract's `/validate_token`; several queued at once (a crowd, the
 * session re-checks) are one `/validate_tokens` request of up to
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
  const upgrades = new Fifo<Waiting>();
  const background = new Fifo<Waiting>();
  let active = 0;
  let batchesOffUntil = 0;
  let pumping = false;
  let lastBase = "";
  const baseUrl = (): string => {
    lastBase = typeof authUrl === "function" ? authUrl() : authUrl;
    return lastBase;
  };

  const settle = (w: Waiting, outcome: TokenCheck | Error): void => {
    if (w.settled) return;
    w.settled = true;
    clearTimeout(w.timer);
    if (outcome instanceof Error) w.reject(outcome);
    else w.resolve(outcome);
  };

  const startTimer = (w: Waiting): void => {
    clearTimeout(w.timer);
    w.deadline = performance.now() + timeoutMs;
    w.timer = setTimeout(() => {
      let base = lastBase;
      try {
        base ||= baseUrl();
      } catch {
        // Named as it was last read (if ever).
      }
      settle(
        w,
        unavailable(base, new DOMException("Timed out", "TimeoutError")),
      );
    }, timeoutMs);
  };

  const schedule = (): void => {
    // Checks asked for in the same turn go together.
    if (pumping) return;
    pumping = true;
    queueMicrotask(pump);
  };

  const send = async (base: string, batch: Waiting[]): Promise<void> => {
    // Not AbortSignal.timeout: its timer would outlive the answer and keep
    // every check's objects alive for the whole timeout.
    const controller = new AbortController();
    const last = Math.max(...batch.map((w) => w.deadline));
    const askedAt = performance.now();
    const stamped = (check: TokenCheck): TokenCheck =>
      check.valid ? { ...check, askedAt } : check;
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
        settle(batch[0]!, stamped(check));
        return;
      }
      const checks = await requestChecks(
        base,
        batch.map((w) => w.token),
        controller.signal,
      );
      if (Array.isArray(checks)) {
        batch.forEach((w, i) => settle(w, stamped(checks[i]!)));
        return;
      }
      const again = batch.filter((w) => !w.settled);
      for (const w of again) {
        w.sent = false;
        // An auth server of the contract alone: one token per request for
        // a while; any other unusable answer: these go one by one.
        if (checks === "unusable") w.single = true;
      }
      if (checks === "unsupported") {
        batchesOffUntil = performance.now() + BATCH_RETRY_MS;
      }
      upgrades.unshiftAll(again.filter((w) => !w.background));
      background.unshiftAll(again.filter((w) => w.background));
    } catch (err) {
      const error = err instanceof AuthUnavailableError
        ? err
        : unavailable(base, err);
      for (const w of batch) settle(w, error);
    } finally {
      clearTimeout(timer);
    }
  };

  /** Drops what no longer waits from the head of a queue. */
  const dropDone = (queue: Fifo<Waiting>, isBackground: boolean): void => {
    for (let w = queue.peek(); w !== undefined; w = queue.peek()) {
      if (!w.settled && !w.sent && (!isBackground || w.background)) return;
      queue.shift();
    }
  };

  /** The next request's checks: upgrades' first, then background ones. */
  const takeBatch = (): Waiting[] => {
    const batching = performance.now() >= batchesOffUntil;
    const batch: Waiting[] = [];
    let bytes = 16;
    // Returns true once the batch is complete.
    const take = (queue: Fifo<Waiting>, isBackground: boolean): boolean => {
      for (;;) {
        dropDone(queue, isBackground);
        const w = queue.peek();
        if (w === undefined) return false;
        const size = JSON.stringify(w.token).length + 1;
        if (
          batch.length > 0 &&
          (w.single || batch.length >= MAX_BATCH_TOKENS ||
            bytes + size > MAX_BATCH_BYTES)
        ) return true;
        queue.shift();
        w.sent = true;
        batch.push(w);
        bytes += size;
        if (w.single || !batching) return true;
      }
    };
    if (!take(upgrades, false)) take(background, true);
    return batch;
  };

  const pump = (): void => {
    pumping = false;
    for (;;) {
      // Background checks waiting for half the time limit count as upgrades.
      const aged = performance.now() - timeoutMs / 2;
      for (;;) {
        dropDone(background, true);
        const w = background.peek();
        if (w === undefined || w.queuedAt > aged) break;
        background.shift();
        w.background = false;
        upgrades.push(w);
      }
      dropDone(upgrades, false);
      if (upgrades.size === 0 && background.size === 0) return;
      const places = upgrades.size > 0
        ? maxInFlight
        : Math.max(1, maxInFlight - RESERVED_FOR_UPGRADES);
      if (active >= places) return;
      let base: string;
      try {
        base = baseUrl();
      } catch (err) {
        for (const w of takeBatch()) settle(w, unavailable(lastBase, err));
        continue;
      }
      const batch = takeBatch();
      if (batch.length === 0) return;
      active++;
      send(base, batch).finally(() => {
        active--;
        pump();
      });
    }
  };

  return function validateToken(
    token: string,
    options: TokenCheckOptions = {},
  ): Promise<TokenCheck> {
    const isBackground = options.background ?? false;
    const known = inFlight.get(token);
    if (known !== undefined) {
      const w = known.w;
      if (!isBackground && w.background && !w.sent && !w.settled) {
        // An upgrade waiting on a queued re-check: it goes as an upgrade,
        // with an upgrade's time limit.
        w.background = false;
        upgrades.push(w);
        startTimer(w);
        schedule();
      }
      return known.promise;
    }
    let w!: Waiting;
    const promise = new Promise<TokenCheck>((resolve, reject) => {
      w = {
        token,
        queuedAt: performance.now(),
        deadline: 0,
        settled: false,
        sent: false,
        background: isBackground,
        single: false,
        resolve,
        reject,
        timer: undefined as unknown as ReturnType<typeof setTimeout>,
      };
    }).finally(() => inFlight.delete(token));
    startTimer(w);
    inFlight.set(token, { promise, w });
    (isBackground ? background : upgrades).push(w);
    schedule();
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

/**
 * The URL of `path` on the auth server at `base`, keeping a path `base` has
 * (an auth server behind a proxy at `https://example.org/auth`), as the
 * terminal client does.
 */
export function authEndpoint(base: string, path: string): string {
  return base.replace(/\/+$/, "") + path;
}

async function requestCheck(
  base: string,
  token: string,
  signal: AbortSignal,
): Promise<TokenCheck> {
  let res: Response;
  let body: unknown;
  try {
    res = await fetch(authEndpoint(base, "/validate_token"), {
      method: "POST",
      headers: { authorization: `Bearer ${token}` },
      signal,
    });
    body = await readJsonLimited(res);
  } catch (err) {
    throw unavailable(base, err);
  }
  if (res.status === 401) return { valid: false };
  const check = res.status === 200 ? readCheck(body) : undefined;
  if (check?.valid === true) return check;
  const badName = res.status === 200 && typeof body === "object" &&
    body !== null && "username" in body &&
    !(typeof body.username === "string" && USERNAME_RE.test(body.username));
  throw new AuthUnavailableError(
    `The auth server at ${base} answered ${res.status} to /validate_token${
      badName ? " with a username outside the username rules" : ""
    }`,
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
    res = await fetch(authEndpoint(base, "/validate_tokens"), {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ tokens }),
      signal,
    });
    body = await readJsonLimited(res);
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

/**
 * Most bytes read of an auth server's answer: a batch of 100 answers is a
 * few KiB, and anything at that address that streams without end must not
 * take the chat server's memory with it.
 */
const MAX_ANSWER_BYTES = 1024 * 1024;

/** The answer's JSON, or undefined when it is not JSON or too long to be ours. */
async function readJsonLimited(res: Response): Promise<unknown> {
  if (res.body === null) return undefined;
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let text = "";
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.length;
    if (total > MAX_ANSWER_BYTES) {
      await reader.cancel().catch(() => {});
      return undefined;
    }
    text += decoder.decode(value, { stream: true });
  }
  try {
    return JSON.parse(text + decoder.decode());
  } catch {
    return undefined;
  }
}

/**
 * One answer of `/validate_token` or `/validate_tokens`, or undefined when
 * it is not one. A username that breaks the contract's rules is not one: it
 * would go into frames and log lines as it is.
 */
function readCheck(result: unknown): TokenCheck | undefined {
  if (typeof result !== "object" || result === null) return undefined;
  if ("valid" in result && result.valid === false) return { valid: false };
  if (
    "valid" in result && result.valid === true && "username" in result &&
    typeof result.username === "string" &&
    USERNAME_RE.test(result.username) && "expires_at" in result &&
    typeof result.expires_at === "string"
  ) {
    const expiresAt = Date.parse(result.expires_at);
    if (!Number.isNaN(expiresAt)) {
      return { valid: true, username: result.username, expiresAt };
    }
  }
  return undefined;
}
