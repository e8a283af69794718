// deno-lint-ignore-file no-console
/**
 * A load process of the benchmark. The orchestrator (`bench/main.ts`) starts
 * one or more of these and drives them over stdin/stdout, one JSON object per
 * line (see `bench/load_protocol.ts`): open WebSocket clients, run a
 * timestamped broadcast, hammer an HTTP endpoint, close the clients. It exits
 * when its stdin ends.
 *
 * Latency crosses processes: each message carries its sender's
 * `performance.timeOrigin + performance.now()`, and receivers on the same
 * machine subtract it from their own clock.
 *
 * Usage: `deno run --allow-net=127.0.0.1 bench/load.ts` (exits when stdin ends).
 *
 * @module
 */
import { Histogram } from "./histogram.ts";
import {
  type ConnectCommand,
  type HttpCommand,
  type LoadCommand,
  type LoadReply,
  parseLoadCommand,
  type RunCommand,
} from "./load_protocol.ts";

/** Makes a message about as long as a chat line (about 80 characters). */
const PAD = " | the quick brown fox jumps over the lazy dog";

interface RunState {
  /** `@r<runId>@`, followed in the text by the send time in ms. */
  prefix: string;
  hist: Histogram;
  received: number;
  errors: number;
  expected: number;
  finish: () => void;
}

const clients: WebSocket[] = [];
let current: RunState | undefined;

/** The message handler of every connected client: hot path, keep it lean. */
function onFrame(event: MessageEvent): void {
  const run = current;
  const data = event.data;
  if (run === undefined || typeof data !== "string") return;
  const now = performance.timeOrigin + performance.now();
  const prefix = run.prefix;
  // A server frame may hold several newline-separated messages.
  let at = data.indexOf(prefix);
  while (at !== -1) {
    const start = at + prefix.length;
    run.hist.record(now - parseFloat(data.slice(start, start + 24)));
    run.received++;
    at = data.indexOf(prefix, start);
  }
  if (data.includes('"type":"error"')) run.errors++;
  if (run.received >= run.expected) run.finish();
}

function openClient(
  url: string,
  token: string | undefined,
  expectWelcome: boolean,
  timeoutMs: number,
): Promise<WebSocket | string> {
  return new Promise((resolve) => {
    const ws = token === undefined
      ? new WebSocket(url)
      : new WebSocket(url, { headers: { authorization: `Bearer ${token}` } });
    let settled = false;
    const settle = (result: WebSocket | string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (typeof result === "string") {
        ws.onopen =
          ws.onmessage =
          ws.onclose =
          ws.onerror =
            null;
        if (ws.readyState !== WebSocket.CLOSED) ws.close();
      } else {
        ws.onmessage = onFrame;
        ws.onclose = ws.onerror = null;
      }
      resolve(result);
    };
    const timer = setTimeout(() => settle("timeout"), timeoutMs);
    ws.onopen = () => {
      if (!expectWelcome) settle(ws);
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return;
      for (const line of event.data.split("\n")) {
        const type = frameType(line);
        if (type === "welcome") return settle(ws);
        if (type === "error") {
          return settle(`error frame: ${line.slice(0, 80)}`);
        }
      }
    };
    ws.onclose = (event) => settle(`closed with code ${event.code}`);
    ws.onerror = () => {}; // a close event follows
  });
}

function frameType(line: string): string | undefined {
  try {
    const value: unknown = JSON.parse(line);
    if (typeof value === "object" && value !== null && "type" in value) {
      return typeof value.type === "string" ? value.type : undefined;
    }
  } catch {
    // not JSON: not a frame we wait for
  }
  return undefined;
}

async function connect(cmd: ConnectCommand): Promise<LoadReply> {
  const hist = new Histogram();
  const failures: Record<string, number> = {};
  let ok = 0;
  let next = 0;
  let lastReady = performance.now();
  const started = lastReady;
  const worker = async () => {
    while (next < cmd.count) {
      const i = next++;
      const token = cmd.tokens.length === 0
        ? undefined
        : cmd.tokens[i % cmd.tokens.length];
      const t0 = performance.now();
      const result = await openClient(
        cmd.url,
        token,
        cmd.expectWelcome,
        cmd.timeoutMs,
      );
      if (typeof result === "string") {
        failures[result] = (failures[result] ?? 0) + 1;
        continue;
      }
      clients.push(result);
      ok++;
      lastReady = performance.now();
      hist.record(lastReady - t0);
    }
  };
  const workers = Math.max(1, Math.min(cmd.concurrency, cmd.count));
  await Promise.all(Array.from({ length: workers }, worker));
  return {
    ev: "connected",
    ok,
    failed: cmd.count - ok,
    failures,
    elapsedMs: lastReady - started,
    hist: hist.toData(),
  };
}

