/**
 * Test utilities for the terminal client: real auth and chat servers on port
 * 0 in a temporary directory, the real client as a subprocess whose output is
 * read incrementally, and a plain WebSocket peer. Every wait has a deadline
 * that fails the test; nothing sleeps a fixed time.
 *
 * @module
 */
import { type AuthServer, createAuthServer } from "../auth/server.ts";
import { type ChatServer, createChatServer } from "../chat/server.ts";
import type { ChatLimits } from "../chat/connection_manager.ts";
import { splitServerFrames } from "../chat/protocol.ts";
import type { SyncWriter } from "../cli/line_reader.ts";
import { LineWatcher } from "./_harness.ts";

/** The repository root, where `cli/main.ts` lives. */
export const REPO_ROOT = new URL("../", import.meta.url).pathname;

/** The client's permissions, exactly those of `deno task cli`. */
export const CLI_PERMISSIONS = [
  "--allow-net",
  "--allow-env=NO_COLOR,TERM,CHATROOM_AUTH_URL,AUTH_URL",
];

/** A password that satisfies the contract's rules. */
export const PASSWORD = "secretpw1";

/** Both servers on port 0, sharing one temporary data directory. */
export interface Servers {
  authUrl: string;
  chat: ChatServer;
  dataDir: string;
  /**
   * Shuts the chat server down and starts a new one on the same port, on the
   * same data or on `dataDir`.
   */
  restartChat(dataDir?: string): Promise<ChatServer>;
  /** Shuts everything down and removes the data directory. */
  close(): Promise<void>;
}

/** Options of {@linkcode startServers}. */
export interface ServersOptions {
  /** The auth server's clock (to expire sessions). */
  authNow?: () => number;
  /** Messages the chat server keeps per room. */
  historyKeep?: number;
  /** The chat address `/login` hands out, instead of the real chat server's. */
  chatUrl?: string;
  /** Turns the chat server's abuse limits on, with these values. */
  chatLimits?: Partial<ChatLimits>;
}

/** Starts the auth and chat servers with the abuse limits off. */
export async function startServers(
  options: ServersOptions = {},
): Promise<Servers> {
  const dataDir = await Deno.makeTempDir({ prefix: "chatroom_cli_test_" });
  let chatUrl = "ws://127.0.0.1:1/ws";
  let auth: AuthServer | undefined;
  try {
    auth = await createAuthServer({
      hostname: "127.0.0.1",
      port: 0,
      dataDir,
      chatUrl: () => options.chatUrl ?? chatUrl,
      rateLimits: false,
      ...(options.authNow !== undefined && { now: options.authNow }),
    });
    const authUrl = auth.url;
    const startChat = (port: number, dir = dataDir) =>
      createChatServer({
        hostname: "127.0.0.1",
        port,
        dataDir: dir,
        authUrl,
        rateLimits: options.chatLimits !== undefined,
        ...(options.chatLimits !== undefined && { limits: options.chatLimits }),
        ...(options.historyKeep !== undefined &&
          { historyKeep: options.historyKeep }),
      });
    const servers: Servers = {
      authUrl,
      chat: await startChat(0),
      dataDir,
      async restartChat(dir?: string) {
        const port = servers.chat.port;
        await servers.chat.shutdown();
        servers.chat = await startChat(port, dir);
        return servers.chat;
      },
      async close() {
        await servers.chat.shutdown();
        await auth?.shutdown();
        await Deno.remove(dataDir, { recursive: true });
      },
    };
    chatUrl = servers.chat.url;
    return servers;
  } catch (err) {
    await auth?.shutdown();
    await Deno.remove(dataDir, { recursive: true });
    throw err;
  }
}

/** Registers `username` through the HTTP API. */
export async function register(
  authUrl: string,
  username: string,
  password: string = PASSWORD,
): Promise<void> {
  const res = await fetch(`${authUrl}/register`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username, password }),
  });
  const text = await res.text();
  if (res.status !== 201) {
    throw new Error(`register ${username}: ${res.status} ${text}`);
  }
}

/** Logs in through the HTTP API; resolves to the token and chat address. */
export async function login(
  authUrl: string,
  username: string,
  password: string = PASSWORD,
): Promise<{ token: string; chatUrl: string }> {
  const res = await fetch(`${authUrl}/login`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ username, password }),
  });
  const body: unknown = await res.json();
  if (
    res.status !== 200 || !isObject(body) || typeof body.token !== "string" ||
    typeof body.chat_url !== "string"
  ) {
    throw new Error(`login ${username}: ${res.status} ${JSON.stringify(body)}`);
  }
  return { token: body.token, chatUrl: body.chat_url };
}

/** Something a line must contain (a string) or match (a RegExp). */
export type LineMatch = string | RegExp | ((line: string) => boolean);

/** Output lines of one stream of the client, awaited one after the other. */
export class LineStream {
  /** Every complete line so far (no line endings). */
  readonly lines: string[] = [];
  #cursor = 0;
  #ended = false;
  #wake: (() => void) | null = null;
  #partial = "";
  /** Resolves when the stream has been read to its end. */
  readonly done: Promise<void>;

