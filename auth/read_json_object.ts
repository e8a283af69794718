/**
 * Reads a request body as a JSON object, enforcing a size limit while reading
 * (`Deno.serve` has none): by `Content-Length` first, then by counting the
 * streamed bytes, so an oversized body is refused without buffering the rest;
 * and a time limit (`Deno.serve` has none either), so a client that stalls
 * mid-body does not hold its request forever.
 *
 * @module
 */
import { HttpError } from "./http_error.ts";

/** Bounds on reading one request body. */
export interface BodyLimits {
  /** Largest body in bytes; larger gets 413. */
  maxBytes: number;
  /** Longest wait for the whole body; a client that stalls gets 408. */
  timeoutMs: number;
}

/** Options of {@linkcode readJsonObject}. */
export interface ReadJsonObjectOptions {
  /** Take an empty body as `{}` instead of refusing it. Default false. */
  emptyAsObject?: boolean;
}

/**
 * The body of `req` as a JSON object. Throws {@linkcode HttpError} 413
 * `payload_too_large` (with `Connection: close`) above `limits.maxBytes`,
 * 408 `request_timeout` when the body has not all come within
 * `limits.timeoutMs`, 400 `invalid_json` when the body is not a JSON object
 * (empty, cut short, not UTF-8, not JSON, an array, `null`...).
 */
export async function readJsonObject(
  req: Request,
  limits: BodyLimits,
  options: ReadJsonObjectOptions = {},
): Promise<Record<string, unknown>> {
  const { emptyAsObject = false } = options;
  const bytes = await readLimited(req, limits, true);
  if (emptyAsObject && bytes.length === 0) return {};
  let value: unknown;
  try {
    value = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    value = undefined;
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new HttpError(
      400,
      "invalid_json",
      "Cannot read the request: the body must be a JSON object",
    );
  }
  return { ...value };
}

/**
 * Reads and drops a body the request does not need, with the same bounds
 * as {@linkcode readJsonObject}: an oversized body is refused on every route.
 */
export async function drainBody(
  req: Request,
  limits: BodyLimits,
): Promise<void> {
  await readLimited(req, limits, false);
}

/** Drops a body unread (for answers that do not depend on it: 404, 405, 500). */
export async function discardBody(req: Request): Promise<void> {
  if (req.body !== null && !req.bodyUsed) {
    await req.body.cancel().catch(() => {});
  }
}

async function readLimited(
  req: Request,
  limits: BodyLimits,
  keep: boolean,
): Promise<Uint8Array> {
  const { maxBytes, timeoutMs } = limits;
  const declared = req.headers.get("content-length");
  if (declared !== null && Number(declared) > maxBytes) {
    await discardBody(req);
    throw tooLarge(maxBytes);
  }
  if (req.body === null) return new Uint8Array();
  const reader = req.body.getReader();
  // One timer per body (not a race per chunk): at the deadline the read is
  // cancelled, which ends the pending read.
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    reader.cancel().catch(() => {});
  }, timeoutMs);
  const chunks: Uint8Array[] = [];
  let total = 0;
  try {
    while (true) {
      let result: ReadableStreamReadResult<Uint8Array>;
      try {
        result = await reader.read();
      } catch {
        if (timedOut) throw stalled(timeoutMs);
        // The client went away mid-body, or its framing broke: no answer
        // will reach it, and this is not the server's error.
        throw new HttpError(
          400,
          "invalid_json",
          "Cannot read the request: the body ended early",
          { headers: { connection: "close" } },
        );
      }
      if (timedOut) throw stalled(timeoutMs);
      if (result.done) break;
      total += result.value.length;
      if (total > maxBytes) {
        await reader.cancel().catch(() => {});
        throw tooLarge(maxBytes);
      }
      if (keep) chunks.push(result.value);
    }
  } finally {
    clearTimeout(timer);
    reader.releaseLock();
  }
  if (chunks.length === 1 && chunks[0] !== undefined) return chunks[0];
  const bytes = new Uint8Array(keep ? total : 0);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  return bytes;
}

function stalled(timeoutMs: number): HttpError {
  return new HttpError(
    408,
    "request_timeout",
    `Cannot read the request: the body did not arrive within ${
      timeoutMs / 1000
    } s`,
    { headers: { connection: "close" } },
  );
}

function tooLarge(maxBytes: number): HttpError {
  return new HttpError(
    413,
    "payload_too_large",
    `Cannot read the request: the body is larger than ${maxBytes} bytes`,
    // The rest of the body is never read, so the connection cannot carry another request.
    { headers: { connection: "close" } },
  );
}
