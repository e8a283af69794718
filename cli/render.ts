/**
 * How the chat view looks: `[HH:MM] <alice> hi`, `#room` when not the current
 * room, direct messages, presence, errors and status lines. Pure functions of
 * the frame and a {@linkcode ViewOptions}, so they are tested directly.
 *
 * @module
 */
import type { DirectMessage, RoomMessage } from "../chat/protocol.ts";
import type { ErrorFrame } from "./server_frames.ts";

/** What a rendering depends on besides the frame itself. */
export interface ViewOptions {
  /** Whether to use ANSI colours. */
  color: boolean;
  /** The room plain lines go to; others are tagged with `#room`. */
  currentRoom: string | undefined;
  /** The logged-in user. */
  me: string;
}

// Readable on dark and light backgrounds; no blue-on-black, no white-on-white.
const NICK_COLORS = [31, 32, 33, 35, 36, 91, 92, 93, 94, 95, 96] as const;
const DIM = 2;
const BOLD = 1;
const RED = 31;
const CONTROL_CHARS =
  // deno-lint-ignore no-control-regex
  /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** The ANSI colour of a nick: the same for a user every time, everywhere. */
export function nickColor(name: string): number {
  // FNV-1a over the lower-cased name: usernames are unique case-insensitively.
  let hash = 0x811c9dc5;
  for (const byte of new TextEncoder().encode(name.toLowerCase())) {
    hash ^= byte;
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return NICK_COLORS[hash % NICK_COLORS.length]!;
}

/** Whether the view should be coloured: not with `NO_COLOR`, not into a pipe. */
export function shouldColor(
  { noColor, term, isTerminal }: {
    noColor: string | undefined;
    term: string | undefined;
    isTerminal: boolean;
  },
): boolean {
  return isTerminal && (noColor === undefined || noColor === "") &&
    term !== "dumb";
}

/** `HH:MM` of an ISO timestamp in local time (now when it cannot be read). */
export function formatClock(ts: string, now: Date = new Date()): string {
  const parsed = new Date(ts);
  const date = Number.isNaN(parsed.getTime()) ? now : parsed;
  return `${pad2(date.getHours())}:${pad2(date.getMinutes())}`;
}

const DAYS = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS = [
  "Jan",
  "Feb",
  "Mar",
  "Apr",
  "May",
  "Jun",
  "Jul",
  "Aug",
  "Sep",
  "Oct",
  "Nov",
  "Dec",
];

/**
 * The local day of an ISO timestamp, `Sat 28 Nov 2026` (`undefined` when it
 * cannot be read): what a `[HH:MM]` does not say.
 */
export function formatDay(ts: string): string | undefined {
  const date = new Date(ts);
  if (Number.isNaN(date.getTime())) return undefined;
  return `${DAYS[date.getDay()]} ${date.getDate()} ${
    MONTHS[date.getMonth()]
  } ${date.getFullYear()}`;
}

/**
 * Replaces control characters in text from the network, so that nobody can
 * move the cursor, recolour or clear another user's terminal, and the
 * characters that reorder text (bidirectional overrides and isolates) or
 * break lines (U+2028, U+2029), so that nobody can make a line read as
 * something it is not.
 */
export function sanitize(text: string): string {
  return text.replace(CONTROL_CHARS, (c) => c === "\t" ? " " : "\ufffd");
}

/**
 * Whether someone else's `text` names `me` as a word (`alice`, `@alice:`,
 * `ALICE?`; not `malice` or `alice_2`), as chat clients highlight.
 */
export function mentions(text: string, me: string, from: string): boolean {
  if (from.toLowerCase() === me.toLowerCase()) return false;
  const name = me.replace(/[.-]/g, "\\$&");
  return new RegExp(`(?<![A-Za-z0-9_.-])${name}(?![A-Za-z0-9_-])`, "i")
    .test(text);
}

/**
 * `[HH:MM] <alice> hi`, with `#room` when the room is not the current one;
 * in colour, the text of a message that names you is bold.
 */
export function renderRoomMessage(
  message: RoomMessage,
  view: ViewOptions,
): string {
  const text = sanitize(message.text);
  return `${stamp(message.ts, view)}${roomTag(message.room, view)}${
    nick(message.from, view)
  } ${
    mentions(message.text, view.me, message.from)
      ? paint(text, BOLD, view.color)
      : text
  }`;
}

/** One of the user's own messages that the server has not echoed yet. */
export function renderPending(
  room: string,
  text: string,
  view: ViewOptions,
): string {
  return paint(
    `[--:--] ${roomTag(room, { ...view, color: false })}<${
      sanitize(view.me)
    }> ${sanitize(text)} (pending)`,
    DIM,
    view.color,
  );
}

/** `[HH:MM] *alice* -> you: psst`, or `*you* -> bob: ...` for one's own. */
export function renderDirectMessage(
  dm: DirectMessage,
  view: ViewOptions,
): string {
  const mine = dm.from.toLowerCase() === view.me.toLowerCase();
  const from = mine ? "you" : dm.from;
  const to = dm.to.toLowerCase() === view.me.toLowerCase() ? "you" : dm.to;
  return `${stamp(dm.ts, view)}${
    paint(`*${sanitize(from)}*`, mine ? BOLD : nickColor(dm.from), view.color)
  } -> ${sanitize(to)}: ${sanitize(dm.text)}`;
}

/** `* bob joined #lobby` / `* bob left #dev`. */
export function renderPresence(
  frame: { type: "join" | "leave"; room: string; user: string },
  view: ViewOptions,
): string {
  return status(
    `${paint(sanitize(frame.user), nickColor(frame.user), view.color)} ${
      frame.type === "join" ? "joined" : "left"
    } #${sanitize(frame.room)}`,
    view,
  );
}

/**
 * `! rate_limited: Too many messages (retry in 1.5s)`; with `notSent`, what
 * the refused frame said, so that its text is not lost:
 * `! unknown_user: bob is not connected (not sent: /msg bob hi)`.
 */
export function renderError(
  frame: ErrorFrame,
  view: ViewOptions,
  notSent?: string,
): string {
  // Unless the message says when already (this server's: "try again in 0.5 s").
  const retry = frame.retry_after_ms !== undefined &&
      !/\b(try again|retry)\b/i.test(frame.message)
    ? ` (retry in ${(Math.ceil(frame.retry_after_ms / 100) / 10).toFixed(1)}s)`
    : "";
  const text = `! ${sanitize(frame.error)}${
    frame.message === "" ? "" : `: ${sanitize(frame.message)}`
  }${retry}${notSent === undefined ? "" : ` (not sent: ${sanitize(notSent)})`}`;
  return paint(text, RED, view.color);
}

/** A line from the client itself, `* ...`. */
export function status(text: string, view: ViewOptions): string {
  return `${paint("*", DIM, view.color)} ${text}`;
}

/** A hint after a mistake at the prompt, `! ...`. */
export function hint(text: string, view: ViewOptions): string {
  return paint(`! ${text}`, RED, view.color);
}

/** A comma-separated list of nicks, each in its colour. */
export function userList(users: readonly string[], view: ViewOptions): string {
  return users.length === 0
    ? "nobody"
    : users.map((u) => paint(sanitize(u), nickColor(u), view.color)).join(", ");
}

/** Wraps `text` in an SGR colour when colours are on. */
export function paint(text: string, code: number, color: boolean): string {
  return color ? `\x1b[${code}m${text}\x1b[0m` : text;
}

/** How many terminal columns `text` takes once colour codes are removed. */
export function visibleLength(text: string): number {
  // deno-lint-ignore no-control-regex
  return displayWidth(text.replace(/\x1b\[[0-9;]*m/g, ""));
}

const graphemes = new Intl.Segmenter(undefined, { granularity: "grapheme" });

/** `text` cut into user-perceived characters (an emoji with its modifiers is one). */
export function splitGraphemes(text: string): string[] {
  return Array.from(graphemes.segment(text), (s) => s.segment);
}

/** Columns a terminal gives `text` (no escape codes in it). */
export function displayWidth(text: string): number {
  let width = 0;
  // ASCII is one column a character: the common case, without segmenting.
  if (/^[\x20-\x7e]*$/.test(text)) return text.length;
  for (const g of splitGraphemes(text)) width += graphemeWidth(g);
  return width;
}

// East Asian wide and fullwidth characters, and emoji shown as pictures:
// two columns (the ranges of wcwidth, in short).
const WIDE =
  /^(?:\p{Emoji_Presentation}|[\u1100-\u115f\u2e80-\u303e\u3041-\u33ff\u3400-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uac00-\ud7a3\uf900-\ufaff\ufe30-\ufe4f\uff00-\uff60\uffe0-\uffe6\u{1f300}-\u{1f64f}\u{1f900}-\u{1f9ff}\u{20000}-\u{3fffd}])/u;
// Marks and format characters take no column of their own.
const ZERO_WIDTH = /^[\p{M}\p{Cf}]+$/u;

function graphemeWidth(g: string): number {
  if (ZERO_WIDTH.test(g)) return 0;
  return WIDE.test(g) || g.includes("\ufe0f") ? 2 : 1;
}

function stamp(ts: string, view: ViewOptions): string {
  return `${paint(`[${formatClock(ts)}]`, DIM, view.color)} `;
}

function roomTag(room: string, view: ViewOptions): string {
  return room === view.currentRoom ? "" : `#${sanitize(room)} `;
}

function nick(name: string, view: ViewOptions): string {
  return paint(`<${sanitize(name)}>`, nickColor(name), view.color);
}

function pad2(n: number): string {
  return String(n).padStart(2, "0");
}
