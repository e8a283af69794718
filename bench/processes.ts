/**
 * The benchmark's subprocesses: servers started the way a user starts them
 * (waiting for their `listening on http://HOST:PORT` line), and load
 * processes driven over stdin/stdout. Every child is registered so that
 * {@linkcode killAllChildren} can end the stragglers whatever happened.
 *
 * @module
 */
import {
  type LoadCommand,
  type LoadReply,
  parseLoadReply,
} from "./load_protocol.ts";

const READY_RE = /listening on (http:\/\/\S+)/;
const running = new Set<Deno.ChildProcess>();

/** Root of the repository (the servers are started from there). */
export const REPO_ROOT = decodeURIComponent(
  new URL("..", import.meta.url).pathname,
).replace(/\/$/, "");

/** Options of {@linkcode ServerProcess.start}. */
export interface ServerStartOptions {
  env?: Record<string, string>;
  /** Give up when the ready line has not come by then. */
  readyTimeoutMs?: number;
  /** Keep stdin open as a pipe (the baseline exits when it closes). */
  pipeStdin?: boolean;
}

/** A server subprocess that has printed its ready line. */
export class ServerProcess {
  /** Short name for messages (`auth`, `chat`, `baseline`). */
  readonly name: string;
  readonly pid: number;
  /** `http://HOST:PORT` from the ready line. */
  readonly address: string;
  /** From spawn to the ready line. */
  readonly startupMs: number;
  /** `performance.now()` of the orchestrator when the process was spawned. */
  readonly spawnedAt: number;
  #child: Deno.ChildProcess;
  #output: string[];
  #exited: Promise<unknown>;

  private constructor(
    name: string,
    child: Deno.ChildProcess,
    address: string,
    startupMs: number,
    output: string[],
    exited: Promise<unknown>,
  ) {
    this.name = name;
    this.pid = child.pid;
    this.address = address;
    this.startupMs = startupMs;
    this.spawnedAt = performance.now() - startupMs;
    this.#child = child;
    this.#output = output;
    this.#exited = exited;
  }