  /** Starts reading `stream` to its end. */
  constructor(stream: ReadableStream<Uint8Array>) {
    this.done = this.#read(stream);
  }

  /** Everything read so far, lines joined with `\n`. */
  get text(): string {
    return [...this.lines, this.#partial].join("\n");
  }

  /**
   * The next line (after the last one awaited) that matches; lines skipped
   * on the way are consumed. Fails after `timeoutMs` or at the stream's end.
   */
  async next(match: LineMatch, timeoutMs = 8_000): Promise<string> {
    const test = toTest(match);
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      while (this.#cursor < this.lines.length) {
        const line = this.lines[this.#cursor++]!;
        if (test(line)) return line;
      }
      if (this.#ended) {
        throw new Error(
          `output ended before a line matching ${
            String(match)
          }; output was:\n${this.text}`,
        );
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `no line matching ${
            String(match)
          } within ${timeoutMs} ms; output was:\n${this.text}`,
        );
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
      this.#wake = null;
    }
  }

  /** How many lines so far match. */
  count(match: LineMatch): number {
    return this.lines.filter(toTest(match)).length;
  }

  async #read(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      const parts = (this.#partial + decoder.decode(chunk, { stream: true }))
        .split("\n");
      this.#partial = parts.pop() ?? "";
      this.lines.push(...parts);
      this.#wake?.();
    }
    if (this.#partial !== "") this.lines.push(this.#partial);
    this.#partial = "";
    this.#ended = true;
    this.#wake?.();
  }
}

/**
 * Registers alice and bob; bob is connected as a {@linkcode Peer}, alice runs
 * `chatroom login` (still waiting for her password).
 */
export async function bobAndAlice(
  servers: Servers,
): Promise<{ bob: Peer; cli: CliProcess }> {
  await register(servers.authUrl, "alice");
  await register(servers.authUrl, "bob");
  const bob = await Peer.connect(
    servers.chat.url,
    (await login(servers.authUrl, "bob")).token,
  );
  return { bob, cli: loginProcess(servers.authUrl, "alice") };
}

/** The real `chatroom` client running as a subprocess. */
/** What an in-process session prints, as lines to await (see {@linkcode LineStream}). */
export function screen(): { writer: SyncWriter; out: LineStream } {
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const out = new LineStream(
    new ReadableStream<Uint8Array>({
      start(c) {
        controller = c;
      },
    }),
  );
  return {
    writer: {
      writeSync(p: Uint8Array): number {
        controller.enqueue(p.slice());
        return p.length;
      },
    },
    out,
  };
}

/**
 * Typed input for an in-process session: each `type` call is one line,
 * `push` sends keys as they are (escape sequences, Ctrl keys).
 */
export function keyboard(): {
  input: ReadableStream<Uint8Array>;
  type: (line: string) => void;
  push: (keys: string) => void;
} {
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const input = new ReadableStream<Uint8Array>({
    start(c) {
      controller = c;
    },
  });
  const push = (keys: string) =>
    controller.enqueue(new TextEncoder().encode(keys));
  return {
    input,
    type: (line: string) => push(`${line}\n`),
    push,
  };
}

/** `chatroom login --auth-url URL --user NAME --password-stdin`, not yet given the password. */
export function loginProcess(
  authUrl: string,
  username: string,
  env: Record<string, string> = {},
): CliProcess {
  return new CliProcess([
    "login",
    "--auth-url",
    authUrl,
    "--user",
    username,
    "--password-stdin",
  ], env);
}

export class CliProcess {
  readonly #child: Deno.ChildProcess;
  readonly #stdin: WritableStreamDefaultWriter<Uint8Array>;
  #stdinClosed = false;
  /** Lines written to stdout. */
  readonly stdout: LineStream;
  /** Lines written to stderr. */
  readonly stderr: LineStream;

  /** Starts `deno run <permissions> cli/main.ts ...args` with piped stdio. */
  constructor(args: string[], env: Record<string, string> = {}) {
    this.#child = new Deno.Command(Deno.execPath(), {
      args: ["run", ...CLI_PERMISSIONS, "cli/main.ts", ...args],
      cwd: REPO_ROOT,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1", ...env },
    }).spawn();
    this.#stdin = this.#child.stdin.getWriter();
    this.stdout = new LineStream(this.#child.stdout);
    this.stderr = new LineStream(this.#child.stderr);
  }

  /** Types lines into the client (each gets a newline). */
  async write(...lines: string[]): Promise<void> {
    await this.#stdin.write(
      new TextEncoder().encode(lines.map((l) => l + "\n").join("")),
    );
  }

  /** Ends the client's input (end of file). */
  async closeStdin(): Promise<void> {
    if (this.#stdinClosed) return;
    this.#stdinClosed = true;
    await this.#stdin.close().catch(() => {});
  }

  /**
   * Waits for the client to exit and for all its output; kills it and fails
   * after `timeoutMs`.
   */
  async exit(timeoutMs = 8_000): Promise<number> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), timeoutMs);
    });
    const result = await Promise.race([this.#child.status, timedOut]);
    clearTimeout(timer);
    if (result === "timeout") {
      await this.kill();
      throw new Error(
        `client did not exit within ${timeoutMs} ms; stdout:\n${this.stdout.text}\nstderr:\n${this.stderr.text}`,
      );
    }
    await this.closeStdin();
    await Promise.all([this.stdout.done, this.stderr.done]);
    return result.code;
  }

  /** Sends the client a signal. */
  signal(signal: Deno.Signal): void {
    this.#child.kill(signal);
  }

  /** Kills the client (if still running) and waits for everything to end. */
  async kill(): Promise<void> {
    try {
      this.#child.kill("SIGKILL");
    } catch (err) {
      if (!(err instanceof TypeError)) throw err;
    }
    await this.#child.status;
    await this.closeStdin();
    await Promise.all([this.stdout.done, this.stderr.done]);
  }
}

