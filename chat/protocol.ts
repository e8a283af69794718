/**
 * The chat wire protocol (CONTRACT section 4): frame types in both
 * directions, error codes, limits, and the parser that turns an untrusted
 * client frame into a typed {@linkcode ClientFrame}.
 *
 * The terminal client imports this module and nothing else of `chat/`.
 *
 * @module
 */

/** Longest message text, in code points after trimming. */
export const MAX_TEXT_CHARS = 4000;
/** Largest client frame in bytes; above it the connection closes with 1009. */
export const MAX_FRAME_BYTES = 64 * 1024;
/** Most messages one `history` request may ask for. */
export const MAX_HISTORY_LIMIT = 500;
/** Messages a `history` request gets when it names no limit. */
export const DEFAULT_HISTORY_LIMIT = 50;
/**
 * Most UTF-8 bytes of messages in one page of history (a `history` answer,
 * or the history of a `welcome` or `joined`); a page holds at least one
 * message, so a message is never out of reach. Five hundred messages of up
 * to about 500 bytes fit; 500 of the longest (4000 emoji, 16 KB each) would
 * be 8 MB in one frame, more than the connection's whole unsent-data budget
 * (1 MiB), which a slow link takes seconds to carry. A client pages on from
 * the last message it got.
 */
export const MAX_PAGE_BYTES = 256 * 1024;
/**
 * Client frames whose answer can be large (a page of history, a list of
 * rooms or users): the server counts them against a per-user budget, the
 * terminal client keeps few of them in flight.
 */
export const LARGE_ANSWER_FRAMES: ReadonlySet<string> = new Set([
  "join",
  "who",
  "rooms",
  "history",
]);
/** The room every connection starts in. */
export const LOBBY = "lobby";

const ROOM_RE = /^[a-z0-9_-]{1,32}$/;
const USERNAME_RE = /^[A-Za-z0-9_.-]{3,32}$/;
const CLIENT_ID_RE = /^[\x21-\x7e]{1,64}$/;
const MESSAGE_ID_RE = /^\d{1,16}$/;

/** WebSocket close codes the server uses. */
export const CloseCode = {
  normal: 1000,
  goingAway: 1001,
  policy: 1008,
  tooBig: 1009,
  serverError: 1011,
  tryAgainLater: 1013,
} as const;

/** Error codes carried by `error` frames. */
export type ErrorCode =
  | "invalid_frame"
  | "message_too_long"
  | "rate_limited"
  | "unknown_room"
  | "unknown_user"
  | "too_many_rooms"
  | "storage_unavailable"
  | "server_error";

/** A message kept in a room's history. */
export interface RoomMessage {
  type: "message";
  id: string;
  room: string;
  from: string;
  text: string;
  ts: string;
  client_id?: string;
}

/** A direct message (never stored). */
export interface DirectMessage {
  type: "dm";
  id: string;
  from: string;
  to: string;
  text: string;
  ts: string;
}

/** Frames a client sends. */
export type ClientFrame =
  | { type: "message"; text: string; room?: string; client_id?: string }
  | { type: "join"; room: string }
  | { type: "leave"; room: string }
  | { type: "dm"; to: string; text: string }
  | { type: "who"; room?: string }
  | { type: "rooms" }
  | {
    type: "history";
    room?: string;
    before?: string;
    after?: string;
    limit: number;
  }
  | { type: "ping" };

/** Frames the server sends. */
export type ServerFrame =
  | {
    type: "welcome";
    username: string;
    room: string;
    rooms: string[];
    users: string[];
    history: RoomMessage[];
  }
  | { type: "joined"; room: string; users: string[]; history: RoomMessage[] }
  | { type: "left"; room: string }
  | { type: "rooms"; rooms: { name: string; users: number }[] }
  | RoomMessage
  | DirectMessage
  | { type: "join"; room: string; user: string; ts: string }
  | { type: "leave"; room: string; user: string; ts: string }
  | { type: "who"; room: string; users: string[] }
  | { type: "history"; room: string; messages: RoomMessage[]; gap?: true }
  | { type: "pong" }
  | {
    type: "error";
    error: ErrorCode;
    message: string;
    retry_after_ms?: number;
  };

/** A client frame that cannot be accepted, with the contract's error code. */
export class FrameError extends Error {
  override name = "FrameError";
  /** The contract code sent back in the `error` frame. */
  readonly code: ErrorCode;
  /** Builds a frame error with its contract code. */
  constructor(code: ErrorCode, message: string) {
    super(message);
    this.code = code;
  }
}

/** Whether `name` is a valid room name (already lower-case). */
export function isRoomName(name: string): boolean {
  return ROOM_RE.test(name);
}

/** Whether `name` follows the username rules. */
export function isUsername(name: string): boolean {
  return USERNAME_RE.test(name);
}

/** Counts code points, the contract's "characters". */
export function codePointLength(text: string): number {
  let n = 0;
  for (const _ of text) n++;
  return n;
}

/**
 * Parses the text of one client frame. A frame that is not a JSON object is a
 * message whose text is the frame. Throws {@linkcode FrameError}.
 */
