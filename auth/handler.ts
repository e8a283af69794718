/**
 * The auth HTTP API (CONTRACT section 2) as a plain request handler:
 * `/register`, `/login`, `/validate_token`, `/logout`, `/health`.
 *
 * @module
 */
import { tokenHash } from "../token_hash.ts";
import {
  errorResponse,
  HttpError,
  jsonResponse,
  serverErrorResponse,
} from "./http_error.ts";
import { HashBusyError, HashLimiter } from "./hash_limiter.ts";
import { type AuthStore, StorageError, type UserRecord } from "./json_store.ts";
import { USERNAME_RE } from "../username.ts";
import { requestUrl } from "../request_url.ts";
import type { SessionEvents } from "./session_events.ts";
import {
  DUMMY_HASH,
  hashPassword,
  needsRehash,
  verifyPassword,
} from "./password.ts";
import {
  type AuthLimits,
  DEFAULT_AUTH_LIMITS,
  LoginThrottle,
  type LoginTicket,
  RegistrationThrottle,
  retryAfterSeconds,
} from "./rate_limit.ts";
import {
  type BodyLimits,
  discardBody,
  drainBody,
  readJsonObject,
} from "./read_json_object.ts";

/** Options of {@linkcode createAuthHandler}. */
export interface AuthHandlerOptions {
  /** Where users and sessions live. */
  store: AuthStore;
  /**
   * The chat address `/login` hands out; a function is asked on every login,
   * with the URL the login request was made to.
   */
  chatUrl: string | ((requestUrl: URL) => string);
  /** Session lifetime in seconds. Default 86400. */
  sessionTtlSeconds?: number;
  /** `false` lifts the login and registration throttles (not the hash bound, not size limits). Default true. */
  rateLimits?: boolean;
  /** Overrides of {@linkcode DEFAULT_AUTH_LIMITS}. */
  limits?: Partial<AuthLimits>;
  /** Receives one line per auth event. Default: no logging. */
  log?: (line: string) => void;
  /**
   * The streams of `GET /session_events` (not in the contract, see
   * `session_events.ts`); without it that path is 404.
   */
  events?: SessionEvents;
  /** Clock in ms. Default `Date.now`. */
  now?: () => number;
}

/** A request handler in the shape `Deno.serve` takes. */
export type AuthHandler = (
  req: Request,
  info: Deno.ServeHandlerInfo,
) => Promise<Response>;

/** Shortest username, in characters. */
export const MIN_USERNAME_CHARS = 3;
/** Longest username, in characters. */
export const MAX_USERNAME_CHARS = 32;
/** Shortest password, in code points after NFC normalisation. */
export const MIN_PASSWORD_CHARS = 8;
/** Longest password, in code points after NFC normalisation. */
export const MAX_PASSWORD_CHARS = 1024;

const BEARER_RE = /^Bearer[ \t]+([^\s]+)[ \t]*$/i;
const TOKEN_BYTES = 32;
const SESSION_PRUNE_INTERVAL_MS = 60_000;
/** `Retry-After` of a `503 storage_unavailable` (a data file cannot be written). */
const STORAGE_RETRY_AFTER_S = 5;

interface Route {
  /** Methods answered, in the order `Allow` lists them. */
  methods: string[];
  handle: (req: Request, address: string) => Promise<Response>;
}

