/**
 * What the orchestrator (`bench/main.ts`) and a load process (`bench/load.ts`)
 * say to each other: one JSON object per line, commands on the load
 * process's stdin, replies on its stdout, one reply per command, in order.
 *
 * @module
 */
import type { HistogramData } from "./histogram.ts";

/** Open `count` WebSocket clients. */
export interface ConnectCommand {
  op: "connect";
  url: string;
  /** Client `i` sends `Authorization: Bearer tokens[i % length]`; empty: no header. */
  tokens: string[];
  count: number;
  /** Handshakes in flight at once (`count` for a storm). */
  concurrency: number;
  /** Ready means a `welcome` frame arrived (chat), else that the socket opened. */
  expectWelcome: boolean;
  timeoutMs: number;
}

/** Send timestamped messages from the first `senders` clients; count what every client receives. */
export interface RunCommand {
  op: "run";
  runId: number;
  senders: number;
  /** Global number of this process's first sender, for phase offsets. */
  senderBase: number;
  totalSenders: number;
  /**
   * Every sender starts at the same instant (two clients each on its own
   * 50 ms clock) instead of being spread evenly over one period.
   */
  lockstep: boolean;
  ratePerSender: number;
  messagesPerSender: number;
  /** Time to wait after the last send for stragglers, at most. */
  drainMs: number;
  /** Deliveries this process expects in all; it replies as soon as they are in. */
  expected: number;
}

/** Keep `concurrency` HTTP requests in flight for `durationMs` (or `maxRequests`). */
export interface HttpCommand {
  op: "http";
  url: string;
  kind: "validate" | "login";
  tokens: string[];
  username: string;
  password: string;
  concurrency: number;
  durationMs: number;
  maxRequests: number;
}

/** Close every client (the process exits when its stdin ends). */
export interface CloseCommand {
  op: "close";
}

/** A command to a load process. */
export type LoadCommand =
  | ConnectCommand
  | RunCommand
  | HttpCommand
  | CloseCommand;

/** Answer to {@linkcode ConnectCommand}; `hist` holds each client's time to ready. */
export interface ConnectedReply {
  ev: "connected";
  ok: number;
  failed: number;
  failures: Record<string, number>;
  /** From the first handshake started to the last client ready. */
  elapsedMs: number;
  hist: HistogramData;
}

/** Answer to {@linkcode RunCommand}; `hist` holds send-to-receive latencies. */
export interface RanReply {
  ev: "ran";
  sent: number;
  received: number;
  /** `error` frames received. */
  errors: number;
  /** Clients that are no longer open. */
  closed: number;
  maxSendLagMs: number;
  hist: HistogramData;
}

/** Answer to {@linkcode HttpCommand}; `hist` holds request latencies. */
export interface HttpReply {
  ev: "http";
  ok: number;
  statuses: Record<string, number>;
  elapsedMs: number;
  hist: HistogramData;
}

/** Any reply from a load process. */
export type LoadReply =
  | ConnectedReply
  | RanReply
  | HttpReply
  | { ev: "closed" }
  | { ev: "error"; message: string };

/** Parses one command line; throws on anything malformed. */
export function parseLoadCommand(value: unknown): LoadCommand {
  const obj = record(value, "command");
  switch (obj.op) {
    case "connect":
      return {
        op: "connect",
        url: str(obj, "url"),
        tokens: strings(obj, "tokens"),
        count: num(obj, "count"),
        concurrency: num(obj, "concurrency"),
        expectWelcome: bool(obj, "expectWelcome"),
        timeoutMs: num(obj, "timeoutMs"),
      };
    case "run":
      return {
        op: "run",
        runId: num(obj, "runId"),
        senders: num(obj, "senders"),
        senderBase: num(obj, "senderBase"),
        totalSenders: num(obj, "totalSenders"),
        lockstep: bool(obj, "lockstep"),
        ratePerSender: num(obj, "ratePerSender"),
        messagesPerSender: num(obj, "messagesPerSender"),
        drainMs: num(obj, "drainMs"),
        expected: num(obj, "expected"),
      };
    case "http": {
      const kind = str(obj, "kind");
      if (kind !== "validate" && kind !== "login") {
        throw new Error(`Cannot read command: unknown http kind "${kind}"`);
      }
      return {
        op: "http",
        url: str(obj, "url"),
        kind,
        tokens: strings(obj, "tokens"),
        username: str(obj, "username"),
        password: str(obj, "password"),
        concurrency: num(obj, "concurrency"),
        durationMs: num(obj, "durationMs"),
        maxRequests: num(obj, "maxRequests"),
      };
    }
    case "close":
      return { op: "close" };
    default:
      throw new Error(`Cannot read command: unknown op ${String(obj.op)}`);
  }
}

