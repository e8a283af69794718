/**
 * The one error type of the auth API: a contract error code with its HTTP
 * status, turned into a JSON response in one place ({@linkcode errorResponse}).
 *
 * @module
 */

/** Error codes of the auth HTTP API (CONTRACT section 2). */
export type AuthErrorCode =
  | "invalid_json"
  | "invalid_username"
  | "invalid_password"
  | "username_taken"
  | "invalid_credentials"
  | "invalid_token"
  | "payload_too_large"
  | "request_timeout"
  | "rate_limited"
  | "busy"
  | "not_found"
  | "method_not_allowed"
  | "invalid_request"
  | "storage_unavailable"
  | "server_error";

/** Options of {@linkcode HttpError}. */
export interface HttpErrorOptions {
  /** Extra response headers, e.g. `Retry-After` or `Allow`. */
  headers?: Record<string, string>;
  /** Extra fields of the JSON body, e.g. `{ valid: false }`. */
  fields?: Record<string, unknown>;
}

/** An error a handler throws to answer with a contract error. */
export class HttpError extends Error {
  override name = "HttpError";
  /** HTTP status of the answer. */
  readonly status: number;
  /** Contract code, the `error` field of the body. */
  readonly code: AuthErrorCode;
  /** Extra response headers. */
  readonly headers: Record<string, string>;
  /** Extra body fields. */
  readonly fields: Record<string, unknown>;

  /** Builds an error answered as `status {"error": code, "message": message}`. */
  constructor(
    status: number,
    code: AuthErrorCode,
    message: string,
    options: HttpErrorOptions = {},
  ) {
    super(message);
    const { headers = {}, fields = {} } = options;
    this.status = status;
    this.code = code;
    this.headers = headers;
    this.fields = fields;
  }
}

/** A JSON response with `content-type: application/json`. */
export function jsonResponse(
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: {
      "content-type": "application/json",
      "cache-control": "no-store",
      ...headers,
    },
  });
}

/** Turns an {@linkcode HttpError} into its contract response. */
export function errorResponse(err: HttpError): Response {
  return jsonResponse(
    err.status,
    { ...err.fields, error: err.code, message: err.message },
    err.headers,
  );
}

/** The generic answer to an unexpected failure: never a stack trace. */
export function serverErrorResponse(): Response {
  return jsonResponse(500, {
    error: "server_error",
    message: "Cannot handle the request: internal server error",
  });
}
