/**
 * Abuse limits of the auth server: failed logins per username and per client
 * address, registrations per client address. All state is in memory, swept
 * lazily so the maps cannot grow without bound.
 *
 * @module
 */

/** Every limit of the auth server. Times are in milliseconds. */
export interface AuthLimits {
  /** Failed logins a username may have within `loginFailureWindowMs` before backoff starts. Default 5. */
  loginFreeFailures: number;
  /** Failures older than this (since the last one) are forgotten. Default 15 minutes. */
  loginFailureWindowMs: number;
  /** First wait once the free failures are used up; doubles with each further failure. Default 1 s. */
  loginBackoffBaseMs: number;
  /** Longest wait the doubling reaches: how long a stranger can keep a user waiting. Default 5 minutes. */
  loginBackoffMaxMs: number;
  /** An address that logged in to an account is exempt from that account's backoff this long. Default 30 days. */
  trustedAddressMs: number;
  /** Failed logins an address may make per hour (a burst of this many, then one per hour/N). Default 100. */
  loginFailuresPerAddressHour: number;
  /** Registrations an address may make at once. Default 3. */
  registrationBurst: number;
  /** Then one registration per this interval. Default 6 s. */
  registrationIntervalMs: number;
  /**
   * Password hashes (Argon2id) computed at the same moment. Each holds
   * 19 MiB, and more than the cores brings no speed, only memory and CPU
   * taken from `/validate_token`. Not lifted by `rateLimits: false`. Default 4.
   */
  hashThreads: number;
  /**
   * Requests that may wait for a hash while `hashThreads` compute; the next
   * gets 503 busy, so at most `hashThreads + maxHashWaiting` (4 + 64 = 68)
   * requests needing a hash are served at once. Not lifted by
   * `rateLimits: false`. Default 64.
   */
  maxHashWaiting: number;
  /**
   * Group commit: while password checks are running or waiting (more
   * changes are coming), a file write waits for them up to this long, so a burst
   * shares few writes. An idle server writes at once. Default 300 ms.
   */
  maxCommitDelayMs: number;
  /** Largest request body in bytes; larger gets 413. Default 65536. */
  maxBodyBytes: number;
  /** Longest wait for a whole request body; a stalled one gets 408. Default 10,000 ms. */
  bodyTimeoutMs: number;
  /** Most usernames or addresses each limiter tracks; the oldest are forgotten beyond it. Default 100,000. */
  maxTrackedKeys: number;
  /**
   * Live sessions one user may hold; a login beyond it ends that user's
   * oldest session. Default 100.
   */
  maxSessionsPerUser: number;
}

/** The defaults of {@linkcode AuthLimits}. */
export const DEFAULT_AUTH_LIMITS: Readonly<AuthLimits> = Object.freeze({
  loginFreeFailures: 5,
  loginFailureWindowMs: 15 * 60_000,
  loginBackoffBaseMs: 1_000,
  loginBackoffMaxMs: 5 * 60_000,
  trustedAddressMs: 30 * 24 * 3_600_000,
  loginFailuresPerAddressHour: 100,
  registrationBurst: 3,
  registrationIntervalMs: 6_000,
  hashThreads: 4,
  maxHashWaiting: 64,
  maxCommitDelayMs: 300,
  maxBodyBytes: 64 * 1024,
  bodyTimeoutMs: 10_000,
  maxTrackedKeys: 100_000,
  maxSessionsPerUser: 100,
});

const SWEEP_INTERVAL_MS = 60_000;
const MAX_TRUSTED_PER_USER = 8;

/** A permission to try one login, settled with {@linkcode LoginThrottle.succeeded}. */
export interface LoginTicket {
  username: string | undefined;
  address: string;
  bypassed: boolean;
  trust: Trust | undefined;
}

/** An address that logged in to an account, and its failures since. */
interface Trust {
  until: number;
  failures: number;
}

/** The answer of a limiter: go ahead, or wait `retryAfterMs`. */
export type Admission<T> =
  | { ok: true; ticket: T }
  | { ok: false; retryAfterMs: number };

/**
 * Failed-login throttle. Each attempt counts as a failure when it starts (so
 * parallel guesses cannot slip through together) and is refunded when it
 * succeeds. Per username: `loginFreeFailures` free, then a doubling wait
 * capped at `loginBackoffMaxMs`; an address that has logged in to the account
 * before skips that wait until it has failed `loginFreeFailures` times itself,
 * so a stranger cannot lock the owner out. Per address: a token bucket of
 * `loginFailuresPerAddressHour` per hour.
 */