  /** Spawns `deno <args>` from the repository root and waits for the ready line. */
  static async start(
    name: string,
    args: string[],
    options: ServerStartOptions = {},
  ): Promise<ServerProcess> {
    const { env = {}, readyTimeoutMs = 30_000, pipeStdin = false } = options;
    const started = performance.now();
    const child = new Deno.Command(Deno.execPath(), {
      args,
      cwd: REPO_ROOT,
      env: { NO_COLOR: "1", ...env },
      stdin: pipeStdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    running.add(child);
    const exited = child.status.finally(() => running.delete(child));
    const output: string[] = [];
    let onReady: (address: string) => void = () => {};
    const ready = new Promise<string>((resolve) => onReady = resolve);
    const watch = (line: string) => {
      const match = line.match(READY_RE);
      if (match?.[1] !== undefined) onReady(match[1]);
    };
    const drained = Promise.all([
      drainLines(child.stdout, output, watch),
      drainLines(child.stderr, output, watch),
    ]);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const outcome = await Promise.race([
      ready,
      exited.then((status) => ({ exitedWith: status.code })),
      new Promise<"timeout">((resolve) =>
        timer = setTimeout(() => resolve("timeout"), readyTimeoutMs)
      ),
    ]);
    clearTimeout(timer);
    if (typeof outcome !== "string" || outcome === "timeout") {
      killChild(child);
      await Promise.all([exited, drained]);
      const why = outcome === "timeout"
        ? `no ready line within ${readyTimeoutMs} ms`
        : `it exited with code ${outcome.exitedWith}`;
      throw new Error(
        `Cannot start ${name}: ${why}\n${output.slice(-20).join("\n")}`,
      );
    }
    const startupMs = performance.now() - started;
    // "Exited" includes the end of its output, so nothing is left reading.
    const done = Promise.all([exited, drained]);
    return new ServerProcess(name, child, outcome, startupMs, output, done);
  }

  /** The last lines the process printed (for error messages). */
  recentOutput(lines = 20): string {
    return this.#output.slice(-lines).join("\n");
  }

  /** Whether the process has exited. */
  get alive(): boolean {
    return running.has(this.#child);
  }

  /** SIGTERM, then SIGKILL if it has not exited within `graceMs`. */
  async close(graceMs = 5000): Promise<void> {
    if (!running.has(this.#child)) {
      await this.#exited;
      return;
    }
    try {
      this.#child.kill("SIGTERM");
    } catch (err) {
      if (!(err instanceof TypeError)) throw err; // already exited
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const done = await Promise.race([
      this.#exited.then(() => true),
      new Promise<false>((resolve) =>
        timer = setTimeout(() => resolve(false), graceMs)
      ),
    ]);
    clearTimeout(timer);
    if (!done) {
      killChild(this.#child);
      await this.#exited;
    }
  }
}

/** A `bench/load.ts` subprocess and its command channel. */
export class LoadProcess {
  readonly pid: number;
  #child: Deno.ChildProcess;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #waiting: ((line: string | null) => void)[] = [];
  #lines: string[] = [];
  #ended = false;
  #stderr: string[] = [];
  #exited: Promise<unknown>;

  constructor() {
    this.#child = new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-net=127.0.0.1", "bench/load.ts"],
      cwd: REPO_ROOT,
      env: { NO_COLOR: "1" },
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.pid = this.#child.pid;
    running.add(this.#child);
    const status = this.#child.status.finally(() =>
      running.delete(this.#child)
    );
    this.#writer = this.#child.stdin.getWriter();
    const stdout = drainLines(this.#child.stdout, [], (line) => {
      const next = this.#waiting.shift();
      if (next) next(line);
      else this.#lines.push(line);
    }).finally(() => {
      this.#ended = true;
      for (const next of this.#waiting.splice(0)) next(null);
    });
    const stderr = drainLines(this.#child.stderr, this.#stderr, () => {});
    this.#exited = Promise.all([status, stdout, stderr]);
  }

  /** Sends one command and waits (at most `timeoutMs`) for its reply. */
  async request(cmd: LoadCommand, timeoutMs: number): Promise<LoadReply> {
    await this.#writer.write(
      new TextEncoder().encode(JSON.stringify(cmd) + "\n"),
    );
    let timer: ReturnType<typeof setTimeout> | undefined;
    const line = await Promise.race([
      this.#nextLine(),
      new Promise<"timeout">((resolve) =>
        timer = setTimeout(() => resolve("timeout"), timeoutMs)
      ),
    ]);
    clearTimeout(timer);
    if (line === "timeout" || line === null) {
      throw new Error(
        `Load process ${this.pid} ${
          line === null ? "exited" : `did not answer "${cmd.op}" in time`
        }\n${this.#stderr.slice(-20).join("\n")}`,
      );
    }
    const reply = parseLoadReply(JSON.parse(line));
    if (reply.ev === "error") {
      throw new Error(`Load process ${this.pid}: ${reply.message}`);
    }
    return reply;
  }

  /** Closes its clients, then ends its stdin so it exits; kills it if it does not. */
  async close(): Promise<void> {
    if (running.has(this.#child)) await this.closeClients().catch(() => {});
    try {
      await this.#writer.close();
    } catch {
      // the pipe may already be gone
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const done = await Promise.race([
      this.#exited.then(() => true),
      new Promise<false>((resolve) =>
        timer = setTimeout(() => resolve(false), 3000)
      ),
    ]);
    clearTimeout(timer);
    if (!done) {
      killChild(this.#child);
      await this.#exited;
    }
  }

  /** Closes every client of this process (waiting at most 5 s for their close events). */
  async closeClients(): Promise<void> {
    await this.request({ op: "close" }, 10_000);
  }

  #nextLine(): Promise<string | null> {
    const line = this.#lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (this.#ended) return Promise.resolve(null);
    return new Promise((resolve) => this.#waiting.push(resolve));
  }
}

/** SIGKILLs every child still running (for `finally` blocks and Ctrl+C). */
export function killAllChildren(): void {
  for (const child of running) killChild(child);
}

/** Process ids of the children still running. */
export function runningChildPids(): number[] {
  return [...running].map((child) => child.pid);
}

function killChild(child: Deno.ChildProcess): void {
  try {
    child.kill("SIGKILL");
  } catch (err) {
    if (!(err instanceof TypeError)) throw err; // already exited
  }
}

/** Reads a stream line by line, keeping the last 200 lines in `keep`. */
async function drainLines(
  stream: ReadableStream<Uint8Array>,
  keep: string[],
  onLine: (line: string) => void,
): Promise<void> {
  let buffered = "";
  try {
    for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
      buffered += chunk;
      let newline = buffered.indexOf("\n");
      while (newline !== -1) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        newline = buffered.indexOf("\n");
        keep.push(line);
        if (keep.length > 400) keep.splice(0, 200);
        onLine(line);
      }
    }
  } catch {
    // the process died mid-line: nothing more to read
  }
  if (buffered !== "") onLine(buffered);
}
