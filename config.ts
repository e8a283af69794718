/**
 * Server configuration: command-line flags win over environment variables,
 * which win over the defaults of the contract (section 1).
 *
 * @module
 */
import { parseArgs } from "node:util";

/** Everything the auth and chat servers are configured with. */
export interface ServerConfig {
  authHost: string;
  authPort: number;
  chatHost: string;
  chatPort: number;
  dataDir: string;
  /** Where the chat server reaches the auth server; `undefined` when not configured (start.ts then uses the real address). */
  authUrl: string | undefined;
  /** The chat address `/login` hands out; `undefined` means `ws://<chat host>:<chat port>/ws`. */
  chatPublicUrl: string | undefined;
  sessionTtlSeconds: number;
  rateLimits: boolean;
  allowedOrigins: string[];
  /** Flags given that this entry point has no use for (its caller says so). */
  ignoredFlags: string[];
}

/** Which entry point is reading the configuration: `--host`/`--port` apply to that server. */
export type ServerRole = "auth" | "chat" | "start";

/** A configuration mistake made by the operator; entry points print it and exit 2. */
export class ConfigError extends Error {
  override name = "ConfigError";
}

/** The usage text of the server entry points. */
export const SERVER_USAGE =
  `Options (flags win over environment variables, which win over defaults):
  --host HOST        interface to bind (AUTH_HOST / CHAT_HOST, default 127.0.0.1)
  --port PORT        port of this server, 0 = pick a free one (AUTH_PORT 8000 / CHAT_PORT 8001);
                     with 'start': the auth server's, the chat server on the next (0: both free)
  --auth-port PORT   with 'start': the auth server's port (with 'auth': as --port)
  --chat-port PORT   with 'start': the chat server's port (with 'chat': as --port;
                     with 'auth': the port of the chat address /login hands out)
  --data-dir DIR     data directory (DATA_DIR, default ./data)
  --auth-url URL     with 'chat': where it reaches the auth server (AUTH_URL)
  --chat-url URL     chat address handed out by /login (CHAT_PUBLIC_URL); the chat
                     server serves its path as well as /ws
  --session-ttl S    session lifetime in seconds (SESSION_TTL, default 86400)
  --help             show this help`;

// The environment variables each server reads; CHAT_HOST and CHAT_PORT make
// the default chat address that the auth server's /login hands out.
const AUTH_READS = [
  "AUTH_HOST",
  "AUTH_PORT",
  "CHAT_HOST",
  "CHAT_PORT",
  "CHAT_PUBLIC_URL",
  "DATA_DIR",
  "SESSION_TTL",
  "RATE_LIMITS",
];
const CHAT_READS = [
  "CHAT_HOST",
  "CHAT_PORT",
  "CHAT_PUBLIC_URL",
  "DATA_DIR",
  "AUTH_URL",
  "RATE_LIMITS",
  "ALLOWED_ORIGINS",
];
const READS: Record<ServerRole, ReadonlySet<string>> = {
  auth: new Set(AUTH_READS),
  chat: new Set(CHAT_READS),
  // Its chat server uses the auth server it starts, not AUTH_URL.
  start: new Set(
    [...AUTH_READS, ...CHAT_READS].filter((name) => name !== "AUTH_URL"),
  ),
};

// The flags each entry point uses: --chat-url is the address /login hands
// out (the chat server serves its path too), --auth-url where the chat
// server finds the auth server (start's uses the one started with it).
const AUTH_FLAGS = new Set([
  "host",
  "port",
  "auth-port",
  "chat-port",
  "data-dir",
  "chat-url",
  "session-ttl",
]);
const USES: Record<ServerRole, ReadonlySet<string>> = {
  auth: AUTH_FLAGS,
  chat: new Set([
    "host",
    "port",
    "chat-port",
    "data-dir",
    "auth-url",
    "chat-url",
  ]),
  // The auth server's flags; its chat server uses the one it starts.
  start: AUTH_FLAGS,
};

/**
 * Parses flags and environment into a {@linkcode ServerConfig}.
 * Throws {@linkcode ConfigError} on unknown flags or bad values.
 */
