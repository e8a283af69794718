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
    const elapsed = Math.max(0, now - this.#updated) / 1000;
    this.#tokens = Math.min(
      this.#burst,
      this.#tokens + elapsed * this.#perSecond,
    );
    this.#updated = now;
    if (this.#tokens >= 1) {
      this.#tokens -= 1;
      return 0;
    }
    return Math.ceil(((1 - this.#tokens) / this.#perSecond) * 1000);
  }
}