export class LoginThrottle {
  #limits: AuthLimits;
  #now: () => number;
  #users = new Map<
    string,
    { failures: number; lastAt: number; nextAt: number }
  >();
  #trusted = new Map<string, Map<string, Trust>>();
  #addresses: TokenBuckets;
  #lastSweep: number;

  /** Builds a throttle with `limits` and a clock in ms. */
  constructor(limits: AuthLimits, now: () => number) {
    this.#limits = limits;
    this.#now = now;
    this.#addresses = new TokenBuckets({
      capacity: limits.loginFailuresPerAddressHour,
      intervalMs: 3_600_000 / limits.loginFailuresPerAddressHour,
      maxKeys: limits.maxTrackedKeys,
    });
    this.#lastSweep = now();
  }

  /** Usernames and addresses tracked now (for tests of pruning). */
  get size(): number {
    return this.#users.size + this.#addresses.size + this.#trusted.size;
  }

  /**
   * Asks to try a login for `username` (lower-cased; `undefined` when it
   * breaks the rules and only the address counts) from `address`.
   */
  admit(
    username: string | undefined,
    address: string,
  ): Admission<LoginTicket> {
    const now = this.#now();
    this.#maybeSweep(now);
    const limits = this.#limits;
    let state = username === undefined ? undefined : this.#users.get(username);
    if (
      state !== undefined && now - state.lastAt > limits.loginFailureWindowMs
    ) {
      this.#users.delete(username ?? "");
      state = undefined;
    }
    let trust = username === undefined
      ? undefined
      : this.#trusted.get(username)?.get(address);
    if (trust !== undefined && trust.until <= now) trust = undefined;
    // A trusted address loses its exemption once it fails as often as a stranger may.
    const bypassed = trust !== undefined &&
      trust.failures < limits.loginFreeFailures;
    if (
      state !== undefined && !bypassed &&
      state.failures >= limits.loginFreeFailures && now < state.nextAt
    ) {
      return { ok: false, retryAfterMs: state.nextAt - now };
    }
    const wait = this.#addresses.take(address, now);
    if (wait > 0) return { ok: false, retryAfterMs: wait };
    if (trust !== undefined) trust.failures++;
    if (username !== undefined) {
      if (state === undefined) {
        state = { failures: 0, lastAt: now, nextAt: now };
        evictOldest(this.#users, limits.maxTrackedKeys);
        this.#users.set(username, state);
      }
      state.failures++;
      state.lastAt = now;
      const over = state.failures - limits.loginFreeFailures;
      if (over >= 0) {
        state.nextAt = now +
          Math.min(
            limits.loginBackoffBaseMs * 2 ** over,
            limits.loginBackoffMaxMs,
          );
      }
    }
    return { ok: true, ticket: { username, address, bypassed, trust } };
  }

  /** Refunds an attempt that never checked a password (the server was busy). */
  cancelled(ticket: LoginTicket): void {
    this.#addresses.refund(ticket.address, this.#now());
    const state = ticket.username === undefined
      ? undefined
      : this.#users.get(ticket.username);
    if (state !== undefined) state.failures = Math.max(0, state.failures - 1);
    if (ticket.trust !== undefined) {
      ticket.trust.failures = Math.max(0, ticket.trust.failures - 1);
    }
  }

  /** Refunds a successful attempt and trusts its address for that account. */
  succeeded(ticket: LoginTicket): void {
    const now = this.#now();
    this.#addresses.refund(ticket.address, now);
    const { username, address } = ticket;
    if (username === undefined) return;
    const state = this.#users.get(username);
    if (state !== undefined) {
      // A trusted address does not wipe out a stranger's failures.
      if (ticket.bypassed) state.failures = Math.max(0, state.failures - 1);
      else this.#users.delete(username);
    }
    let trusted = this.#trusted.get(username);
    if (trusted === undefined) {
      evictOldest(this.#trusted, this.#limits.maxTrackedKeys);
      trusted = new Map();
      this.#trusted.set(username, trusted);
    }
    trusted.delete(address);
    evictOldest(trusted, MAX_TRUSTED_PER_USER);
    trusted.set(address, {
      until: now + this.#limits.trustedAddressMs,
      failures: 0,
    });
  }

  #maybeSweep(now: number): void {
    if (now - this.#lastSweep < SWEEP_INTERVAL_MS) return;
    this.#lastSweep = now;
    for (const [name, state] of this.#users) {
      if (
        now - state.lastAt > this.#limits.loginFailureWindowMs &&
        now >= state.nextAt
      ) this.#users.delete(name);
    }
    for (const [name, trusted] of this.#trusted) {
      for (const [address, trust] of trusted) {
        if (trust.until <= now) trusted.delete(address);
      }
      if (trusted.size === 0) this.#trusted.delete(name);
    }
    this.#addresses.sweep(now);
  }
}

/**
 * Registration throttle: a token bucket per client address. Only requests
 * that pass validation take a token (see the handler's `register`).
 */
export class RegistrationThrottle {
  #buckets: TokenBuckets;
  #now: () => number;
  #lastSweep: number;

  /** Builds a throttle with `limits` and a clock in ms. */
  constructor(limits: AuthLimits, now: () => number) {
    this.#buckets = new TokenBuckets({
      capacity: limits.registrationBurst,
      intervalMs: limits.registrationIntervalMs,
      maxKeys: limits.maxTrackedKeys,
    });
    this.#now = now;
    this.#lastSweep = now();
  }

  /** Addresses tracked now. */
  get size(): number {
    return this.#buckets.size;
  }

  /** Takes one registration for `address`; returns 0, or the ms to wait. */
  take(address: string): number {
    const now = this.#now();
    if (now - this.#lastSweep >= SWEEP_INTERVAL_MS) {
      this.#lastSweep = now;
      this.#buckets.sweep(now);
    }
    return this.#buckets.take(address, now);
  }

  /** Gives back a registration that did not happen through no fault of the client (busy server, server error). */
  refund(address: string): void {
    this.#buckets.refund(address, this.#now());
  }
}