export function parseServerConfig(
  role: ServerRole,
  args: string[],
  env: (name: string) => string | undefined,
): ServerConfig {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        host: { type: "string" },
        port: { type: "string" },
        "auth-port": { type: "string" },
        "chat-port": { type: "string" },
        "data-dir": { type: "string" },
        "auth-url": { type: "string" },
        "chat-url": { type: "string" },
        "session-ttl": { type: "string" },
      },
    }).values;
  } catch (err) {
    throw new ConfigError(err instanceof Error ? err.message : String(err));
  }
  // A server does not stop for a variable it does not read (AUTH_URL, often
  // set for the client in the same shell, is the chat server's alone). An
  // empty variable counts as unset, as in `AUTH_HOST= deno task auth`.
  const read = (name: string) => {
    const value = READS[role].has(name) ? env(name) : undefined;
    return value === "" ? undefined : value;
  };
  const ignoredFlags = Object.keys(parsed)
    .filter((flag) => !USES[role].has(flag))
    .map((flag) => `--${flag}`);
  // --port, or the same server's own --auth-port / --chat-port: not both.
  const own = role === "auth"
    ? parsed["auth-port"]
    : role === "chat"
    ? parsed["chat-port"]
    : undefined;
  if (own !== undefined && parsed.port !== undefined) {
    throw new ConfigError(
      `Cannot use --port with --${role}-port: they set the same port`,
    );
  }
  const host = parsed.host;
  const authHost = (role !== "chat" ? host : undefined) ?? read("AUTH_HOST") ??
    "127.0.0.1";
  const chatHost = (role !== "auth" ? host : undefined) ?? read("CHAT_HOST") ??
    "127.0.0.1";
  // With start, --port is both servers': 0 picks two free ports, N is the
  // auth server's and N + 1 the chat server's (as 8000 and 8001).
  const [startAuthPort, startChatPort] = role === "start"
    ? startPorts(parsed.port, parsed["auth-port"], parsed["chat-port"])
    : [undefined, undefined];
  const authPortText = (role === "auth" ? parsed.port : startAuthPort) ??
    parsed["auth-port"] ?? read("AUTH_PORT") ?? "8000";
  const chatPortText = (role === "chat" ? parsed.port : startChatPort) ??
    parsed["chat-port"] ?? read("CHAT_PORT") ?? "8001";
  // With start, the chat server uses the auth server it starts: a
  // --auth-url is passed on, so that the entry point can say it is ignored.
  const authUrl = parsed["auth-url"] ?? read("AUTH_URL");
  const chatPublicUrl = parsed["chat-url"] ?? read("CHAT_PUBLIC_URL");
  if (authUrl !== undefined) checkUrl("auth URL", authUrl, ["http:", "https:"]);
  if (chatPublicUrl !== undefined) {
    checkUrl("chat URL", chatPublicUrl, ["ws:", "wss:"]);
  }
  const rateLimitsText = (read("RATE_LIMITS") ?? "on").toLowerCase();
  if (!["on", "off"].includes(rateLimitsText)) {
    throw new ConfigError(
      `Cannot read RATE_LIMITS "${rateLimitsText}": use on or off`,
    );
  }
  return {
    authHost,
    authPort: parsePort("auth port", authPortText),
    chatHost,
    chatPort: parsePort("chat port", chatPortText),
    dataDir: parsed["data-dir"] ?? read("DATA_DIR") ?? "./data",
    authUrl,
    chatPublicUrl,
    sessionTtlSeconds: parsePositiveInt(
      "session TTL",
      parsed["session-ttl"] ?? read("SESSION_TTL") ?? "86400",
    ),
    rateLimits: rateLimitsText === "on",
    allowedOrigins: parseOrigins(read("ALLOWED_ORIGINS") ?? ""),
    ignoredFlags,
  };
}

/** The line an entry point prints for a flag it has no use for. */
export function ignoredFlagNotice(role: ServerRole, flag: string): string {
  const why = flag === "--auth-url"
    ? role === "start"
      ? "the chat server uses the auth server started with it"
      : "it tells the chat server and the client where the auth server is"
    : flag === "--auth-port"
    ? "the chat server finds the auth server at --auth-url"
    : flag === "--chat-url"
    ? "the auth server's /login hands out the chat address"
    : flag === "--session-ttl"
    ? "sessions are the auth server's"
    : "not used by this server";
  return `${role}: ignoring ${flag}: ${why}`;
}

