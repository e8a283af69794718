/**
 * The auth server's HTTP API as the client uses it (CONTRACT section 2):
 * register, log in, and ask whether a session is still valid. Every failure
 * becomes a {@linkcode CliError} with one readable line.
 *
 * @module
 */
import { CliError } from "./cli_error.ts";

/** What `/login` hands back. */
export interface LoginResult {
  token: string;
  username: string;
  expiresAt: string;
  chatUrl: string;
}

/** Whether a session is valid, as far as the auth server can say. */
export type TokenState = "valid" | "invalid" | "unreachable";

/** Options shared by the API calls. */
export interface ApiOptions {
  /** The fetch to use; tests may inject one. */
  fetch?: typeof fetch;
  /** How long to wait for an answer, in milliseconds. */
  timeoutMs?: number;
}

/** Registers `username`; resolves to the stored spelling of the name. */
export async function registerUser(
  authUrl: string,
  credentials: { username: string; password: string },
  options: ApiOptions = {},
): Promise<string> {
  const { status, body } = await postJson(
    authUrl,
    "/register",
    credentials,
    undefined,
    options,
  );
  if (status === 201 && isObject(body) && typeof body.username === "string") {
    return body.username;
  }
  throw answerError(
    `cannot register "${credentials.username}"`,
    authUrl,
    status,
    body,
  );
}

/** Logs in; resolves to the session token and the chat address. */
export async function loginUser(
  authUrl: string,
  credentials: { username: string; password: string },
  options: ApiOptions = {},
): Promise<LoginResult> {
  const { status, body, retryAfter } = await postJson(
    authUrl,
    "/login",
    credentials,
    undefined,
    options,
  );
  if (
    status === 200 && isObject(body) && typeof body.token === "string" &&
    typeof body.username === "string" && typeof body.chat_url === "string" &&
    typeof body.expires_at === "string"
  ) {
    return {
      token: body.token,
      username: body.username,
      expiresAt: body.expires_at,
      chatUrl: body.chat_url,
    };
  }
  throw answerError(
    `cannot log in as "${credentials.username}"`,
    authUrl,
    status,
    body,
    retryAfter,
  );
}

/**
 * Asks `/validate_token` whether `token` still names a live session. Never
 * throws: an auth server that cannot be reached is `"unreachable"`.
 */
export async function validateToken(
  authUrl: string,
  token: string,
  options: ApiOptions = {},
): Promise<TokenState> {
  try {
    const { status, body } = await postJson(
      authUrl,
      "/validate_token",
      { token },
      token,
      options,
    );
    if (status === 200 && isObject(body) && body.valid === true) return "valid";
    if (status === 401) return "invalid";
    return "unreachable";
  } catch (err) {
    if (err instanceof CliError) return "unreachable";
    throw err;
  }
}

/** Describes a failed `fetch` in a few words, e.g. `connection refused`. */
export function describeNetworkError(err: unknown): string {
  const text = `${err instanceof Error ? err.message : String(err)} ${
    err instanceof Error && err.cause !== undefined ? String(err.cause) : ""
  }`.toLowerCase();
  if (text.includes("connection refused")) return "connection refused";
  if (text.includes("dns error") || text.includes("lookup address")) {
    return "host not found";
  }
  if (text.includes("timed out") || text.includes("timeout")) {
    return "no answer in time";
  }
  if (text.includes("connection reset")) return "connection reset";
  if (text.includes("blocked")) return "port not allowed";
  if (text.includes("certificate") || text.includes("tls")) return "TLS error";
  return "network error";
}

async function postJson(
  authUrl: string,
  path: string,
  payload: Record<string, unknown>,
  token: string | undefined,
  { fetch: fetchFn = fetch, timeoutMs = 15_000 }: ApiOptions,
): Promise<{ status: number; body: unknown; retryAfter: string | null }> {
  const headers: Record<string, string> = {
    "content-type": "application/json",
  };
  if (token !== undefined) headers.authorization = `Bearer ${token}`;
  let response: Response;
  try {
    response = await fetchFn(authUrl + path, {
      method: "POST",
      headers,
      body: JSON.stringify(payload),
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    throw new CliError(
      `cannot reach the auth server at ${authUrl} (${
        err instanceof DOMException && err.name === "TimeoutError"
          ? "no answer in time"
          : describeNetworkError(err)
      })`,
    );
  }
  let body: unknown = undefined;
  try {
    const text = await response.text();
    body = text === "" ? undefined : JSON.parse(text);
  } catch {
    body = undefined;
  }
  return {
    status: response.status,
    body,
    retryAfter: response.headers.get("retry-after"),
  };
}

function answerError(
  what: string,
  authUrl: string,
  status: number,
  body: unknown,
  retryAfter: string | null = null,
): CliError {
  if (
    isObject(body) && typeof body.error === "string" &&
    typeof body.message === "string"
  ) {
    const why = serverReason(body.message);
    const wait = retryAfter !== null && /^\d+$/.test(retryAfter) &&
        !/\b(retry|try again)\b/i.test(why)
      ? `, try again in ${retryAfter}s`
      : "";
    return new CliError(`${what}: ${why} (${body.error}${wait})`);
  }
  return new CliError(
    `${what}: the auth server at ${authUrl} answered HTTP ${status} without a readable error`,
  );
}

/**
 * The reason in a server's error message. The auth server words its messages
 * like ours, `Cannot register "bob": username is taken`, so the part before
 * the first colon repeats what the client already says it could not do.
 */
function serverReason(message: string): string {
  const text = stripPeriod(message.trim());
  const reason = /^cannot\b[^:]*:\s*(\S.*)$/is.exec(text)?.[1] ?? text;
  return lowerFirst(reason);
}

function stripPeriod(text: string): string {
  return text.replace(/\.\s*$/, "");
}

function lowerFirst(text: string): string {
  return /^[A-Z][a-z]/.test(text)
    ? text[0]!.toLowerCase() + text.slice(1)
    : text;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
