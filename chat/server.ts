/**
 * The chat server: checks each session token with the auth server, upgrades
 * `/ws` to a WebSocket, and hands the socket to the {@linkcode ConnectionManager}.
 *
 * @module
 */
import {
  AuthUnavailableError,
  createTokenValidator,
  type TokenCheck,
} from "./auth_client.ts";
import {
  type ChatLimits,
  ConnectionManager,
  DEFAULT_CHAT_LIMITS,
} from "./connection_manager.ts";
import { HistoryStore } from "./history.ts";
import { type SessionWatch, watchSessions } from "./session_watch.ts";
import { type ResilientServer, serveResilient } from "../serve_resilient.ts";
import { requestUrl } from "../request_url.ts";

/** Options of {@linkcode createChatServer}. */
export interface ChatServerOptions {
  /** Interface to bind. Default `127.0.0.1`. */
  hostname?: string;
  /** Port; 0 picks a free one. Default 8001. */
  port?: number;
  /** History lives in `<dataDir>/history/`. */
  dataDir: string;
  /** Base URL of the auth server, or a function giving it. */
  authUrl: string | (() => string);
  /** Origins allowed besides the server's own. */
  allowedOrigins?: string[];
  /**
   * The chat address `/login` hands out (`CHAT_PUBLIC_URL`), when set: its
   * path is served as well as `/ws`, and its origin is the server's own.
   */
  publicUrl?: string;
  /** False lifts message rates and connection caps. Default true. */
  rateLimits?: boolean;
  limits?: Partial<ChatLimits>;
  /** Messages kept per room. Default 1000. */
  historyKeep?: number;
  /**
   * Most bytes the kept messages of all rooms hold in memory; past it the
   * rooms holding the most lose their oldest. Default 512 MiB.
   */
  historyMaxBytes?: number;
  /** Longest delay before history reaches the disk. Default 1000 ms. */
  historyFlushMs?: number;
  /** Longest wait for the auth server. Default 2000 ms. */
  authTimeoutMs?: number;
  /**
   * How sessions that end early at the auth server are told, so that their
   * connections close at once: `"watch"` its `GET /session_events` (not in
   * the contract; the default), `"in_process"` (an auth server in this
   * process calls {@linkcode ChatServer.endSessions}), or `"none"` (the
   * re-checks alone, for an auth server of the contract only).
   */
  sessionEvents?: "watch" | "in_process" | "none";
  /** Seconds without an answer to the runtime's pings before a peer is dropped. Default 30. */
  idleTimeoutSeconds?: number;
  log?: (line: string) => void;
  now?: () => number;
}

/** A running chat server. */
export interface ChatServer {
  /** `ws://host:port/ws` */
  url: string;
  /** `http://host:port` */
  httpUrl: string;
  hostname: string;
  port: number;
  /** Resolves once the server has shut down and flushed its history. */
  finished: Promise<void>;
  /** Number of open WebSocket connections. */
  readonly connections: number;
  /**
   * Closes the connections of sessions that ended (token hashes, as the
   * auth server's session events name them) with 1008: for an auth server
   * in the same process (`sessionEvents: "in_process"`).
   */
  endSessions(tokenHashes: string[]): void;
  /** Closes every WebSocket with 1001, stops listening, flushes history. Idempotent. */
  shutdown(): Promise<void>;
}

/**
 * How long, at most, a shutdown keeps the listener for the peers to answer
 * the close frames (a round trip, usually milliseconds).
 */
const CLOSE_ANSWER_MS = 1000;