async function run(cmd: RunCommand): Promise<LoadReply> {
  let finish = () => {};
  const allIn = new Promise<void>((resolve) => finish = resolve);
  const state: RunState = {
    prefix: `@r${cmd.runId}@`,
    hist: new Histogram(),
    received: 0,
    errors: 0,
    expected: cmd.expected,
    finish,
  };
  current = state;
  if (cmd.expected <= 0) finish();

  const periodMs = 1000 / cmd.ratePerSender;
  const start = performance.now() + 20;
  const sendEnd = start + cmd.messagesPerSender * periodMs;
  let sent = 0;
  let maxSendLagMs = 0;
  const sendAll = (ws: WebSocket, globalIndex: number) =>
    new Promise<void>((resolve) => {
      // Spread evenly over one period unless asked to start in lockstep.
      const first = cmd.lockstep
        ? start
        : start + periodMs * globalIndex / cmd.totalSenders;
      let i = 0;
      const tick = () => {
        const now = performance.now();
        while (i < cmd.messagesPerSender && first + i * periodMs <= now) {
          maxSendLagMs = Math.max(maxSendLagMs, now - (first + i * periodMs));
          if (ws.readyState === WebSocket.OPEN) {
            const t = (performance.timeOrigin + performance.now()).toFixed(3);
            ws.send(JSON.stringify({
              type: "message",
              text: `${state.prefix}${t} s${globalIndex} n${i}${PAD}`,
            }));
            sent++;
          }
          i++;
        }
        if (i < cmd.messagesPerSender) {
          setTimeout(
            tick,
            Math.max(0, first + i * periodMs - performance.now()),
          );
        } else {
          resolve();
        }
      };
      setTimeout(tick, Math.max(0, first - performance.now()));
    });
  const senders = clients.slice(0, cmd.senders).map((ws, k) =>
    sendAll(ws, cmd.senderBase + k)
  );
  await Promise.all(senders);
  let drainTimer: ReturnType<typeof setTimeout> | undefined;
  const deadline = new Promise<void>((resolve) => {
    drainTimer = setTimeout(
      resolve,
      Math.max(0, sendEnd + cmd.drainMs - performance.now()),
    );
  });
  await Promise.race([allIn, deadline]);
  clearTimeout(drainTimer);
  current = undefined;
  return {
    ev: "ran",
    sent,
    received: state.received,
    errors: state.errors,
    closed: clients.filter((ws) => ws.readyState !== WebSocket.OPEN).length,
    maxSendLagMs,
    hist: state.hist.toData(),
  };
}

/**
 * `/validate_token` over raw keep-alive HTTP/1.1 connections, one request in
 * flight on each: far cheaper per request than `fetch`, so the figure is the
 * server's, not the client's.
 */