/** The default address of the auth server when `AUTH_URL` is not set. */
export const DEFAULT_AUTH_URL = "http://127.0.0.1:8000";

/**
 * The chat address `/login` hands out for a chat server bound to
 * `host:port`: `ws://host:port/ws`, or, for a server bound to every address
 * (`0.0.0.0`, `::`), the name the client used to reach the auth server
 * (taken from the login request's URL) with the chat port: a client on
 * another machine cannot use `127.0.0.1`.
 */
export function defaultChatUrl(
  host: string,
  port: number,
): string | ((requestUrl: URL) => string) {
  if (host === "0.0.0.0" || host === "::" || host === "[::]") {
    return (requestUrl) => `ws://${requestUrl.hostname}:${port}/ws`;
  }
  const shown = host.includes(":") && !host.startsWith("[")
    ? `[${host}]`
    : host;
  return `ws://${shown}:${port}/ws`;
}

/** `http://host:port` as printed in ready lines. */
export function httpAddress(host: string, port: number): string {
  const shown = host.includes(":") && !host.startsWith("[")
    ? `[${host}]`
    : host;
  return `http://${shown}:${port}`;
}

/** `--port` of start as the two servers' ports, or none given. */
function startPorts(
  port: string | undefined,
  authPort: string | undefined,
  chatPort: string | undefined,
): [string, string] | [undefined, undefined] {
  if (port === undefined) return [undefined, undefined];
  if (authPort !== undefined || chatPort !== undefined) {
    throw new ConfigError(
      "Cannot use --port with --auth-port or --chat-port: --port sets both",
    );
  }
  const n = parsePort("port", port);
  if (n === 65535) {
    throw new ConfigError(
      `Cannot use port "${port}" with start: the chat server takes the next port; use 0 to 65534`,
    );
  }
  return n === 0 ? ["0", "0"] : [String(n), String(n + 1)];
}

/**
 * `ALLOWED_ORIGINS` as the origins browsers send (`*`: any): an entry that is
 * not one would never match, so it is refused rather than ignored.
 */
function parseOrigins(text: string): string[] {
  const origins = [];
  for (const entry of text.split(",").map((s) => s.trim())) {
    if (entry === "") continue;
    if (entry === "*") {
      origins.push(entry);
      continue;
    }
    let url: URL | undefined;
    try {
      url = new URL(entry);
    } catch {
      url = undefined;
    }
    // Browser extensions and app shells (chrome-extension://ID,
    // tauri://localhost) have origins URL does not serialise: scheme://host.
    const origin = url === undefined || url.host === ""
      ? undefined
      : url.origin !== "null"
      ? url.origin
      : `${url.protocol}//${url.host}`;
    if (
      url === undefined || origin === undefined ||
      !["", "/"].includes(url.pathname) || url.search !== "" ||
      url.hash !== "" || url.username !== ""
    ) {
      throw new ConfigError(
        `Cannot use ALLOWED_ORIGINS entry "${entry}": expected an origin such as https://chat.example.com`,
      );
    }
    origins.push(origin);
  }
  return origins;
}

function parsePort(what: string, text: string): number {
  if (!/^\d{1,5}$/.test(text) || Number(text) > 65535) {
    throw new ConfigError(
      `Cannot use ${what} "${text}": expected a number from 0 to 65535`,
    );
  }
  return Number(text);
}

function parsePositiveInt(what: string, text: string): number {
  if (!/^\d{1,10}$/.test(text) || Number(text) < 1) {
    throw new ConfigError(
      `Cannot use ${what} "${text}": expected a whole number of seconds from 1 to 9999999999`,
    );
  }
  return Number(text);
}

function checkUrl(what: string, text: string, protocols: string[]): void {
  let url;
  try {
    url = new URL(text);
  } catch {
    throw new ConfigError(`Cannot use ${what} "${text}": not a URL`);
  }
  if (!protocols.includes(url.protocol)) {
    throw new ConfigError(
      `Cannot use ${what} "${text}": expected ${protocols.join(" or ")}`,
    );
  }
}