/** Starts a chat server; resolves once it listens. */
export async function createChatServer(
  options: ChatServerOptions,
): Promise<ChatServer> {
  const {
    hostname = "127.0.0.1",
    port = 8001,
    dataDir,
    log = () => {},
  } = options;
  const history = await HistoryStore.open(`${dataDir}/history`, {
    keep: options.historyKeep,
    maxBytes: options.historyMaxBytes,
    dedupWindowMs: options.limits?.dedupWindowMs ??
      DEFAULT_CHAT_LIMITS.dedupWindowMs,
    flushIntervalMs: options.historyFlushMs,
    now: options.now,
    log,
  });
  const validateToken = createTokenValidator({
    authUrl: options.authUrl,
    timeoutMs: options.authTimeoutMs,
  });
  const manager = new ConnectionManager({
    history,
    validateToken,
    rateLimits: options.rateLimits,
    limits: options.limits,
    log,
    now: options.now,
  });
  let watch: SessionWatch | undefined;
  // The address it listens on, by the name it was given (its port is known
  // once it listens): a page from there is its own, as the default
  // CHAT_PUBLIC_URL says.
  let listening: string | undefined;
  const handler = createChatHandler({
    manager,
    validateToken,
    watching: () =>
      options.sessionEvents === "in_process" ||
      (watch?.upSince ?? Infinity) < Infinity,
    allowedOrigins: options.allowedOrigins ?? [],
    publicUrl: options.publicUrl,
    listeningOrigin: () => listening,
    idleTimeoutSeconds: options.idleTimeoutSeconds ?? 30,
    log,
  });
  let server: ResilientServer;
  try {
    // It binds before it returns.
    server = serveResilient({
      hostname,
      port,
      onError: (err) => {
        log(
          `chat: unexpected error: ${err instanceof Error ? err.stack : err}`,
        );
        return jsonError(500, "server_error", "Something went wrong");
      },
      log: (event) => log(`chat: ${event}`),
    }, handler);
  } catch (err) {
    await manager.close();
    await history.close();
    const shown = hostname.includes(":") ? `[${hostname}]` : hostname;
    throw new Error(
      `Cannot listen on http://${shown}:${port}: ${
        err instanceof Error ? err.message : err
      }`,
    );
  }
  if (hostname !== "0.0.0.0" && hostname !== "::" && hostname !== "") {
    const name = hostname.includes(":") ? `[${hostname}]` : hostname;
    listening = `http://${name.toLowerCase()}:${server.addr.port}`;
  }
  // Told in process, nothing can go untold: every confirmation is covered.
  if (options.sessionEvents === "in_process") {
    manager.setWatchedSince(-Infinity);
  }
  if ((options.sessionEvents ?? "watch") === "watch") {
    watch = watchSessions({
      authUrl: options.authUrl,
      onEnded: (hashes) => manager.endSessions(hashes),
      onState: (since) => manager.setWatchedSince(since),
      log,
    });
  }
  const addr = server.addr;
  const host = addr.hostname.includes(":")
    ? `[${addr.hostname}]`
    : addr.hostname;
  let stopping: Promise<void> | undefined;
  const { promise: finished, resolve: resolveFinished } = Promise
    .withResolvers<void>();
  return {
    url: `ws://${host}:${addr.port}/ws`,
    httpUrl: `http://${host}:${addr.port}`,
    hostname: addr.hostname,
    port: addr.port,
    finished,
    get connections() {
      return manager.size;
    },
    endSessions(tokenHashes) {
      manager.endSessions(tokenHashes);
    },
    shutdown() {
      stopping ??= (async () => {
        // The close frames (1001) and whatever was queued before them are
        // handed to the runtime at once. The listener stops once the peers
        // have answered them, or after CLOSE_ANSWER_MS at most (upgrades
        // meanwhile get 503 shutting_down): the runtime's own shutdown
        // drops the connections, and a peer still sending when it does
        // loses our 1001 to the reset (so a peer that never answers is let
        // go of then, with its close frame sent).
        let serverDown: Promise<void> | undefined;
        try {
          const closing = manager.close();
          const unwatched = watch?.close();
          let answered: ReturnType<typeof setTimeout> | undefined;
          try {
            await Promise.race([
              closing,
              new Promise((resolve) =>
                answered = setTimeout(resolve, CLOSE_ANSWER_MS)
              ),
            ]);
          } finally {
            clearTimeout(answered);
          }
          serverDown = server.shutdown();
          await Promise.all([closing, unwatched]);
        } finally {
          serverDown ??= server.shutdown();
          // An upgrade whose client left before it was answered never
          // completes (this runtime neither opens nor closes the socket):
          // the graceful shutdown would wait for it forever, so it gets a
          // grace period, then the history is flushed and the process may
          // exit.
          let timer: ReturnType<typeof setTimeout> | undefined;
          await Promise.race([
            serverDown,
            new Promise((resolve) => timer = setTimeout(resolve, 2000)),
          ]);
          clearTimeout(timer);
          try {
            await history.close();
          } finally {
            resolveFinished();
          }
        }
      })();
      return stopping;
    },
  };
}