/** Parses one reply line; throws on anything malformed. */
export function parseLoadReply(value: unknown): LoadReply {
  const obj = record(value, "reply");
  switch (obj.ev) {
    case "connected":
      return {
        ev: "connected",
        ok: num(obj, "ok"),
        failed: num(obj, "failed"),
        failures: counts(obj, "failures"),
        elapsedMs: num(obj, "elapsedMs"),
        hist: histogram(obj, "hist"),
      };
    case "ran":
      return {
        ev: "ran",
        sent: num(obj, "sent"),
        received: num(obj, "received"),
        errors: num(obj, "errors"),
        closed: num(obj, "closed"),
        maxSendLagMs: num(obj, "maxSendLagMs"),
        hist: histogram(obj, "hist"),
      };
    case "http":
      return {
        ev: "http",
        ok: num(obj, "ok"),
        statuses: counts(obj, "statuses"),
        elapsedMs: num(obj, "elapsedMs"),
        hist: histogram(obj, "hist"),
      };
    case "closed":
      return { ev: "closed" };
    case "error":
      return { ev: "error", message: str(obj, "message") };
    default:
      throw new Error(`Cannot read reply: unknown ev ${String(obj.ev)}`);
  }
}

function record(value: unknown, what: string): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Error(`Cannot read ${what}: not a JSON object`);
  }
  return Object.fromEntries(Object.entries(value));
}

function num(obj: Record<string, unknown>, key: string): number {
  const value = obj[key];
  if (typeof value !== "number" || !Number.isFinite(value)) {
    throw new Error(`Cannot read "${key}": not a number`);
  }
  return value;
}

function str(obj: Record<string, unknown>, key: string): string {
  const value = obj[key];
  if (typeof value !== "string") {
    throw new Error(`Cannot read "${key}": not a string`);
  }
  return value;
}

function bool(obj: Record<string, unknown>, key: string): boolean {
  const value = obj[key];
  if (typeof value !== "boolean") {
    throw new Error(`Cannot read "${key}": not a boolean`);
  }
  return value;
}

function strings(obj: Record<string, unknown>, key: string): string[] {
  const value = obj[key];
  if (!Array.isArray(value)) {
    throw new Error(`Cannot read "${key}": not a list`);
  }
  return value.map((item) => {
    if (typeof item !== "string") {
      throw new Error(`Cannot read "${key}": not a list of strings`);
    }
    return item;
  });
}

function counts(
  obj: Record<string, unknown>,
  key: string,
): Record<string, number> {
  const inner = record(obj[key], key);
  const out: Record<string, number> = {};
  for (const name of Object.keys(inner)) out[name] = num(inner, name);
  return out;
}

function histogram(obj: Record<string, unknown>, key: string): HistogramData {
  const inner = record(obj[key], key);
  const buckets = inner.buckets;
  if (
    !Array.isArray(buckets) ||
    !buckets.every((n): n is number => typeof n === "number")
  ) {
    throw new Error(`Cannot read "${key}.buckets": not a list of numbers`);
  }
  return {
    buckets,
    count: num(inner, "count"),
    maxMs: num(inner, "maxMs"),
  };
}