export function parseClientFrameText(data: string): ClientFrame {
  let value: unknown;
  try {
    value = JSON.parse(data);
  } catch {
    value = undefined;
  }
  if (!isObject(value)) {
    return parseClientFrame({ type: "message", text: data });
  }
  return parseClientFrame(value);
}

/** Turns an untrusted decoded value into a {@linkcode ClientFrame}, or throws {@linkcode FrameError}. */
export function parseClientFrame(data: unknown): ClientFrame {
  if (!isObject(data)) {
    throw new FrameError("invalid_frame", "A frame must be a JSON object");
  }
  switch (data.type) {
    case "message": {
      const text = readText(data.text);
      const room = optionalRoom(data.room);
      const clientId = data.client_id;
      if (
        clientId !== undefined &&
        (typeof clientId !== "string" || !CLIENT_ID_RE.test(clientId))
      ) {
        throw new FrameError(
          "invalid_frame",
          "client_id must be 1 to 64 printable ASCII characters",
        );
      }
      return {
        type: "message",
        text,
        ...(room !== undefined && { room }),
        ...(clientId !== undefined && { client_id: clientId }),
      };
    }
    case "join":
    case "leave": {
      const room = optionalRoom(data.room);
      if (room === undefined) {
        throw new FrameError("invalid_frame", `${data.type} needs a room`);
      }
      return { type: data.type, room };
    }
    case "dm": {
      if (typeof data.to !== "string") {
        throw new FrameError("invalid_frame", "dm needs a user name in 'to'");
      }
      // A name no account can have is a user with no open connection.
      if (!isUsername(data.to)) {
        throw new FrameError(
          "unknown_user",
          "No such user: a username is 3 to 32 characters of A-Z, a-z, 0-9, _ . -",
        );
      }
      return { type: "dm", to: data.to, text: readText(data.text) };
    }
    case "who": {
      const room = optionalRoom(data.room);
      return { type: "who", ...(room !== undefined && { room }) };
    }
    case "rooms":
      return { type: "rooms" };
    case "history": {
      const room = optionalRoom(data.room);
      const before = optionalMessageId("before", data.before);
      const after = optionalMessageId("after", data.after);
      if (before !== undefined && after !== undefined) {
        throw new FrameError(
          "invalid_frame",
          "history takes before or after, not both",
        );
      }
      let limit = DEFAULT_HISTORY_LIMIT;
      if (data.limit !== undefined) {
        if (
          typeof data.limit !== "number" || !Number.isInteger(data.limit) ||
          data.limit < 1 || data.limit > MAX_HISTORY_LIMIT
        ) {
          throw new FrameError(
            "invalid_frame",
            `history limit must be a whole number from 1 to ${MAX_HISTORY_LIMIT}`,
          );
        }
        limit = data.limit;
      }
      return {
        type: "history",
        limit,
        ...(room !== undefined && { room }),
        ...(before !== undefined && { before }),
        ...(after !== undefined && { after }),
      };
    }
    case "ping":
      return { type: "ping" };
    default:
      throw new FrameError(
        "invalid_frame",
        typeof data.type === "string"
          ? `Unknown frame type "${data.type.slice(0, 32)}"`
          : "A frame needs a string 'type'",
      );
  }
}

/**
 * Splits one server text frame (one or more newline-separated JSON objects)
 * into values; clients parse each with their own checks.
 */
export function splitServerFrames(data: string): unknown[] {
  const out: unknown[] = [];
  for (const line of data.split("\n")) {
    if (line === "") continue;
    try {
      out.push(JSON.parse(line));
    } catch {
      // A line that is not JSON is skipped rather than dropping the whole frame.
    }
  }
  return out;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function readText(value: unknown): string {
  if (typeof value !== "string") {
    throw new FrameError("invalid_frame", "text must be a string");
  }
  const text = value.trim();
  if (text === "") throw new FrameError("invalid_frame", "text is empty");
  if (
    text.length > MAX_TEXT_CHARS && codePointLength(text) > MAX_TEXT_CHARS
  ) {
    throw new FrameError(
      "message_too_long",
      `text is longer than ${MAX_TEXT_CHARS} characters`,
    );
  }
  return text;
}

function optionalRoom(value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "string") {
    throw new FrameError("invalid_frame", "room must be a string");
  }
  // Checked before lower-casing: "\u212a" (the Kelvin sign) lower-cases to "k".
  const room = value.toLowerCase();
  if (!ROOM_RE.test(room) || !/^[A-Za-z0-9_-]*$/.test(value)) {
    throw new FrameError(
      "invalid_frame",
      "room names are 1 to 32 characters of a-z, 0-9, _ and -",
    );
  }
  return room;
}

function optionalMessageId(what: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value === "number" && Number.isSafeInteger(value) && value >= 0) {
    return String(value);
  }
  if (typeof value !== "string" || !MESSAGE_ID_RE.test(value)) {
    throw new FrameError("invalid_frame", `${what} must be a message id`);
  }
  return value;
}