async function rawValidate(cmd: HttpCommand): Promise<LoadReply> {
  const hist = new Histogram();
  const statuses: Record<string, number> = {};
  const count = (status: string) =>
    statuses[status] = (statuses[status] ?? 0) + 1;
  let ok = 0;
  let issued = 0;
  const url = new URL(cmd.url);
  const encoder = new TextEncoder();
  const requests = (cmd.tokens.length > 0 ? cmd.tokens : [""]).map((token) => {
    const body = JSON.stringify({ token });
    return encoder.encode(
      `POST ${url.pathname} HTTP/1.1\r\nhost: ${url.host}\r\n` +
        `content-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`,
    );
  });
  const started = performance.now();
  const deadline = started + cmd.durationMs;
  const worker = async () => {
    let conn: Deno.TcpConn | undefined;
    const reader = new ResponseReader();
    try {
      while (performance.now() < deadline && issued < cmd.maxRequests) {
        if (conn === undefined) {
          conn = await Deno.connect({
            hostname: url.hostname,
            port: Number(url.port),
          });
          conn.setNoDelay(true);
          reader.reset();
        }
        const request = requests[issued++ % requests.length]!;
        const t0 = performance.now();
        try {
          await writeAll(conn, request);
          const status = await reader.next(conn);
          count(String(status));
          if (status === 200) {
            ok++;
            hist.record(performance.now() - t0);
          }
        } catch (err) {
          count(err instanceof Error ? err.name : "error");
          conn.close();
          conn = undefined;
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
      }
    } finally {
      conn?.close();
    }
  };
  await Promise.all(Array.from({ length: cmd.concurrency }, worker));
  return {
    ev: "http",
    ok,
    statuses,
    elapsedMs: performance.now() - started,
    hist: hist.toData(),
  };
}

/** Reads HTTP/1.1 responses (Content-Length or chunked bodies) off one connection. */
class ResponseReader {
  #buffer = "";
  #chunk = new Uint8Array(16 * 1024);
  #decoder = new TextDecoder("latin1");

  reset(): void {
    this.#buffer = "";
  }

  /** The status of the next complete response; throws when the peer closes. */
  async next(conn: Deno.TcpConn): Promise<number> {
    while (true) {
      const length = this.#complete();
      if (length > 0) {
        const status = Number(this.#buffer.slice(9, 12));
        this.#buffer = this.#buffer.slice(length);
        return status;
      }
      const n = await conn.read(this.#chunk);
      if (n === null) throw new Error("connection closed");
      this.#buffer += this.#decoder.decode(this.#chunk.subarray(0, n));
    }
  }

  /** Length of the first complete response in the buffer, or 0. */
  #complete(): number {
    const headEnd = this.#buffer.indexOf("\r\n\r\n");
    if (headEnd === -1) return 0;
    const head = this.#buffer.slice(0, headEnd).toLowerCase();
    const match = head.match(/\r\ncontent-length:\s*(\d+)/);
    if (match?.[1] !== undefined) {
      const total = headEnd + 4 + Number(match[1]);
      return this.#buffer.length >= total ? total : 0;
    }
    if (head.includes("transfer-encoding: chunked")) {
      const end = this.#buffer.indexOf("\r\n0\r\n\r\n", headEnd);
      return end === -1 ? 0 : end + 7;
    }
    return headEnd + 4;
  }
}

async function writeAll(conn: Deno.TcpConn, data: Uint8Array): Promise<void> {
  let written = 0;
  while (written < data.length) {
    written += await conn.write(data.subarray(written));
  }
}

async function http(cmd: HttpCommand): Promise<LoadReply> {
  if (cmd.kind === "validate") return await rawValidate(cmd);
  const hist = new Histogram();
  const statuses: Record<string, number> = {};
  let ok = 0;
  let issued = 0;
  const started = performance.now();
  const deadline = started + cmd.durationMs;
  const loginBody = JSON.stringify({
    username: cmd.username,
    password: cmd.password,
  });
  const worker = async () => {
    while (performance.now() < deadline && issued < cmd.maxRequests) {
      const n = issued++;
      const t0 = performance.now();
      const body = cmd.kind === "login"
        ? loginBody
        : JSON.stringify({ token: cmd.tokens[n % cmd.tokens.length] ?? "" });
      let status: string;
      try {
        const res = await fetch(cmd.url, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body,
        });
        await res.arrayBuffer();
        status = String(res.status);
        if (res.ok) {
          ok++;
          hist.record(performance.now() - t0);
        }
      } catch (err) {
        status = err instanceof Error ? err.name : "error";
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      statuses[status] = (statuses[status] ?? 0) + 1;
    }
  };
  await Promise.all(Array.from({ length: cmd.concurrency }, worker));
  return {
    ev: "http",
    ok,
    statuses,
    elapsedMs: performance.now() - started,
    hist: hist.toData(),
  };
}

async function closeAll(): Promise<void> {
  const closed = clients.map((ws) =>
    new Promise<void>((resolve) => {
      if (ws.readyState === WebSocket.CLOSED) return resolve();
      ws.onmessage = null;
      ws.onclose = () => resolve();
      if (ws.readyState !== WebSocket.CLOSING) ws.close(1000);
    })
  );
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    Promise.all(closed),
    new Promise((resolve) => timer = setTimeout(resolve, 5000)),
  ]);
  clearTimeout(timer);
  clients.length = 0;
}

async function handle(cmd: LoadCommand): Promise<LoadReply> {
  switch (cmd.op) {
    case "connect":
      return await connect(cmd);
    case "run":
      return await run(cmd);
    case "http":
      return await http(cmd);
    case "close":
      await closeAll();
      return { ev: "closed" };
  }
}

async function main(): Promise<void> {
  let buffered = "";
  for await (
    const chunk of Deno.stdin.readable.pipeThrough(new TextDecoderStream())
  ) {
    buffered += chunk;
    let newline = buffered.indexOf("\n");
    while (newline !== -1) {
      const line = buffered.slice(0, newline);
      buffered = buffered.slice(newline + 1);
      newline = buffered.indexOf("\n");
      if (line.trim() === "") continue;
      let reply: LoadReply;
      try {
        reply = await handle(parseLoadCommand(JSON.parse(line)));
      } catch (err) {
        reply = {
          ev: "error",
          message: err instanceof Error ? err.message : String(err),
        };
      }
      console.log(JSON.stringify(reply));
    }
  }
  // The orchestrator is done (or gone): do not linger with open sockets.
  Deno.exit(0);
}

if (import.meta.main) await main();
