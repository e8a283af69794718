/**
 * The auth server: the JSON store, the API handler and `Deno.serve` wired
 * together, with a graceful `shutdown()`. Entry points (`auth/main.ts`, the
 * root `main.ts`) build it from configuration with
 * {@linkcode authOptionsFromConfig}.
 *
 * @module
 */
import { join } from "node:path";
import { defaultChatUrl, httpAddress, type ServerConfig } from "../config.ts";
import { type ResilientServer, serveResilient } from "../serve_resilient.ts";
import { createAuthHandler } from "./handler.ts";
import { serverErrorResponse } from "./http_error.ts";
import { AuthStore, USERS_FILE } from "./json_store.ts";
import { SessionEvents } from "./session_events.ts";
import type { AuthLimits } from "./rate_limit.ts";

export {
  type AuthHandler,
  type AuthHandlerOptions,
  createAuthHandler,
} from "./handler.ts";
export { AuthStore, StorageError, StoreError } from "./json_store.ts";
export { type AuthLimits, DEFAULT_AUTH_LIMITS } from "./rate_limit.ts";

/**
 * How long a shutdown waits for requests in flight. A full hash queue is
 * served well within it; a client that stalls mid-body (which the runtime's
 * graceful shutdown would wait for until it leaves) is not waited for.
 */
export const SHUTDOWN_GRACE_MS = 5000;

/** Options of {@linkcode createAuthServer}. */
export interface AuthServerOptions {
  /** Interface to bind. Default `"127.0.0.1"`. */
  hostname?: string;
  /** Port; 0 picks a free one. Default 8000. */
  port?: number;
  /** Directory of `users.json`, `sessions.json` and `.lock` (created if missing). */
  dataDir: string;
  /**
   * The chat address `/login` hands out; a function is asked on every login,
   * with the URL the login request was made to.
   */
  chatUrl: string | ((requestUrl: URL) => string);
  /** Session lifetime in seconds. Default 86400. */
  sessionTtlSeconds?: number;
  /** `false` lifts login and registration throttles (not the hash bound, not size limits). Default true. */
  rateLimits?: boolean;
  /** Overrides of the default limits. */
  limits?: Partial<AuthLimits>;
  /** Receives one line per auth event. Default: no logging. */
  log?: (line: string) => void;
  /**
   * Told the token hashes of sessions that end early (`/logout`, the
   * per-user cap), as `GET /session_events` tells them: for a chat server in
   * the same process.
   */
  onSessionsEnded?: (tokenHashes: string[]) => void;
  /** Clock in ms, for tests. Default `Date.now`. */
  now?: () => number;
}

/** A running auth server. */
export interface AuthServer {
  /** `http://HOST:PORT` with the real port. */
  url: string;
  hostname: string;
  port: number;
  /** The store, for tests and the benchmark (e.g. `store.fileWrites`). */
  store: AuthStore;
  /** Resolves once the server has shut down and released its files. */
  finished: Promise<void>;
  /**
   * Stops accepting, finishes requests in flight (for at most
   * {@linkcode SHUTDOWN_GRACE_MS}), flushes files, releases the lock.
   * Rejects (the lock released all the same) when revoked sessions whose
   * removal never reached `sessions.json` still cannot be saved: they would
   * be valid again after a restart. Idempotent.
   */
  shutdown(): Promise<void>;
}

/**
 * Opens the store in `options.dataDir` and starts serving. Rejects with a
 * {@linkcode StoreError} naming the file when `users.json` or `sessions.json`
 * does not parse, or when another server holds the directory's lock.
 */
export async function createAuthServer(
  options: AuthServerOptions,
): Promise<AuthServer> {
  const { hostname = "127.0.0.1", port = 8000, dataDir, now } = options;
  const store = await AuthStore.open(dataDir, { now });
  const dropped = store.droppedSessionsOfUnknownUsers;
  if (dropped > 0) {
    options.log?.(
      `${
        new Date((now ?? Date.now)()).toISOString()
      } auth start dropped ${dropped} session${
        dropped === 1 ? "" : "s"
      } of users not in ${join(dataDir, USERS_FILE)}`,
    );
  }
  // Chat servers that watch are told of sessions ended early at once.
  const events = new SessionEvents();
  store.onSessionsEnded = (hashes) => {
    events.ended(hashes);
    try {
      options.onSessionsEnded?.(hashes);
    } catch (err) {
      // The chat server's trouble is not the store's: the change stands.
      options.log?.(
        `auth: telling of ended sessions failed: ${
          err instanceof Error ? err.message : err
        }`,
      );
    }
  };
  const handler = createAuthHandler({ ...options, store, events });
  let httpServer: ResilientServer;
  try {
    httpServer = serveResilient({
      hostname,
      port,
      onError: () => serverErrorResponse(),
      log: (event) =>
        options.log?.(
          `${new Date((now ?? Date.now)()).toISOString()} auth ${event}`,
        ),
    }, handler);
  } catch (err) {
    await store.close();
    throw new Error(
      `Cannot listen on ${httpAddress(hostname, port)}: ${
        err instanceof Error ? err.message : err
      }`,
    );
  }
  // The address bound (`localhost` becomes 127.0.0.1), as the chat server says.
  const { hostname: boundHost, port: realPort } = httpServer.addr;
  const { promise: finished, resolve: resolveFinished } = Promise
    .withResolvers<void>();
  let closing: Promise<void> | undefined;
  return {
    url: httpAddress(boundHost, realPort),
    hostname: boundHost,
    port: realPort,
    store,
    finished,
    shutdown() {
      closing ??= (async () => {
        // Streams that never end would hold the graceful shutdown up.
        events.close();
        let timer: ReturnType<typeof setTimeout> | undefined;
        try {
          await Promise.race([
            httpServer.shutdown(),
            new Promise((resolve) =>
              timer = setTimeout(resolve, SHUTDOWN_GRACE_MS)
            ),
          ]);
        } finally {
          clearTimeout(timer);
          try {
            // Rejects when revoked sessions could not be saved: the entry
            // point says so and exits 1.
            await store.close();
          } finally {
            resolveFinished();
          }
        }
      })();
      return closing;
    },
  };
}

/** What an entry point adds to the configuration. */
export interface AuthConfigExtras {
  /** Overrides the chat address derived from the configuration (e.g. once the chat port is known). */
  chatUrl?: string | ((requestUrl: URL) => string);
  /** Event log; default none. */
  log?: (line: string) => void;
}

/** {@linkcode AuthServerOptions} from the parsed server configuration. */
export function authOptionsFromConfig(
  config: ServerConfig,
  extras: AuthConfigExtras = {},
): AuthServerOptions {
  return {
    hostname: config.authHost,
    port: config.authPort,
    dataDir: config.dataDir,
    chatUrl: extras.chatUrl ?? config.chatPublicUrl ??
      defaultChatUrl(config.chatHost, config.chatPort),
    sessionTtlSeconds: config.sessionTtlSeconds,
    rateLimits: config.rateLimits,
    log: extras.log,
  };
}
