/**
 * Bounds password hashing: each Argon2id job holds 19 MiB, so only a few run
 * at once, a bounded number wait their turn, and the next is refused at once.
 *
 * @module
 */

/** Options of {@linkcode HashLimiter}. */
export interface HashLimiterOptions {
  /** Jobs running at once. */
  concurrency: number;
  /** Jobs waiting for a turn; one more is refused with {@linkcode HashBusyError}. */
  maxWaiting: number;
}

/** Thrown by {@linkcode HashLimiter.run} when the waiting line is full. */
export class HashBusyError extends Error {
  override name = "HashBusyError";
}

/** A counting semaphore with a bounded, first-come-first-served waiting line. */
export class HashLimiter {
  #concurrency: number;
  #maxWaiting: number;
  #running = 0;
  #waiting: (() => void)[] = [];

  /** Builds a limiter; both bounds must be whole numbers (concurrency at least 1). */
  constructor(options: HashLimiterOptions) {
    const { concurrency, maxWaiting } = options;
    if (!Number.isInteger(concurrency) || concurrency < 1) {
      throw new RangeError(
        `Cannot use hash concurrency ${concurrency}: expected a whole number above 0`,
      );
    }
    if (!Number.isInteger(maxWaiting) || maxWaiting < 0) {
      throw new RangeError(
        `Cannot use ${maxWaiting} waiting hashes: expected a whole number`,
      );
    }
    this.#concurrency = concurrency;
    this.#maxWaiting = maxWaiting;
  }

  /** Jobs running now. */
  get running(): number {
    return this.#running;
  }

  /** Jobs waiting now. */
  get waiting(): number {
    return this.#waiting.length;
  }

  /** Jobs running or waiting now. */
  get pending(): number {
    return this.#running + this.#waiting.length;
  }

  /**
   * Runs `job` when a slot is free. Throws {@linkcode HashBusyError} without
   * running it when the waiting line is already full.
   */
  async run<T>(job: () => Promise<T>): Promise<T> {
    if (this.#running >= this.#concurrency) {
      if (this.#waiting.length >= this.#maxWaiting) {
        throw new HashBusyError(
          `Cannot hash now: ${this.#waiting.length} requests are already waiting`,
        );
      }
      // The slot is handed over by #release, so #running stays counted.
      await new Promise<void>((resolve) => this.#waiting.push(resolve));
    } else {
      this.#running++;
    }
    try {
      return await job();
    } finally {
      this.#release();
    }
  }

  #release(): void {
    const next = this.#waiting.shift();
    if (next === undefined) this.#running--;
    else next();
  }
}
