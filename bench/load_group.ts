/**
 * One or more load processes acting as one client population: clients are
 * split evenly between them, the senders live in the first, and their
 * answers are merged (counts summed, latency histograms merged).
 *
 * @module
 */
import { Histogram } from "./histogram.ts";
import type {
  ConnectedReply,
  HttpReply,
  LoadReply,
  RanReply,
} from "./load_protocol.ts";
import { LoadProcess } from "./processes.ts";

/** What a {@linkcode LoadGroup.connect} achieved. */
export interface ConnectSummary {
  ok: number;
  failed: number;
  failures: Record<string, number>;
  /** From the first handshake started to the last client ready (slowest process). */
  elapsedMs: number;
  /** Time from each client's start to its ready point. */
  hist: Histogram;
}

/** Options of {@linkcode LoadGroup.connect}. */
export interface ConnectOptions {
  /** Client `i` uses `tokens[i % tokens.length]`; empty for the baseline. */
  tokens: string[];
  /** Handshakes in flight at once, over all processes. */
  concurrency: number;
  /** Wait for the chat `welcome` frame rather than the socket's open event. */
  expectWelcome: boolean;
  timeoutMs?: number;
}

/** What a {@linkcode LoadGroup.run} measured. */
export interface RunSummary {
  sent: number;
  received: number;
  expected: number;
  errors: number;
  closed: number;
  maxSendLagMs: number;
  hist: Histogram;
}

/** Options of {@linkcode LoadGroup.run}. */
export interface RunOptions {
  senders: number;
  ratePerSender: number;
  durationMs: number;
  drainMs: number;
  /** Senders start together rather than spread over one period. Default false. */
  lockstep?: boolean;
}

let nextRunId = 1;

/** A set of load processes driven together. */
export class LoadGroup {
  readonly processes: LoadProcess[];
  #open: number[];

  constructor(size: number) {
    this.processes = Array.from({ length: size }, () => new LoadProcess());
    this.#open = this.processes.map(() => 0);
  }

  /** Clients open now, in all processes. */
  get openClients(): number {
    return this.#open.reduce((a, b) => a + b, 0);
  }

  /** Opens `count` more clients to `url`, split between the processes. */
  async connect(
    url: string,
    count: number,
    options: ConnectOptions,
  ): Promise<ConnectSummary> {
    const { tokens, concurrency, expectWelcome, timeoutMs = 30_000 } = options;
    const shares = split(count, this.processes.length);
    let base = 0;
    const replies = await Promise.all(this.processes.map((proc, k) => {
      const share = shares[k]!;
      const first = base;
      base += share;
      const mine = tokens.length === 0 ? [] : Array.from(
        { length: share },
        (_, j) => tokens[(first + j) % tokens.length]!,
      );
      if (share === 0) return Promise.resolve(undefined);
      return proc.request({
        op: "connect",
        url,
        tokens: mine,
        count: share,
        concurrency: Math.max(
          1,
          Math.ceil(concurrency / this.processes.length),
        ),
        expectWelcome,
        timeoutMs,
      }, timeoutMs + share * 50 + 10_000);
    }));
    const hist = new Histogram();
    const summary: ConnectSummary = {
      ok: 0,
      failed: 0,
      failures: {},
      elapsedMs: 0,
      hist,
    };
    replies.forEach((reply, k) => {
      if (reply === undefined) return;
      const connected = connectedReply(reply);
      this.#open[k]! += connected.ok;
      summary.ok += connected.ok;
      summary.failed += connected.failed;
      summary.elapsedMs = Math.max(summary.elapsedMs, connected.elapsedMs);
      for (const [why, n] of Object.entries(connected.failures)) {
        summary.failures[why] = (summary.failures[why] ?? 0) + n;
      }
      hist.merge(connected.hist);
    });
    return summary;
  }

  /** Timestamped broadcast: the first `senders` clients send, every client counts. */
  async run(options: RunOptions): Promise<RunSummary> {
    const { senders, ratePerSender, durationMs, drainMs } = options;
    const messagesPerSender = Math.max(
      1,
      Math.round(ratePerSender * durationMs / 1000),
    );
    const totalMessages = messagesPerSender * senders;
    const runId = nextRunId++;
    const replies = await Promise.all(
      this.processes.map((proc, k) =>
        proc.request({
          op: "run",
          runId,
          senders: k === 0 ? senders : 0,
          senderBase: 0,
          totalSenders: senders,
          lockstep: options.lockstep ?? false,
          ratePerSender,
          messagesPerSender,
          drainMs,
          expected: totalMessages * this.#open[k]!,
        }, durationMs + drainMs + 30_000)
      ),
    );
    const hist = new Histogram();
    const summary: RunSummary = {
      sent: 0,
      received: 0,
      expected: totalMessages * this.openClients,
      errors: 0,
      closed: 0,
      maxSendLagMs: 0,
      hist,
    };
    for (const reply of replies) {
      const ran = ranReply(reply);
      summary.sent += ran.sent;
      summary.received += ran.received;
      summary.errors += ran.errors;
      summary.closed += ran.closed;
      summary.maxSendLagMs = Math.max(summary.maxSendLagMs, ran.maxSendLagMs);
      hist.merge(ran.hist);
    }
    return summary;
  }

  /** Runs an HTTP load from the first process. */
  async http(
    options: {
      url: string;
      kind: "validate" | "login";
      tokens?: string[];
      username?: string;
      password?: string;
      concurrency: number;
      durationMs: number;
      maxRequests?: number;
    },
  ): Promise<HttpReply> {
    const proc = this.processes[0];
    if (proc === undefined) throw new Error("Cannot load: no load process");
    const reply = await proc.request({
      op: "http",
      url: options.url,
      kind: options.kind,
      tokens: options.tokens ?? [],
      username: options.username ?? "",
      password: options.password ?? "",
      concurrency: options.concurrency,
      durationMs: options.durationMs,
      maxRequests: options.maxRequests ?? 10_000_000,
    }, options.durationMs + 30_000);
    return httpReply(reply);
  }

  /** Closes every client, keeping the processes. */
  async closeClients(): Promise<void> {
    await Promise.all(this.processes.map((proc) => proc.closeClients()));
    this.#open = this.processes.map(() => 0);
  }

  /** Closes the clients and ends the processes. */
  async close(): Promise<void> {
    await Promise.all(this.processes.map((proc) => proc.close()));
  }
}

function connectedReply(reply: LoadReply): ConnectedReply {
  if (reply.ev !== "connected") throw unexpected(reply, "connected");
  return reply;
}

function ranReply(reply: LoadReply): RanReply {
  if (reply.ev !== "ran") throw unexpected(reply, "ran");
  return reply;
}

function httpReply(reply: LoadReply): HttpReply {
  if (reply.ev !== "http") throw unexpected(reply, "http");
  return reply;
}

function unexpected(reply: LoadReply, ev: string): Error {
  return new Error(`Load process answered "${reply.ev}", expected "${ev}"`);
}

function split(total: number, parts: number): number[] {
  return Array.from(
    { length: parts },
    (_, k) => Math.floor(total / parts) + (k < total % parts ? 1 : 0),
  );
}
