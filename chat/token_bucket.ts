/**
 * A token bucket: `burst` tokens at most, refilled at `perSecond`.
 *
 * @module
 */

/** A token bucket; time comes from the caller so tests control it. */
export class TokenBucket {
  #tokens: number;
  #updated: number;
  readonly #burst: number;
  readonly #perSecond: number;

  /** A full bucket at time `now` (ms). */
  constructor(burst: number, perSecond: number, now: number) {
    this.#burst = burst;
    this.#perSecond = perSecond;
    this.#tokens = burst;
    this.#updated = now;
  }

  /**
   * Takes one token. Returns 0 when it was there, otherwise the milliseconds
   * until one will be.
   */
  take(now: number): number {
    this.#refill(now);
    if (this.#tokens >= 1) {
      this.#tokens -= 1;
      return 0;
    }
    if (!(this.#perSecond > 0)) return 60_000;
    return Math.ceil(((1 - this.#tokens) / this.#perSecond) * 1000);
  }

  /**
   * 0 when the bucket holds anything, otherwise the milliseconds until it
   * will (see {@linkcode TokenBucket.spend}).
   */
  wait(now: number): number {
    this.#refill(now);
    if (this.#tokens > 0) return 0;
    if (!(this.#perSecond > 0)) return 60_000;
    return Math.max(1, Math.ceil((-this.#tokens / this.#perSecond) * 1000));
  }

  /**
   * Takes `amount` tokens, into debt if need be: for a cost known only once
   * it was paid (the size of an answer), checked with {@linkcode TokenBucket.wait}
   * before the next.
   */
  spend(amount: number, now: number): void {
    this.#refill(now);
    this.#tokens -= amount;
  }

  /** Whether the bucket is full again at `now` (forgetting it changes nothing). */
  isFull(now: number): boolean {
    this.#refill(now);
    return this.#tokens >= this.#burst;
  }

  #refill(now: number): void {
    const elapsed = Math.max(0, now - this.#updated) / 1000;
    this.#tokens = Math.min(
      this.#burst,
      this.#tokens + elapsed * this.#perSecond,
    );
    this.#updated = now;
  }
}