/** Builds the auth API handler over an open {@linkcode AuthStore}. */
export function createAuthHandler(options: AuthHandlerOptions): AuthHandler {
  const {
    store,
    chatUrl,
    sessionTtlSeconds = 86400,
    rateLimits = true,
    log = () => {},
    now = Date.now,
  } = options;
  const limits: AuthLimits = { ...DEFAULT_AUTH_LIMITS, ...options.limits };
  const bodyLimits: BodyLimits = {
    maxBytes: limits.maxBodyBytes,
    timeoutMs: limits.bodyTimeoutMs,
  };
  const hashes = new HashLimiter({
    concurrency: limits.hashThreads,
    maxWaiting: limits.maxHashWaiting,
  });
  // A hash running or waiting is a change on its way: writes wait for it to group.
  store.setCommitDelay(limits.maxCommitDelayMs, () => hashes.pending > 0);
  const loginThrottle = new LoginThrottle(limits, now);
  const registrationThrottle = new RegistrationThrottle(limits, now);
  let lastPrune = now();

  function event(
    action: string,
    outcome: string,
    user: string | undefined,
    address: string,
    detail = "",
  ): void {
    log(
      `${new Date(now()).toISOString()} auth ${action} ${outcome} user=${
        logValue(user)
      } addr=${logValue(address)}${detail === "" ? "" : ` ${detail}`}`,
    );
  }

  function throttled(
    action: string,
    user: string | undefined,
    address: string,
    retryAfterMs: number,
  ): HttpError {
    const seconds = retryAfterSeconds(retryAfterMs);
    event(action, "throttled", user, address, `retry_after=${seconds}`);
    return new HttpError(
      429,
      "rate_limited",
      `Cannot ${
        action === "login" ? "log in" : action
      } now: too many attempts, retry in ${seconds} s`,
      { headers: { "retry-after": String(seconds) } },
    );
  }

  async function hashJob<T>(
    action: string,
    user: string,
    address: string,
    job: () => Promise<T>,
  ): Promise<T> {
    try {
      return await hashes.run(job);
    } catch (err) {
      if (!(err instanceof HashBusyError)) throw err;
      event(action, "busy", user, address);
      throw new HttpError(
        503,
        "busy",
        "Cannot check passwords now: the server is busy, retry in a moment",
        { headers: { "retry-after": "1" } },
      );
    }
  }

  async function register(req: Request, address: string): Promise<Response> {
    const body = await readJsonObject(req, bodyLimits);
    const { username, password } = body;
    if (typeof username !== "string" || !USERNAME_RE.test(username)) {
      event(
        "register",
        "fail",
        stringOrUndefined(username),
        address,
        "reason=invalid_username",
      );
      throw new HttpError(
        400,
        "invalid_username",
        "Cannot register: a username is 3 to 32 characters of A-Z, a-z, 0-9, _ . -",
      );
    }
    const normalized = typeof password === "string"
      ? password.normalize("NFC")
      : undefined;
    if (normalized === undefined || !isValidPassword(normalized)) {
      event("register", "fail", username, address, "reason=invalid_password");
      throw new HttpError(
        400,
        "invalid_password",
        `Cannot register "${username}": a password is ${MIN_PASSWORD_CHARS} to ${MAX_PASSWORD_CHARS} characters of Unicode text`,
      );
    }
    // Malformed requests (400, 413) were refused above and cost nothing.
    if (rateLimits) {
      const wait = registrationThrottle.take(address);
      if (wait > 0) throw throttled("register", username, address, wait);
    }
    try {
      await addUser(username, normalized, address);
    } catch (err) {
      // A 409 keeps its cost: /register tells whether a name exists, so the
      // throttle is what keeps it from listing users fast. A busy or failing
      // server is not the client's fault.
      const taken = err instanceof HttpError && err.code === "username_taken";
      if (rateLimits && !taken) registrationThrottle.refund(address);
      throw err;
    }
    event("register", "ok", username, address);
    return jsonResponse(201, { username });
  }

  async function addUser(
    username: string,
    password: string,
    address: string,
  ): Promise<void> {
    const taken = () => {
      event("register", "fail", username, address, "reason=username_taken");
      return new HttpError(
        409,
        "username_taken",
        `Cannot register "${username}": username is taken`,
      );
    };
    if (store.getUser(username) !== undefined) throw taken();
    const passwordHash = await hashJob(
      "register",
      username,
      address,
      () => hashPassword(password),
    );
    const added = await store.addUser({
      username,
      password_hash: passwordHash,
      created_at: new Date(now()).toISOString(),
    });
    if (!added) throw taken();
  }

  async function login(req: Request, address: string): Promise<Response> {
    const body = await readJsonObject(req, bodyLimits);
    const { username, password } = body;
    if (typeof username !== "string") {
      event("login", "fail", undefined, address, "reason=invalid_username");
      throw new HttpError(
        400,
        "invalid_username",
        "Cannot log in: the request needs a string username",
      );
    }
    // The request's shape first (400), then the rules (401, whichever breaks).
    if (typeof password !== "string") {
      event("login", "fail", username, address, "reason=invalid_password");
      throw new HttpError(
        400,
        "invalid_password",
        "Cannot log in: the request needs a string password",
      );
    }
    const validName = USERNAME_RE.test(username);
    const key = validName ? username.toLowerCase() : undefined;
    let ticket: LoginTicket | undefined;
    if (rateLimits) {
      const admission = loginThrottle.admit(key, address);
      if (!admission.ok) {
        throw throttled("login", username, address, admission.retryAfterMs);
      }
      ticket = admission.ticket;
    }
    const normalized = password.normalize("NFC");
    if (!validName || !isValidPassword(normalized)) {
      // Cannot match any account: no hash needed, and nothing to learn.
      throw invalidCredentials(username, address, "reason=rule_breaking");
    }
    let result: { user: UserRecord; rehash: string | undefined } | undefined;
    try {
      result = await hashJob("login", username, address, async () => {
        const user = store.getUser(username);
        const ok = await verifyPassword(
          normalized,
          user?.password_hash ?? DUMMY_HASH,
        );
        if (!ok || user === undefined) return undefined;
        const rehash = needsRehash(user.password_hash)
          ? await hashPassword(normalized)
          : undefined;
        return { user, rehash };
      });
    } catch (err) {
      if (ticket !== undefined) loginThrottle.cancelled(ticket);
      throw err;
    }
    if (result === undefined) {
      throw invalidCredentials(username, address, "reason=wrong_credentials");
    }
    const { user, rehash } = result;
    const token = newToken();
    const createdMs = now();
    const expiresAt = new Date(createdMs + sessionTtlSeconds * 1000)
      .toISOString();
    const rehashed = rehash === undefined
      ? Promise.resolve()
      : store.setPasswordHash(user.username, rehash).then(
        () => event("login", "rehashed", user.username, address),
        (err) =>
          event(
            "login",
            "rehash_failed",
            user.username,
            address,
            `error=${logValue(String(err))}`,
          ),
      );
    const [ended] = await Promise.all([
      store.addSession(
        tokenHash(token),
        {
          username: user.username,
          createdAt: new Date(createdMs).toISOString(),
          expiresAt,
          expiresAtMs: Date.parse(expiresAt),
        },
        rateLimits ? limits.maxSessionsPerUser : Infinity,
      ),
      rehashed,
    ]);
    if (ticket !== undefined) loginThrottle.succeeded(ticket);
    event(
      "login",
      "ok",
      user.username,
      address,
      ended > 0 ? `ended_oldest_sessions=${ended}` : "",
    );
    return jsonResponse(200, {
      token,
      username: user.username,
      expires_at: expiresAt,
      chat_url: typeof chatUrl === "function"
        ? chatUrl(requestUrl(req) ?? new URL("http://127.0.0.1/"))
        : chatUrl,
    });
  }

  function invalidCredentials(
    username: string,
    address: string,
    detail: string,
  ): HttpError {
    event("login", "fail", username, address, detail);
    return new HttpError(
      401,
      "invalid_credentials",
      "Cannot log in: wrong username or password",
    );
  }

  async function validateToken(req: Request): Promise<Response> {
    let token = bearerToken(req);
    if (token !== undefined) {
      await drainBody(req, bodyLimits);
    } else {
      // No token at all is an invalid token, not malformed JSON.
      const body = await readJsonObject(req, bodyLimits, {
        emptyAsObject: true,
      });
      if (typeof body.token === "string") token = body.token;
    }
    const session = token === undefined
      ? undefined
      : store.getSession(tokenHash(token));
    if (session === undefined) throw invalidToken(true);
    return jsonResponse(200, {
      valid: true,
      username: session.username,
      expires_at: session.expiresAt,
    });
  }

  /**
   * Not in the contract: `/validate_token` for up to
   * {@linkcode MAX_BATCH_TOKENS} tokens at once, `{"tokens": [...]}` →
   * `{"results": [...]}` in the same order, each what `/validate_token`
   * says (`{"valid": false}` for an invalid token). The chat server's
   * session re-checks and crowds of upgrades use it.
   */
  async function validateTokens(req: Request): Promise<Response> {
    const { tokens } = await readJsonObject(req, bodyLimits);
    if (
      !Array.isArray(tokens) || tokens.length < 1 ||
      tokens.length > MAX_BATCH_TOKENS ||
      !tokens.every((t) => typeof t === "string")
    ) {
      throw new HttpError(
        400,
        "invalid_json",
        `Expected {"tokens": [...]} with 1 to ${MAX_BATCH_TOKENS} token strings`,
      );
    }
    return jsonResponse(200, {
      results: tokens.map((token: string) => {
        const session = store.getSession(tokenHash(token));
        return session === undefined ? { valid: false } : {
          valid: true,
          username: session.username,
          expires_at: session.expiresAt,
        };
      }),
    });
  }

  async function logout(req: Request, address: string): Promise<Response> {
    const token = bearerToken(req);
    await drainBody(req, bodyLimits);
    // No separate look-up first: a logout whose write failed is asked again
    // through the store, which writes again.
    const session = token === undefined
      ? undefined
      : await store.removeSession(tokenHash(token));
    if (token === undefined || session === undefined) {
      event("logout", "fail", undefined, address, "reason=invalid_token");
      throw invalidToken(false);
    }
    event("logout", "ok", session.username, address);
    return new Response(null, { status: 204 });
  }

  async function sessionEvents(
    req: Request,
    address: string,
  ): Promise<Response> {
    await drainBody(req, bodyLimits);
    const res = options.events?.open(address);
    if (res === undefined) {
      throw new HttpError(
        503,
        "busy",
        "Too many session event streams are open; retry later",
        { headers: { "retry-after": "5" } },
      );
    }
    return res;
  }

  async function health(req: Request): Promise<Response> {
    await drainBody(req, bodyLimits);
    return jsonResponse(200, { status: "ok" });
  }

  const routes = new Map<string, Route>([
    ["/register", { methods: ["POST"], handle: register }],
    ["/login", { methods: ["POST"], handle: login }],
    ["/validate_token", { methods: ["POST"], handle: validateToken }],
    ["/validate_tokens", { methods: ["POST"], handle: validateTokens }],
    ["/logout", { methods: ["POST"], handle: logout }],
    ["/health", { methods: ["GET", "HEAD"], handle: health }],
  ]);
  if (options.events !== undefined) {
    routes.set("/session_events", { methods: ["GET"], handle: sessionEvents });
  }

  return async function handleAuthRequest(req, info) {
    const address = "hostname" in info.remoteAddr
      ? info.remoteAddr.hostname
      : "local";
    let path = "";
    try {
      const url = requestUrl(req);
      if (url === null) {
        // A Host header that is no host ("a b", "x/health?"): nothing to route.
        await discardBody(req);
        throw new HttpError(
          400,
          "invalid_request",
          "The request's Host header is not a valid host",
        );
      }
      path = url.pathname;
      const route = routes.get(path);
      if (route === undefined) {
        await discardBody(req);
        throw new HttpError(404, "not_found", `Cannot find ${path}`);
      }
      if (!route.methods.includes(req.method)) {
        await discardBody(req);
        throw new HttpError(
          405,
          "method_not_allowed",
          `Cannot ${req.method} ${path}: use ${route.methods.join(" or ")}`,
          { headers: { allow: route.methods.join(", ") } },
        );
      }
      const time = now();
      if (time - lastPrune >= SESSION_PRUNE_INTERVAL_MS) {
        lastPrune = time;
        store.pruneSessions().catch((err) =>
          log(
            `${new Date(time).toISOString()} auth error prune: ${
              logValue(String(err))
            }`,
          )
        );
      }
      const res = await route.handle(req, address);
      return req.method === "HEAD" ? await withoutBody(res) : res;
    } catch (err) {
      if (err instanceof HttpError) return errorResponse(err);
      if (err instanceof StorageError) {
        // A full disk is no bug: one line naming the file, no stack.
        log(
          `${new Date(now()).toISOString()} auth error ${req.method} ${
            logValue(path)
          }: storage_unavailable file=${logValue(err.path)} error=${
            logValue(err.reason)
          }`,
        );
        await discardBody(req);
        return errorResponse(
          new HttpError(
            503,
            "storage_unavailable",
            "Cannot save the change: the server cannot save its data right now",
            { headers: { "retry-after": String(STORAGE_RETRY_AFTER_S) } },
          ),
        );
      }
      log(
        `${new Date(now()).toISOString()} auth error ${req.method} ${
          logValue(path)
        }: ${
          logValue(
            err instanceof Error ? err.stack ?? err.message : String(err),
          )
        }`,
      );
      await discardBody(req);
      return serverErrorResponse();
    }
  };
}

