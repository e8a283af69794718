/**
 * A latency histogram small enough to ship between processes: 0.1 ms buckets
 * up to 2 s, 10 ms buckets up to 120 s. Load processes record into one and
 * send it to the orchestrator as sparse `[bucket, count, ...]` pairs.
 *
 * @module
 */

const FINE_BUCKETS = 20_000; // 0.1 ms each: 0 to 2000 ms
const COARSE_BUCKETS = 11_800; // 10 ms each: 2000 ms to 120000 ms
const FINE_LIMIT_MS = 2000;

/** The wire form of a {@linkcode Histogram}. */
export interface HistogramData {
  /** Flat pairs: bucket index, count. */
  buckets: number[];
  count: number;
  maxMs: number;
}

/** Counts latencies in milliseconds and answers percentiles. */
export class Histogram {
  #counts = new Uint32Array(FINE_BUCKETS + COARSE_BUCKETS);
  #count = 0;
  #maxMs = 0;

  /** Number of values recorded. */
  get count(): number {
    return this.#count;
  }

  /** Largest value recorded, exactly (0 when empty). */
  get maxMs(): number {
    return this.#maxMs;
  }

  /** Records one latency; negative values (clock skew) count as 0. */
  record(ms: number): void {
    const value = ms > 0 ? ms : 0;
    this.#counts[bucketOf(value)]!++;
    this.#count++;
    if (value > this.#maxMs) this.#maxMs = value;
  }

  /** Adds the counts of another histogram, as sent by {@linkcode toData}. */
  merge(data: HistogramData): void {
    for (let i = 0; i + 1 < data.buckets.length; i += 2) {
      const index = data.buckets[i]!;
      if (index >= 0 && index < this.#counts.length) {
        this.#counts[index]! += data.buckets[i + 1]!;
      }
    }
    this.#count += data.count;
    if (data.maxMs > this.#maxMs) this.#maxMs = data.maxMs;
  }

  /** The value below which a fraction `q` (0 to 1) of the values lie; 0 when empty. */
  quantile(q: number): number {
    if (this.#count === 0) return 0;
    const rank = Math.max(1, Math.ceil(q * this.#count));
    let seen = 0;
    for (let i = 0; i < this.#counts.length; i++) {
      seen += this.#counts[i]!;
      if (seen >= rank) return Math.min(bucketMidMs(i), this.#maxMs);
    }
    return this.#maxMs;
  }

  /** The sparse wire form. */
  toData(): HistogramData {
    const buckets: number[] = [];
    for (let i = 0; i < this.#counts.length; i++) {
      const n = this.#counts[i]!;
      if (n !== 0) buckets.push(i, n);
    }
    return { buckets, count: this.#count, maxMs: this.#maxMs };
  }
}

function bucketOf(ms: number): number {
  if (ms < FINE_LIMIT_MS) return Math.floor(ms * 10);
  const coarse = Math.floor((ms - FINE_LIMIT_MS) / 10);
  return FINE_BUCKETS + Math.min(coarse, COARSE_BUCKETS - 1);
}

function bucketMidMs(index: number): number {
  if (index < FINE_BUCKETS) return (index + 0.5) / 10;
  return FINE_LIMIT_MS + (index - FINE_BUCKETS + 0.5) * 10;
}