interface TokenBucketsOptions {
  capacity: number;
  intervalMs: number;
  maxKeys: number;
}

/** Token buckets by key, refilled lazily: one token per `intervalMs` up to `capacity`. */
class TokenBuckets {
  #capacity: number;
  #intervalMs: number;
  #maxKeys: number;
  #buckets = new Map<string, { tokens: number; at: number }>();

  constructor(options: TokenBucketsOptions) {
    const { capacity, intervalMs, maxKeys } = options;
    this.#capacity = capacity;
    this.#intervalMs = intervalMs;
    this.#maxKeys = maxKeys;
  }

  get size(): number {
    return this.#buckets.size;
  }

  take(key: string, now: number): number {
    const bucket = this.#refill(key, now);
    if (bucket.tokens >= 1) {
      bucket.tokens -= 1;
      return 0;
    }
    return Math.max(1, Math.ceil((1 - bucket.tokens) * this.#intervalMs));
  }

  refund(key: string, now: number): void {
    const bucket = this.#refill(key, now);
    bucket.tokens = Math.min(this.#capacity, bucket.tokens + 1);
  }

  sweep(now: number): void {
    for (const [key, bucket] of this.#buckets) {
      const tokens = bucket.tokens + (now - bucket.at) / this.#intervalMs;
      if (tokens >= this.#capacity) this.#buckets.delete(key);
    }
  }

  #refill(key: string, now: number): { tokens: number; at: number } {
    let bucket = this.#buckets.get(key);
    if (bucket === undefined) {
      evictOldest(this.#buckets, this.#maxKeys);
      bucket = { tokens: this.#capacity, at: now };
      this.#buckets.set(key, bucket);
    } else {
      bucket.tokens = Math.min(
        this.#capacity,
        bucket.tokens + (now - bucket.at) / this.#intervalMs,
      );
      bucket.at = now;
    }
    return bucket;
  }
}

/** Makes room for one more key by forgetting the oldest inserted ones. */
function evictOldest<K, V>(map: Map<K, V>, max: number): void {
  for (const key of map.keys()) {
    if (map.size < max) return;
    map.delete(key);
  }
}

/** `Retry-After` seconds for a wait in ms: whole seconds, at least 1. */
export function retryAfterSeconds(ms: number): number {
  return Math.max(1, Math.ceil(ms / 1000));
}
