/**
 * Turns the untrusted values of a server text frame into typed
 * {@linkcode IncomingFrame}s (CONTRACT section 4), checking every field the
 * client reads instead of casting.
 *
 * @module
 */
import {
  type DirectMessage,
  isRoomName,
  type RoomMessage,
  type ServerFrame,
  splitServerFrames,
} from "../chat/protocol.ts";

/** An `error` frame as the client reads it: any code is shown as given. */
export interface ErrorFrame {
  type: "error";
  error: string;
  message: string;
  retry_after_ms?: number;
}

/**
 * A server frame as the client sees it: the protocol's frames, with error
 * codes kept as plain strings so that a code newer than the client still shows.
 */
export type IncomingFrame =
  | Exclude<ServerFrame, { type: "error" }>
  | ErrorFrame;

/** Splits one server text frame and keeps the objects that are valid frames. */
export function parseServerText(data: string): IncomingFrame[] {
  const frames: IncomingFrame[] = [];
  for (const value of splitServerFrames(data)) {
    const frame = parseServerFrame(value);
    if (frame !== undefined) frames.push(frame);
  }
  return frames;
}

/** Checks one decoded value; `undefined` when it is no frame the client knows. */
export function parseServerFrame(
  value: unknown,
): IncomingFrame | undefined {
  if (!isObject(value)) return undefined;
  switch (value.type) {
    case "welcome": {
      const history = messageList(value.history);
      if (
        typeof value.username !== "string" || !isRoom(value.room) ||
        !isStringArray(value.rooms) || !isStringArray(value.users) ||
        history === undefined
      ) return undefined;
      return {
        type: "welcome",
        username: value.username,
        room: value.room,
        rooms: value.rooms,
        users: value.users,
        history,
      };
    }
    case "joined": {
      const history = messageList(value.history ?? []);
      const users = value.users ?? [];
      if (
        !isRoom(value.room) || !isStringArray(users) ||
        history === undefined
      ) return undefined;
      return { type: "joined", room: value.room, users, history };
    }
    case "left":
      return isRoom(value.room)
        ? { type: "left", room: value.room }
        : undefined;
    case "rooms": {
      if (!Array.isArray(value.rooms)) return undefined;
      const rooms: { name: string; users: number }[] = [];
      for (const item of value.rooms) {
        if (!isObject(item) || !isRoom(item.name)) continue;
        rooms.push({
          name: item.name,
          users: typeof item.users === "number" ? item.users : 0,
        });
      }
      return { type: "rooms", rooms };
    }
    case "message":
      return parseRoomMessage(value);
    case "dm":
      return parseDirectMessage(value);
    case "join":
    case "leave":
      if (!isRoom(value.room) || typeof value.user !== "string") {
        return undefined;
      }
      return {
        type: value.type,
        room: value.room,
        user: value.user,
        ts: typeof value.ts === "string" ? value.ts : "",
      };
    case "who":
      if (!isRoom(value.room) || !isStringArray(value.users)) {
        return undefined;
      }
      return { type: "who", room: value.room, users: value.users };
    case "history": {
      const messages = messageList(value.messages);
      if (!isRoom(value.room) || messages === undefined) {
        return undefined;
      }
      return {
        type: "history",
        room: value.room,
        messages,
        ...(value.gap === true && { gap: true as const }),
      };
    }
    case "pong":
      return { type: "pong" };
    case "error": {
      if (typeof value.error !== "string") return undefined;
      const retry = value.retry_after_ms;
      return {
        type: "error",
        error: value.error,
        message: typeof value.message === "string" ? value.message : "",
        ...(typeof retry === "number" && { retry_after_ms: retry }),
      };
    }
    default:
      return undefined;
  }
}

/** Checks one room message; `undefined` when a field is missing or mistyped. */
export function parseRoomMessage(value: unknown): RoomMessage | undefined {
  if (
    !isObject(value) || value.type !== "message" ||
    !isMessageId(value.id) || !isRoom(value.room) ||
    typeof value.from !== "string" || typeof value.text !== "string"
  ) return undefined;
  return {
    type: "message",
    id: String(value.id),
    room: value.room,
    from: value.from,
    text: value.text,
    ts: typeof value.ts === "string" ? value.ts : "",
    ...(typeof value.client_id === "string" && { client_id: value.client_id }),
  };
}

function parseDirectMessage(value: Record<string, unknown>):
  | DirectMessage
  | undefined {
  if (
    typeof value.from !== "string" || typeof value.to !== "string" ||
    typeof value.text !== "string"
  ) return undefined;
  return {
    type: "dm",
    id: isMessageId(value.id) ? String(value.id) : "",
    from: value.from,
    to: value.to,
    text: value.text,
    ts: typeof value.ts === "string" ? value.ts : "",
  };
}

function messageList(value: unknown): RoomMessage[] | undefined {
  if (!Array.isArray(value)) return undefined;
  const out: RoomMessage[] = [];
  for (const item of value) {
    // A history entry without its frame type is still a stored message.
    const message = parseRoomMessage(
      isObject(item) && item.type === undefined
        ? { ...item, type: "message" }
        : item,
    );
    if (message !== undefined) out.push(message);
  }
  return out;
}

function isMessageId(value: unknown): boolean {
  return (typeof value === "string" && /^\d{1,20}$/.test(value)) ||
    (typeof value === "number" && Number.isSafeInteger(value) && value >= 0);
}

/** A room name as the server makes them (so a hostile one never reaches the screen). */
function isRoom(value: unknown): value is string {
  return typeof value === "string" && isRoomName(value);
}

function isStringArray(value: unknown): value is string[] {
  return Array.isArray(value) && value.every((v) => typeof v === "string");
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