/** A plain WebSocket client on the test's side, with frames to await. */
export class Peer {
  readonly socket: WebSocket;
  readonly frames: Record<string, unknown>[] = [];
  #cursor = 0;
  #wake: (() => void) | null = null;
  readonly #closed: Promise<void>;

  private constructor(url: string, token: string) {
    this.socket = new WebSocket(url, {
      headers: { authorization: `Bearer ${token}` },
    });
    this.socket.onmessage = (e) => {
      if (typeof e.data !== "string") return;
      for (const value of splitServerFrames(e.data)) {
        if (isObject(value)) this.frames.push(value);
      }
      this.#wake?.();
    };
    this.#closed = new Promise((resolve) => {
      this.socket.onclose = () => {
        resolve();
        this.#wake?.();
      };
    });
  }

  /** Connects with a Bearer token and waits for `welcome`. */
  static async connect(url: string, token: string): Promise<Peer> {
    const peer = new Peer(url, token);
    await peer.next((f) => f.type === "welcome");
    return peer;
  }

  /** Sends one frame. */
  send(frame: Record<string, unknown>): void {
    this.socket.send(JSON.stringify(frame));
  }

  /** The next frame that matches; fails after `timeoutMs` or on close. */
  async next(
    match: (frame: Record<string, unknown>) => boolean,
    timeoutMs = 8_000,
  ): Promise<Record<string, unknown>> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      while (this.#cursor < this.frames.length) {
        const frame = this.frames[this.#cursor++]!;
        if (match(frame)) return frame;
      }
      if (this.socket.readyState === WebSocket.CLOSED) {
        throw new Error(
          `peer closed; frames: ${JSON.stringify(this.frames.slice(-5))}`,
        );
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(
          `no matching frame within ${timeoutMs} ms; frames: ${
            JSON.stringify(this.frames.slice(-5))
          }`,
        );
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
      this.#wake = null;
    }
  }

  /** Sends a room message and waits for its echo; resolves to the echo. */
  async say(text: string, room = "lobby"): Promise<Record<string, unknown>> {
    const clientId = crypto.randomUUID();
    this.send({ type: "message", text, room, client_id: clientId });
    return await this.next((f) =>
      f.type === "message" && f.client_id === clientId
    );
  }

  /** Closes with 1000 and waits for the close event. */
  async close(): Promise<void> {
    if (this.socket.readyState !== WebSocket.CLOSED) {
      this.socket.close(1000);
    }
    await this.#closed;
  }

  /** Waits for the server to close the socket. */
  closed(): Promise<void> {
    return this.#closed;
  }
}

/** Whether stderr text looks like a stack trace or an uncaught error. */
export function looksLikeStackTrace(text: string): boolean {
  return /^\s+at /m.test(text) || text.includes("error: Uncaught") ||
    text.includes("Stack backtrace");
}

function toTest(match: LineMatch): (line: string) => boolean {
  if (typeof match === "string") return (line) => line.includes(match);
  if (match instanceof RegExp) return (line) => match.test(line);
  return match;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** `deno task start`'s entry point as a real process, on the given ports. */
export async function startMainProcess(
  dataDir: string,
  ports: { auth: string; chat: string } = { auth: "0", chat: "0" },
) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "main.ts"],
    cwd: REPO_ROOT,
    env: {
      AUTH_PORT: ports.auth,
      CHAT_PORT: ports.chat,
      DATA_DIR: dataDir,
      RATE_LIMITS: "off",
      NO_COLOR: "1",
    },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdout = new LineWatcher(child.stdout);
  const stderr = new LineWatcher(child.stderr);
  const stop = async (signal: Deno.Signal) => {
    child.kill(signal);
    await child.status;
    await Promise.all([stdout.done, stderr.done]);
  };
  try {
    const authUrl = (await stdout.waitFor(/^auth: listening on /)).split(" ")
      .pop()!;
    const chatUrl = (await stdout.waitFor(/^chat: listening on /)).split(" ")
      .pop()!;
    return {
      child,
      authUrl,
      chatWs: `${chatUrl.replace(/^http/, "ws")}/ws`,
      ports: {
        auth: new URL(authUrl).port,
        chat: new URL(chatUrl).port,
      },
      stop,
    };
  } catch (err) {
    await stop("SIGKILL");
    throw err;
  }
}