/** Tokens one `/validate_tokens` request may ask about. */
export const MAX_BATCH_TOKENS = 100;

function newToken(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(TOKEN_BYTES));
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replaceAll("+", "-").replaceAll("/", "_").replace(
    /=+$/,
    "",
  );
}

/** The answer to HEAD: the GET answer's status and headers, its length, no body. */
async function withoutBody(res: Response): Promise<Response> {
  const length = (await res.arrayBuffer()).byteLength;
  const headers = new Headers(res.headers);
  headers.set("content-length", String(length));
  return new Response(null, { status: res.status, headers });
}

function bearerToken(req: Request): string | undefined {
  const header = req.headers.get("authorization");
  if (header === null) return undefined;
  return BEARER_RE.exec(header)?.[1];
}

function invalidToken(withValid: boolean): HttpError {
  return new HttpError(
    401,
    "invalid_token",
    "Cannot accept the token: it is unknown, expired or revoked",
    withValid ? { fields: { valid: false } } : {},
  );
}

/**
 * 8 to 1024 code points, and well-formed: a lone surrogate is no character
 * (UTF-8 would turn every one into U+FFFD, so different passwords would
 * hash the same).
 */
function isValidPassword(password: string): boolean {
  // Cheap bound first: a code point is at most 2 UTF-16 units.
  if (password.length > 2 * MAX_PASSWORD_CHARS) return false;
  if (!password.isWellFormed()) return false;
  let n = 0;
  for (const _ of password) n++;
  return n >= MIN_PASSWORD_CHARS && n <= MAX_PASSWORD_CHARS;
}

function stringOrUndefined(value: unknown): string | undefined {
  return typeof value === "string" ? value : undefined;
}

/** A value safe to put in a log line: plain words as they are, anything else JSON-quoted and cut. */
function logValue(value: string | undefined): string {
  if (value === undefined) return "-";
  if (/^[A-Za-z0-9_.:-]{1,64}$/.test(value)) return value;
  return JSON.stringify(
    value.length > 200 ? `${value.slice(0, 200)}...` : value,
  );
}
