/**
 * Test harness: real auth and chat servers on port 0 in a temporary data
 * directory, and a WebSocket client that lets tests await frames.
 *
 * @module
 */
import assert from "node:assert/strict";
import { type AuthServer, createAuthServer } from "../auth/server.ts";
import type { ChatLimits } from "../chat/connection_manager.ts";
import { type ChatServer, createChatServer } from "../chat/server.ts";
import { splitServerFrames } from "../chat/protocol.ts";

/** A frame as the tests see it: a decoded JSON object. */
export type Frame = Record<string, unknown>;

/** Options of {@linkcode startStack}. */
export interface StackOptions {
  dataDir?: string;
  /** The chat server's limits (the auth server's throttles stay off). */
  rateLimits?: boolean;
  chatLimits?: Partial<ChatLimits>;
  historyKeep?: number;
  historyMaxBytes?: number;
  historyFlushMs?: number;
  allowedOrigins?: string[];
  publicUrl?: string;
  idleTimeoutSeconds?: number;
  sessionTtlSeconds?: number;
  now?: () => number;
  log?: (line: string) => void;
}

/** Both servers, running. */
export interface Stack {
  auth: AuthServer;
  chat: ChatServer;
  dataDir: string;
  /** Starts a new chat server on the same data directory (after `chat.shutdown()`). */
  restartChat(port?: number): Promise<ChatServer>;
  /** Shuts both down and removes the data directory (unless it was given). */
  close(): Promise<void>;
}

/** Starts auth and chat servers on port 0. */
export async function startStack(options: StackOptions = {}): Promise<Stack> {
  const ownDir = options.dataDir === undefined;
  const dataDir = options.dataDir ??
    await Deno.makeTempDir({ prefix: "chat_test_" });
  let chatUrl = "ws://127.0.0.1:0/ws";
  const auth = await createAuthServer({
    hostname: "127.0.0.1",
    port: 0,
    dataDir,
    chatUrl: () => chatUrl,
    // Auth throttles have their own tests; here they would only get in the way.
    rateLimits: false,
    sessionTtlSeconds: options.sessionTtlSeconds,
    now: options.now,
  });
  const startChat = (port = 0) =>
    createChatServer({
      hostname: "127.0.0.1",
      port,
      dataDir,
      authUrl: auth.url,
      rateLimits: options.rateLimits ?? false,
      limits: options.chatLimits,
      historyKeep: options.historyKeep,
      historyMaxBytes: options.historyMaxBytes,
      historyFlushMs: options.historyFlushMs,
      allowedOrigins: options.allowedOrigins,
      publicUrl: options.publicUrl,
      idleTimeoutSeconds: options.idleTimeoutSeconds,
      log: options.log,
      now: options.now,
    });
  const stack: Stack = {
    auth,
    chat: await startChat(),
    dataDir,
    async restartChat(port = 0) {
      stack.chat = await startChat(port);
      chatUrl = stack.chat.url;
      return stack.chat;
    },
    async close() {
      await stack.chat.shutdown();
      await auth.shutdown();
      if (ownDir) await Deno.remove(dataDir, { recursive: true });
    },
  };
  chatUrl = stack.chat.url;
  return stack;
}

/** Registers a user and logs in; returns the session token. */
export async function login(
  authUrl: string,
  username: string,
  password = "correct horse battery",
): Promise<string> {
  const reg = await fetch(`${authUrl}/register`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username, password }),
  });
  await reg.body?.cancel();
  if (reg.status !== 201 && reg.status !== 409) {
    throw new Error(`register ${username}: ${reg.status}`);
  }
  const res = await fetch(`${authUrl}/login`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username, password }),
  });
  const body = await res.json();
  if (res.status !== 200 || typeof body.token !== "string") {
    throw new Error(`login ${username}: ${res.status} ${JSON.stringify(body)}`);
  }
  return body.token;
}

/** Registers `name` (if new), logs in, and connects a {@linkcode TestClient}. */
export async function connectAs(
  stack: Stack,
  name: string,
): Promise<TestClient> {
  return await TestClient.connect(
    stack.chat.url,
    await login(stack.auth.url, name),
  );
}

/** The client's close, or a failure after `ms` (a close that never comes). */
export async function closedWithin(
  client: TestClient,
  ms: number,
): Promise<CloseEvent> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      client.closed,
      new Promise<never>((_, reject) =>
        timer = setTimeout(
          () => reject(new Error(`not closed within ${ms} ms`)),
          ms,
        )
      ),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** A WebSocket client that records frames and lets tests await them. */