interface HandlerOptions {
  manager: ConnectionManager;
  validateToken: (token: string) => Promise<TokenCheck>;
  /** Whether the auth server's session events are being watched (`/health` says). */
  watching?: () => boolean;
  allowedOrigins: string[];
  publicUrl?: string;
  /** `http://HOST:PORT` of the address listened on, by its configured name. */
  listeningOrigin?: () => string | undefined;
  idleTimeoutSeconds: number;
  log: (line: string) => void;
}

/**
 * The HTTP handler of the chat server: `/ws` (and the public address's path)
 * upgrades, and `/health`.
 */
export function createChatHandler(
  options: HandlerOptions,
): (
  req: Request,
  info: Deno.ServeHandlerInfo<Deno.NetAddr>,
) => Promise<Response> {
  const { manager, validateToken, allowedOrigins, idleTimeoutSeconds, log } =
    options;
  const allowed = new Set(allowedOrigins.map((o) => o.replace(/\/+$/, "")));
  // Behind a proxy the address clients are given may differ from this
  // server's: its path is served too, and a page from its origin allowed.
  const paths = new Set(["/ws"]);
  if (options.publicUrl !== undefined) {
    const url = new URL(options.publicUrl);
    paths.add(url.pathname);
    allowed.add(`${url.protocol === "wss:" ? "https:" : "http:"}//${url.host}`);
  }
  // An outage of the auth server refuses every upgrade: one line per
  // AUTH_LOG_INTERVAL_MS, not one per refused client (a crowd reconnecting
  // would fill the disk the history needs).
  let authLoggedAt = -Infinity;
  let authUnlogged = 0;
  const logAuthUnavailable = (err: AuthUnavailableError) => {
    const now = performance.now();
    if (now - authLoggedAt < AUTH_LOG_INTERVAL_MS) {
      authUnlogged++;
      return;
    }
    log(
      `chat: ${err.message}${
        authUnlogged > 0
          ? ` (${authUnlogged} more upgrade(s) refused for it since the last line)`
          : ""
      }`,
    );
    authLoggedAt = now;
    authUnlogged = 0;
  };
  return async function handleChat(req, info) {
    const url = requestUrl(req);
    if (url === null) {
      // A Host header that is no host ("a b", "x/health?"): nothing to route.
      await req.body?.cancel().catch(() => {});
      return jsonError(
        400,
        "invalid_request",
        "The request's Host header is not a valid host",
      );
    }
    if (url.pathname === "/health") {
      if (req.method !== "GET" && req.method !== "HEAD") {
        return jsonError(405, "method_not_allowed", "Use GET or HEAD", {
          allow: "GET, HEAD",
        });
      }
      // Not healthy for whoever watches: the listener stops in a moment.
      if (manager.closing) {
        return jsonError(503, "shutting_down", "The server is shutting down");
      }
      const body = JSON.stringify({
        status: "ok",
        connections: manager.size,
        session_events: options.watching?.() ? "watched" : "not_watched",
      });
      return new Response(req.method === "HEAD" ? null : body, {
        headers: {
          "content-type": "application/json",
          "content-length": String(body.length),
        },
      });
    }
    if (!paths.has(url.pathname)) {
      return jsonError(404, "not_found", `Nothing at ${url.pathname}`);
    }
    if (manager.closing) {
      return jsonError(503, "shutting_down", "The server is shutting down");
    }
    // Anything but a GET asking for a WebSocket (a POST, a plain GET) is not
    // an upgrade: 426, as the contract says of every such request to /ws.
    if (
      req.method !== "GET" ||
      req.headers.get("upgrade")?.toLowerCase() !== "websocket"
    ) {
      await req.body?.cancel().catch(() => {});
      return jsonError(
        426,
        "upgrade_required",
        "This endpoint speaks WebSocket only",
        { upgrade: "websocket" },
      );
    }
    const origin = req.headers.get("origin");
    if (
      origin !== null && origin !== options.listeningOrigin?.() &&
      !originAllowed(origin, req, allowed)
    ) {
      return jsonError(
        403,
        "origin_not_allowed",
        `Connections from ${origin.slice(0, 200)} are not allowed`,
      );
    }
    const token = bearerToken(req) ?? url.searchParams.get("token");
    // Tokens are printable ASCII: anything else is refused here, before it
    // could reach a header of the auth call (or the log, through its error).
    if (token === null || !TOKEN_RE.test(token)) {
      return jsonError(401, "invalid_token", "A session token is required");
    }
    const address = info.remoteAddr.hostname;
    if (!manager.reserveAddress(address)) {
      return jsonError(
        429,
        "too_many_connections",
        "Too many connections from this address",
      );
    }
    let upgraded = false;
    try {
      const waitMs = manager.connectWait(address);
      if (waitMs > 0) {
        const seconds = Math.ceil(waitMs / 1000);
        return jsonError(
          429,
          "rate_limited",
          `Too many connection attempts from this address; try again in ${seconds} s`,
          { "retry-after": String(seconds) },
          { retry_after_ms: waitMs },
        );
      }
      let check: TokenCheck;
      try {
        check = await validateToken(token);
      } catch (err) {
        if (!(err instanceof AuthUnavailableError)) throw err;
        logAuthUnavailable(err);
        return jsonError(
          503,
          "auth_unavailable",
          "Cannot check the session right now; try again shortly",
          { "retry-after": "2" },
        );
      }
      if (!check.valid) {
        return jsonError(
          401,
          "invalid_token",
          "The session is unknown, expired or revoked: log in again",
        );
      }
      if (manager.closing) {
        return jsonError(503, "shutting_down", "The server is shutting down");
      }
      if (manager.userAtCapacity(check.username)) {
        return jsonError(
          429,
          "too_many_connections",
          `Too many connections for ${check.username}`,
        );
      }
      let upgrade;
      try {
        upgrade = Deno.upgradeWebSocket(req, {
          idleTimeout: idleTimeoutSeconds,
        });
      } catch (err) {
        // A malformed handshake (no Sec-WebSocket-Key, no Connection: Upgrade...).
        return jsonError(
          400,
          "invalid_request",
          `Not a valid WebSocket handshake: ${
            err instanceof Error ? err.message : err
          }`,
        );
      }
      const { socket, response } = upgrade;
      manager.accept(socket, {
        username: check.username,
        token,
        expiresAt: check.expiresAt,
        address,
        askedAt: check.askedAt,
      });
      upgraded = true;
      return response;
    } finally {
      if (!upgraded) manager.releaseAddress(address);
    }
  };
}

