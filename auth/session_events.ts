/**
 * `GET /session_events` (not in the contract): a stream of the sessions
 * that end before their time, for chat servers to close their connections
 * at once instead of at their next re-check of the token.
 *
 * The answer is newline-delimited JSON that does not end: first
 * `{"type":"hello","heartbeat_ms":N}`, then, as sessions end by `/logout`
 * or by the per-user cap, `{"type":"ended","sessions":["<SHA-256 of the
 * token, hex>", ...]}`, and `{"type":"ping"}` every N ms. Only hashes go out,
 * the form the sessions file keeps; sessions that merely expire are not
 * told (their holders know `expires_at`). At most `maxWatchers` streams at
 * once, `maxPerAddress` of them from one client address (more get 503
 * `busy`: one address cannot take every place), and a watcher that does not
 * read is cut off once `maxBufferedBytes` wait for it: a chat server that
 * was not watching checks its tokens again.
 *
 * @module
 */

/** Options of {@linkcode SessionEvents}. */
export interface SessionEventsOptions {
  /** Streams open at once, at most. Default 64. */
  maxWatchers?: number;
  /** Streams open at once from one client address, at most. Default 4. */
  maxPerAddress?: number;
  /** A ping goes to every stream this often. Default 15,000 ms. */
  heartbeatMs?: number;
  /** Bytes waiting for one watcher before it is cut off. Default 1 MiB. */
  maxBufferedBytes?: number;
}

interface Watcher {
  controller: ReadableStreamDefaultController<Uint8Array>;
  address: string;
}

const encoder = new TextEncoder();

/** The open `/session_events` streams of one auth server. */
export class SessionEvents {
  readonly #maxWatchers: number;
  readonly #maxPerAddress: number;
  readonly #heartbeatMs: number;
  readonly #maxBufferedBytes: number;
  #watchers = new Set<Watcher>();
  /** Open streams per client address. */
  #addresses = new Map<string, number>();
  #timer: ReturnType<typeof setInterval> | undefined;
  #closed = false;

  constructor(options: SessionEventsOptions = {}) {
    this.#maxWatchers = options.maxWatchers ?? 64;
    this.#maxPerAddress = options.maxPerAddress ?? 4;
    this.#heartbeatMs = options.heartbeatMs ?? 15_000;
    this.#maxBufferedBytes = options.maxBufferedBytes ?? 1024 * 1024;
  }

  /** Streams open now. */
  get size(): number {
    return this.#watchers.size;
  }

  /**
   * A new stream's response for a client at `address`, or undefined when
   * there are too many, in all or from that address (or it closed).
   */
  open(address: string): Response | undefined {
    const fromAddress = this.#addresses.get(address) ?? 0;
    if (
      this.#closed || this.#watchers.size >= this.#maxWatchers ||
      fromAddress >= this.#maxPerAddress
    ) {
      return undefined;
    }
    this.#addresses.set(address, fromAddress + 1);
    let watcher!: Watcher;
    const body = new ReadableStream<Uint8Array>({
      start: (controller) => {
        watcher = { controller, address };
      },
      cancel: () => this.#remove(watcher),
    }, { highWaterMark: 0, size: (chunk) => chunk.byteLength });
    this.#watchers.add(watcher);
    this.#send(watcher, { type: "hello", heartbeat_ms: this.#heartbeatMs });
    this.#timer ??= setInterval(
      () => this.#sendAll({ type: "ping" }),
      this.#heartbeatMs,
    );
    return new Response(body, {
      headers: {
        "content-type": "application/x-ndjson",
        "cache-control": "no-store",
      },
    });
  }

  /** Tells every stream that these sessions (token hashes) ended. */
  ended(tokenHashes: string[]): void {
    if (tokenHashes.length > 0) {
      this.#sendAll({ type: "ended", sessions: tokenHashes });
    }
  }

  /** Ends every stream; no more open. Idempotent. */
  close(): void {
    this.#closed = true;
    for (const watcher of [...this.#watchers]) {
      this.#remove(watcher);
      try {
        watcher.controller.close();
      } catch {
        // Already errored or closed.
      }
    }
  }

  #sendAll(event: unknown): void {
    const line = encoder.encode(`${JSON.stringify(event)}\n`);
    for (const watcher of [...this.#watchers]) this.#enqueue(watcher, line);
  }

  #send(watcher: Watcher, event: unknown): void {
    this.#enqueue(watcher, encoder.encode(`${JSON.stringify(event)}\n`));
  }

  #enqueue(watcher: Watcher, line: Uint8Array): void {
    const { controller } = watcher;
    try {
      if ((controller.desiredSize ?? 0) < -this.#maxBufferedBytes) {
        this.#remove(watcher);
        controller.error(new Error("the watcher does not read"));
        return;
      }
      // Each its own copy: the runtime may hand the bytes on as they are.
      controller.enqueue(line.slice());
    } catch {
      // The stream is gone (the peer left): forget it.
      this.#remove(watcher);
    }
  }

  #remove(watcher: Watcher): void {
    if (!this.#watchers.delete(watcher)) return;
    const count = this.#addresses.get(watcher.address) ?? 0;
    if (count <= 1) this.#addresses.delete(watcher.address);
    else this.#addresses.set(watcher.address, count - 1);
    if (this.#watchers.size === 0 && this.#timer !== undefined) {
      clearInterval(this.#timer);
      this.#timer = undefined;
    }
  }
}
