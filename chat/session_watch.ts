/**
 * Watches the auth server's `GET /session_events` (not in the contract, see
 * `auth/session_events.ts`): the sessions that end before their time are
 * told at once, so their connections close at once rather than at the next
 * re-check of their tokens.
 *
 * While the stream is up, the tokens confirmed after it came up need no
 * frequent re-checks (an end would have been told); from the moment it goes
 * down, anything may have been missed, and the usual re-checks apply to
 * every token until it is confirmed again under a new stream. An auth
 * server without the stream (404 or 405, or an answer that does not start
 * with its hello) is asked again after a minute; one that fails otherwise,
 * after a back-off of 1 s doubling to 30 s.
 *
 * @module
 */

/** Options of {@linkcode watchSessions}. */
export interface SessionWatchOptions {
  /** Base URL of the auth server, or a function giving it. */
  authUrl: string | (() => string);
  /** Told the token hashes (SHA-256, hex) of sessions that ended. */
  onEnded: (tokenHashes: string[]) => void;
  /**
   * Told when the stream comes up, with the `performance.now()` at which
   * its hello arrived, and when it goes down, with `Infinity`.
   */
  onState: (upSince: number) => void;
}

/** A running watch; {@linkcode SessionWatch.close} stops it. */
export interface SessionWatch {
  /** `performance.now()` when the current stream came up, `Infinity` while down. */
  readonly upSince: number;
  /** Stops watching; resolves once the request is gone. */
  close(): Promise<void>;
}

/** Wait after an auth server that has no stream. */
const UNSUPPORTED_RETRY_MS = 60_000;
const FIRST_RETRY_MS = 1000;
const MAX_RETRY_MS = 30_000;
/** Longest line taken: an "ended" line of a whole per-user cap is a few KiB. */
const MAX_LINE_CHARS = 1024 * 1024;
/** Silence, in heartbeats, after which the stream counts as dead. */
const MISSED_HEARTBEATS = 3;

const HASH_RE = /^[0-9a-f]{64}$/;

/** Starts watching; see the module's documentation. */
export function watchSessions(options: SessionWatchOptions): SessionWatch {
  let upSince = Infinity;
  let closed = false;
  let controller = new AbortController();
  let wake: (() => void) | undefined;

  const setState = (since: number) => {
    if (since === upSince) return;
    upSince = since;
    options.onState(since);
  };

  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        wake = undefined;
        resolve();
      }
      wake = done;
    });

  /** One stream, until it ends: "unsupported", or whether it came up. */
  const watchOnce = async (
    signal: AbortSignal,
  ): Promise<"unsupported" | boolean> => {
    const base = typeof options.authUrl === "function"
      ? options.authUrl()
      : options.authUrl;
    const res = await fetch(new URL("/session_events", base), { signal });
    if (res.status === 404 || res.status === 405) {
      await res.body?.cancel().catch(() => {});
      return "unsupported";
    }
    if (res.status !== 200 || res.body === null) {
      await res.body?.cancel().catch(() => {});
      return false;
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let watchdog: ReturnType<typeof setTimeout> | undefined;
    let heartbeatMs = 0;
    let pending = "";
    let hello = false;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return hello;
        if (heartbeatMs > 0) {
          clearTimeout(watchdog);
          watchdog = setTimeout(
            () => controller.abort(),
            heartbeatMs * MISSED_HEARTBEATS,
          );
        }
        pending += value;
        for (
          let nl = pending.indexOf("\n");
          nl >= 0;
          nl = pending.indexOf("\n")
        ) {
          const line = pending.slice(0, nl);
          pending = pending.slice(nl + 1);
          const event = parse(line);
          if (!hello) {
            // Not our stream: treated as a server without one.
            if (event?.type !== "hello") return "unsupported";
            hello = true;
            const beat = Number(event.heartbeat_ms);
            heartbeatMs = Number.isFinite(beat)
              ? Math.min(300_000, Math.max(1000, beat))
              : 15_000;
            watchdog = setTimeout(
              () => controller.abort(),
              heartbeatMs * MISSED_HEARTBEATS,
            );
            setState(performance.now());
          } else if (event?.type === "ended" && Array.isArray(event.sessions)) {
            const hashes = event.sessions.filter((h): h is string =>
              typeof h === "string" && HASH_RE.test(h)
            );
            if (hashes.length > 0) options.onEnded(hashes);
          }
        }
        if (pending.length > MAX_LINE_CHARS) return hello;
      }
    } finally {
      clearTimeout(watchdog);
      await reader.cancel().catch(() => {});
    }
  };

  const loop = async () => {
    let retryMs = FIRST_RETRY_MS;
    while (!closed) {
      controller = new AbortController();
      let outcome: "unsupported" | boolean = false;
      try {
        outcome = await watchOnce(controller.signal);
      } catch {
        // Unreachable, reset, aborted (silent too long, or closing).
      }
      setState(Infinity);
      if (closed) break;
      if (outcome === true) retryMs = FIRST_RETRY_MS;
      await sleep(outcome === "unsupported" ? UNSUPPORTED_RETRY_MS : retryMs);
      if (outcome !== true) retryMs = Math.min(MAX_RETRY_MS, retryMs * 2);
    }
  };
  const running = loop();

  return {
    get upSince() {
      return upSince;
    },
    async close() {
      closed = true;
      controller.abort();
      wake?.();
      await running;
    },
  };
}

function parse(line: string): Record<string, unknown> | undefined {
  try {
    const value: unknown = JSON.parse(line);
    return typeof value === "object" && value !== null && !Array.isArray(value)
      ? value as Record<string, unknown>
      : undefined;
  } catch {
    return undefined;
  }
}