const TOKEN_RE = /^[\x21-\x7e]{1,512}$/;
/** Least time between two log lines about the auth server being unavailable. */
const AUTH_LOG_INTERVAL_MS = 10_000;

function bearerToken(req: Request): string | undefined {
  const header = req.headers.get("authorization");
  if (header === null) return undefined;
  const match = /^Bearer\s+(\S+)\s*$/i.exec(header);
  return match?.[1];
}

/**
 * One listed (the public address's origin among them), or the server's own
 * as the browser reached it: `Host` names the server by an IP address or as
 * `localhost`, and the page came from there. A `Host` that is a domain name
 * could be anybody's (a page whose name is made to point here, "DNS
 * rebinding", sends its own name as both): such an origin must be listed,
 * or be the public address's, or the name the server listens on.
 */
function originAllowed(
  origin: string,
  req: Request,
  allowed: Set<string>,
): boolean {
  if (allowed.has(origin) || allowed.has("*")) return true;
  const host = req.headers.get("host");
  if (host === null || !HOST_BY_ADDRESS_RE.test(host)) return false;
  return origin === `http://${host}` || origin === `https://${host}`;
}

/** A `Host` that is an IPv4 or IPv6 address or `localhost`, with or without a port. */
const HOST_BY_ADDRESS_RE =
  /^(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.]+\]|localhost)(?::\d{1,5})?$/i;

function jsonError(
  status: number,
  error: string,
  message: string,
  headers: Record<string, string> = {},
  extra: Record<string, unknown> = {},
): Response {
  return Response.json({ error, message, ...extra }, { status, headers });
}

export { DEFAULT_CHAT_LIMITS };
