/**
 * Reads a request body as a JSON object, enforcing a size limit while reading
 * (`Deno.serve` has none): by `Content-Length` first, then by counting the
 * streamed bytes, so an oversized body is refused without buffering the rest.
 *
 * @module
 */
import { HttpError } from "./http_error.ts";

/** Options of {@linkcode readJsonObject}. */
export interface ReadJsonObjectOptions {
  /** Take an empty body as `{}` instead of refusing it. Default false. */
  emptyAsObject?: boolean;
}

/**
 * The body of `req` as a JSON object. Throws {@linkcode HttpError} 413
 * `payload_too_large` (with `Connection: close`) above `maxBytes`, 400 `invalid_json` when the body is
 * not a JSON object (empty, not UTF-8, not JSON, an array, `null`...).
 */
export async function readJsonObject(
  req: Request,
  maxBytes: number,
  options: ReadJsonObjectOptions = {},
): Promise<Record<string, unknown>> {
  const { emptyAsObject = false } = options;
  const declared = req.headers.get("content-length");
  if (declared !== null && Number(declared) > maxBytes) {
    await req.body?.cancel().catch(() => {});
    throw tooLarge(maxBytes);
  }
  const bytes = await readLimited(req, maxBytes);
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

/** Discards a body nobody reads, so the connection can be reused. */
export async function discardBody(req: Request): Promise<void> {
  if (req.body !== null && !req.bodyUsed) {
    await req.body.cancel().catch(() => {});
  }
}

async function readLimited(
  req: Request,
  maxBytes: number,
): Promise<Uint8Array> {
  if (req.body === null) return new Uint8Array();
  const reader = req.body.getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.length;
      if (total > maxBytes) {
        await reader.cancel().catch(() => {});
        throw tooLarge(maxBytes);
      }
      chunks.push(value);
    }
  } finally {
    reader.releaseLock();
  }
  if (chunks.length === 1 && chunks[0] !== undefined) return chunks[0];
  const bytes = new Uint8Array(total);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  return bytes;
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