export class TestClient {
  readonly socket: WebSocket;
  readonly frames: Frame[] = [];
  /** Raw text frames as received (to see coalescing). */
  readonly rawFrames: string[] = [];
  #cursor = 0;
  #waiters: (() => void)[] = [];
  readonly opened: Promise<void>;
  readonly closed: Promise<CloseEvent>;

  /** Opens a connection; `headers` default to a bearer token if given. */
  constructor(
    url: string,
    token?: string,
    headers: Record<string, string> = {},
  ) {
    const h = { ...headers };
    if (token !== undefined) h.authorization = `Bearer ${token}`;
    this.socket = new WebSocket(url, { headers: h });
    this.opened = new Promise((resolve, reject) => {
      this.socket.addEventListener("open", () => resolve(), { once: true });
      this.socket.addEventListener(
        "close",
        () => reject(new Error("closed before open")),
        {
          once: true,
        },
      );
    });
    this.opened.catch(() => {});
    this.closed = new Promise((resolve) =>
      this.socket.addEventListener("close", (e) => {
        resolve(e);
        this.#wake();
      }, { once: true })
    );
    this.socket.addEventListener("message", (e) => {
      if (typeof e.data !== "string") return;
      this.rawFrames.push(e.data);
      for (const value of splitServerFrames(e.data)) {
        if (
          typeof value === "object" && value !== null && !Array.isArray(value)
        ) {
          this.frames.push({ ...value });
        }
      }
      this.#wake();
    });
  }

  /** Connects and waits for the `welcome` frame. */
  static async connect(url: string, token: string): Promise<TestClient> {
    const client = new TestClient(url, token);
    await client.next((f) => f.type === "welcome");
    return client;
  }

  /** Sends a frame (an object is JSON-encoded). */
  send(frame: Frame | string): void {
    this.socket.send(typeof frame === "string" ? frame : JSON.stringify(frame));
  }

