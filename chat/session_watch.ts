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
 * after a back-off of 1 s doubling to 30 s, or after its `Retry-After` when
 * that is longer (at most 30 s).
 *
 * @module
 */
import { authEndpoint } from "./auth_client.ts";

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
  /** Told a line when the watch comes up, goes down, or cannot start. */
  log?: (line: string) => void;
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
const MISSED_HEARTBEATS = 2;
/** Longest wait for the answer and its hello. */
const HELLO_TIMEOUT_MS = 15_000;

const HASH_RE = /^[0-9a-f]{64}$/;

/** Starts watching; see the module's documentation. */
export function watchSessions(options: SessionWatchOptions): SessionWatch {
  let upSince = Infinity;
  let closed = false;
  let controller = new AbortController();
  let wake: (() => void) | undefined;

  const log = options.log ?? (() => {});
  // What was last logged: a line per change, not one per attempt.
  let told = "";
  const tell = (state: string, line: string) => {
    if (state !== told) log(line);
    told = state;
  };
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

  /** Whether the current attempt got its hello. */
  let cameUp = false;
  /** The wait the auth server asked for (`Retry-After`) in the last attempt. */
  let askedWaitMs = 0;

  /** One stream, until it ends: "unsupported", whether it came up, or why not. */
  const watchOnce = async (
    signal: AbortSignal,
  ): Promise<"unsupported" | boolean | string> => {
    const base = typeof options.authUrl === "function"
      ? options.authUrl()
      : options.authUrl;
    // Until the hello: an auth server that accepts and says nothing (or a
    // connection that died on the way) is given up on, and asked again.
    let watchdog: ReturnType<typeof setTimeout> | undefined = setTimeout(
      () => controller.abort(),
      HELLO_TIMEOUT_MS,
    );
    let res: Response;
    try {
      res = await fetch(authEndpoint(base, "/session_events"), { signal });
    } catch (err) {
      clearTimeout(watchdog);
      throw err;
    }
    if (res.status === 404 || res.status === 405) {
      clearTimeout(watchdog);
      await res.body?.cancel().catch(() => {});
      return "unsupported";
    }
    if (res.status !== 200 || res.body === null) {
      clearTimeout(watchdog);
      await res.body?.cancel().catch(() => {});
      // A server with no place for us now says when to come back.
      const seconds = Number(res.headers.get("retry-after") ?? "");
      if (Number.isFinite(seconds) && seconds > 0) {
        askedWaitMs = Math.min(MAX_RETRY_MS, seconds * 1000);
      }
      return `answered ${res.status}`;
    }
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let heartbeatMs = 0;
    let pending = "";
    let hello = false;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return hello || "ended before its hello";
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
            cameUp = true;
            clearTimeout(watchdog);
            const beat = Number(event.heartbeat_ms);
            heartbeatMs = Number.isFinite(beat)
              ? Math.min(300_000, Math.max(1000, beat))
              : 15_000;
            watchdog = setTimeout(
              () => controller.abort(),
              heartbeatMs * MISSED_HEARTBEATS,
            );
            setState(performance.now());
            tell("up", "chat: watching the auth server's session events");
          } else if (event?.type === "ended" && Array.isArray(event.sessions)) {
            const hashes = event.sessions.filter((h): h is string =>
              typeof h === "string" && HASH_RE.test(h)
            );
            if (hashes.length > 0) options.onEnded(hashes);
          }
        }
        if (pending.length > MAX_LINE_CHARS) return hello || "a line too long";
      }
    } finally {
      clearTimeout(watchdog);
      // Down from now, not once the request is gone.
      setState(Infinity);
      await reader.cancel().catch(() => {});
    }
  };

  const loop = async () => {
    let retryMs = FIRST_RETRY_MS;
    while (!closed) {
      controller = new AbortController();
      cameUp = false;
      askedWaitMs = 0;
      let outcome: "unsupported" | boolean | string = false;
      try {
        outcome = await watchOnce(controller.signal);
      } catch (err) {
        // Unreachable, reset, aborted (silent too long, or closing).
        outcome = err instanceof Error ? err.message : String(err);
      }
      setState(Infinity);
      if (closed) break;
      if (outcome === "unsupported") {
        tell(
          "unsupported",
          "chat: the auth server has no session events: sessions are re-checked every interval",
        );
      } else if (cameUp) {
        tell(
          "down",
          `chat: the auth server's session events stopped${
            outcome === true ? "" : ` (${String(outcome).slice(0, 200)})`
          }: sessions are re-checked every interval until they are back`,
        );
      } else {
        const base = typeof options.authUrl === "function"
          ? options.authUrl()
          : options.authUrl;
        tell(
          "down",
          `chat: cannot watch the auth server's session events at ${
            authEndpoint(base, "/session_events")
          } (${
            String(outcome).slice(0, 200)
          }): sessions are re-checked every interval until it can`,
        );
      }
      if (cameUp) retryMs = FIRST_RETRY_MS;
      await sleep(
        outcome === "unsupported"
          ? UNSUPPORTED_RETRY_MS
          : Math.max(retryMs, askedWaitMs),
      );
      if (!cameUp) retryMs = Math.min(MAX_RETRY_MS, retryMs * 2);
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