  /**
   * The next frame (after those already taken) matching `match`; frames
   * skipped on the way are consumed. Fails after `timeoutMs`.
   */
  async next(
    match: (f: Frame) => boolean = () => true,
    timeoutMs = 5000,
  ): Promise<Frame> {
    const deadline = Date.now() + timeoutMs;
    while (true) {
      while (this.#cursor < this.frames.length) {
        const f = this.frames[this.#cursor++]!;
        if (match(f)) return f;
      }
      if (this.socket.readyState === WebSocket.CLOSED) {
        throw new Error(
          `socket closed while waiting; got ${
            JSON.stringify(this.frames.slice(-5)).slice(0, 500)
          }`,
        );
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `timed out waiting for a frame; last: ${
            JSON.stringify(this.frames.slice(-5)).slice(0, 500)
          }`,
        );
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** The next frame of a type. */
  nextOfType(type: string, timeoutMs?: number): Promise<Frame> {
    return this.next((f) => f.type === type, timeoutMs);
  }

  /** Sends `ping` and waits for `pong`: every frame sent before it was handled. */
  async sync(): Promise<void> {
    this.send({ type: "ping" });
    await this.nextOfType("pong");
  }

  /** Closes (if still open) and waits for the close event. */
  async close(code = 1000): Promise<CloseEvent> {
    if (this.socket.readyState === WebSocket.CONNECTING) {
      await this.opened.catch(() => {});
    }
    if (this.socket.readyState === WebSocket.OPEN) this.socket.close(code);
    return await this.closed;
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }
}

/** Waits until `condition` holds, checking after each macrotask; fails after `timeoutMs`. */
export async function waitFor(
  condition: () => boolean,
  timeoutMs = 5000,
  what = "condition",
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** The status line and body of a raw HTTP request over TCP. */
export interface RawResponse {
  status: number;
  head: string;
  body: string;
}

/**
 * Sends a WebSocket upgrade request over a raw TCP connection and reads the
 * answer's status and body (a 101 leaves the body empty), then closes.
 * `headers` add to or replace the handshake's; an empty value leaves one out.
 */
export async function rawUpgrade(
  port: number,
  path: string,
  headers: Record<string, string> = {},
): Promise<RawResponse> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const all: Record<string, string> = {
      host: `127.0.0.1:${port}`,
      upgrade: "websocket",
      connection: "Upgrade",
      "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
      "sec-websocket-version": "13",
    };
    for (const [k, v] of Object.entries(headers)) all[k.toLowerCase()] = v;
    const lines = [
      `GET ${path} HTTP/1.1`,
      ...Object.entries(all).filter(([, v]) => v !== "").map(([k, v]) =>
        `${k}: ${v}`
      ),
      "",
      "",
    ];
    await conn.write(new TextEncoder().encode(lines.join("\r\n")));
    const decoder = new TextDecoder();
    let text = "";
    const buf = new Uint8Array(16 * 1024);
    while (true) {
      const end = text.indexOf("\r\n\r\n");
      if (end >= 0) {
        const head = text.slice(0, end);
        const status = Number(head.split(" ")[1]);
        const length = Number(/content-length:\s*(\d+)/i.exec(head)?.[1] ?? 0);
        if (status === 101 || text.length - end - 4 >= length) {
          return { status, head, body: text.slice(end + 4, end + 4 + length) };
        }
      }
      const n = await conn.read(buf);
      if (n === null) {
        throw new Error(`connection closed; got ${JSON.stringify(text)}`);
      }
      text += decoder.decode(buf.subarray(0, n));
    }
  } finally {
    conn.close();
  }
}

/** Lines of a subprocess's output, which tests can await. */
export class LineWatcher {
  readonly lines: string[] = [];
  #waiters: (() => void)[] = [];
  #ended = false;
  /** Resolves when the stream has ended. */
  readonly done: Promise<void>;

  /** Starts reading `stream` line by line. */
  constructor(stream: ReadableStream<Uint8Array>) {
    this.done = (async () => {
      let rest = "";
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
        const parts = (rest + chunk).split("\n");
        rest = parts.pop() ?? "";
        this.lines.push(...parts);
        this.#wake();
      }
      if (rest !== "") this.lines.push(rest);
      this.#ended = true;
      this.#wake();
    })();
  }

  /** The first line (from the start) matching `re`; fails after `timeoutMs`. */
  async waitFor(re: RegExp, timeoutMs = 10_000): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    while (true) {
      const line = this.lines.find((l) => re.test(l));
      if (line !== undefined) return line;
      const left = deadline - Date.now();
      if (this.#ended || left <= 0) {
        throw new Error(
          `no line matching ${re}; got:\n${this.lines.join("\n")}`,
        );
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiters.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const w of waiters) w();
  }
}

/** Root of the repository, for subprocesses. */
export const REPO_ROOT = new URL("..", import.meta.url).pathname;

/**
 * Completes a WebSocket handshake over raw TCP and returns the connection
 * without reading anything: a client that stops reading, or a dead peer.
 */
export async function openRawWebSocket(
  port: number,
  token: string,
): Promise<Deno.Conn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const request = [
    "GET /ws HTTP/1.1",
    `Host: 127.0.0.1:${port}`,
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
    `Authorization: Bearer ${token}`,
    "",
    "",
  ].join("\r\n");
  await conn.write(new TextEncoder().encode(request));
  return conn;
}

/** A masked client WebSocket frame, as a browser would put it on the wire. */
export function clientWireFrame(
  opcode: number,
  payload: Uint8Array | string,
): Uint8Array {
  const body = typeof payload === "string"
    ? new TextEncoder().encode(payload)
    : payload;
  const extra = body.length < 126 ? 0 : body.length < 65536 ? 2 : 8;
  const out = new Uint8Array(2 + extra + 4 + body.length);
  const view = new DataView(out.buffer);
  out[0] = 0x80 | opcode;
  if (extra === 0) out[1] = 0x80 | body.length;
  else if (extra === 2) {
    out[1] = 0x80 | 126;
    view.setUint16(2, body.length);
  } else {
    out[1] = 0x80 | 127;
    view.setBigUint64(2, BigInt(body.length));
  }
  const mask = crypto.getRandomValues(new Uint8Array(4));
  out.set(mask, 2 + extra);
  for (let i = 0; i < body.length; i++) {
    out[2 + extra + 4 + i] = body[i]! ^ mask[i & 3]!;
  }
  return out;
}

/** What a raw client read before the server's close frame (or the end). */
export interface RawReading {
  /** The text frames' payloads, in order. */
  texts: string[];
  /** The close frame's code, or undefined if the stream ended without one. */
  closeCode?: number;
}

/**
 * Reads server frames from a raw connection opened with
 * {@linkcode openRawWebSocket} (skipping the handshake answer) until the
 * server's close frame or the end of the stream.
 */
export async function readRawFrames(conn: Deno.Conn): Promise<RawReading> {
  const texts: string[] = [];
  const decoder = new TextDecoder();
  let data = new Uint8Array(0);
  let pos = -1;
  const buf = new Uint8Array(64 * 1024);
  while (true) {
    const n = await conn.read(buf).catch(() => null);
    if (n === null) return { texts };
    const next = new Uint8Array(data.length + n);
    next.set(data);
    next.set(buf.subarray(0, n), data.length);
    data = next;
    if (pos < 0) {
      const end = decoder.decode(data).indexOf("\r\n\r\n");
      if (end < 0) continue;
      pos = end + 4;
    }
    const view = new DataView(data.buffer);
    while (pos + 2 <= data.length) {
      const opcode = data[pos]! & 0x0f;
      let length = data[pos + 1]! & 0x7f;
      let head = 2;
      if (length === 126) {
        if (pos + 4 > data.length) break;
        length = view.getUint16(pos + 2);
        head = 4;
      } else if (length === 127) {
        if (pos + 10 > data.length) break;
        length = Number(view.getBigUint64(pos + 2));
        head = 10;
      }
      if (pos + head + length > data.length) break;
      const payload = data.subarray(pos + head, pos + head + length);
      pos += head + length;
      if (opcode === 1) texts.push(decoder.decode(payload));
      if (opcode === 8) {
        return {
          texts,
          closeCode: length >= 2 ? view.getUint16(pos - length) : 1005,
        };
      }
    }
  }
}

/** A child process's exit status; fails if it has not exited within `ms`. */
export async function statusWithin(
  child: Deno.ChildProcess,
  ms: number,
): Promise<Deno.CommandStatus> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const status = await Promise.race([
    child.status,
    new Promise<undefined>((resolve) =>
      timer = setTimeout(() => resolve(undefined), ms)
    ),
  ]);
  clearTimeout(timer);
  if (status === undefined) throw new Error(`still running after ${ms} ms`);
  return status;
}

/**
 * SIGTERM to a server process, then: exit 0 within 15 s, its output read to
 * the end, and no uncaught error or stack trace on stderr.
 */
export async function terminatesCleanly(
  child: Deno.ChildProcess,
  stdout: LineWatcher,
  stderr: LineWatcher,
): Promise<void> {
  child.kill("SIGTERM");
  assert.equal(
    (await statusWithin(child, 15_000)).code,
    0,
    stderr.lines.join("\n"),
  );
  await Promise.all([stdout.done, stderr.done]);
  assert.doesNotMatch(stderr.lines.join("\n"), /Uncaught|^\s+at /m);
}

/**
 * Opens idle TCP connections to `port` until one is refused (or reset: the
 * listener closed under the handshake), as a server out of file descriptors
 * does, or until `stopped()` says the server has seen it (its log): the
 * kernel completes handshakes into the listener's backlog (511 in this
 * runtime) whether or not the server still accepts, so how many get in
 * before the first refusal depends on timing. Fails if `max` connections
 * all got in (the default, 450, stays under the backlog: a connect past it
 * would wait rather than fail). The caller closes them.
 */
export async function connectUntilRefused(
  port: number,
  stopped: () => boolean = () => false,
  max = 450,
): Promise<Deno.TcpConn[]> {
  const held: Deno.TcpConn[] = [];
  while (held.length < max && !stopped()) {
    try {
      held.push(await Deno.connect({ hostname: "127.0.0.1", port }));
    } catch (err) {
      if (
        !(err instanceof Deno.errors.ConnectionRefused ||
          err instanceof Deno.errors.ConnectionReset)
      ) {
        for (const conn of held) conn.close();
        throw err;
      }
      return held;
    }
  }
  if (stopped()) return held;
  for (const conn of held) conn.close();
  throw new Error(`${max} connections got in: no descriptor limit was reached`);
}

/**
 * `attempt()`'s result once it stops throwing, asked every 50 ms; its last
 * error after `timeoutMs` (for a state change the server does not announce
 * to the test, such as listening again).
 */
export async function retryUntil<T>(
  attempt: () => Promise<T>,
  timeoutMs: number,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await attempt();
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

/**
 * Cleanup for a test's server process: SIGTERM unless it has exited (`deno
 * task` passes SIGTERM on to the server it runs, where SIGKILL would leave
 * that server behind), then its exit.
 */
export async function stopChild(child: Deno.ChildProcess): Promise<void> {
  try {
    child.kill("SIGTERM");
  } catch {
    // Already gone.
  }
  await child.status;
}
