/**
 * One logged-in chat session over the built-in `WebSocket`: the handlers
 * `onOpen` (start reading the user's lines and sending them), `onMessage`
 * (parse and show a frame), `onError` and `onClose` (reconnect with backoff,
 * or go back to login when the session is over).
 *
 * Reconnecting loses nothing and shows nothing twice: the session keeps, per
 * room, the id of the last message it showed; after a reconnect it rejoins
 * its rooms, asks for `history after` that id, holds back live messages of a
 * room until that answer is shown, and resends every message of its own not
 * yet echoed with the same `client_id` (the server stores each once).
 *
 * @module
 */
import {
  type ClientFrame,
  isRoomName,
  isUsername,
  LARGE_ANSWER_FRAMES,
  LOBBY,
  MAX_HISTORY_LIMIT,
  MAX_PAGE_BYTES,
  MAX_TEXT_CHARS,
  type RoomMessage,
} from "../chat/protocol.ts";
import type { TokenState } from "./api.ts";
import { describeNetworkError } from "./api.ts";
import { CliError, EXIT_ERROR, Interrupted } from "./cli_error.ts";
import type { LineReader } from "./line_reader.ts";
import {
  formatDay,
  hint,
  mentions,
  renderDirectMessage,
  renderError,
  renderPending,
  renderPresence,
  renderRoomMessage,
  sanitize,
  status,
  userList,
  type ViewOptions,
} from "./render.ts";
import { type IncomingFrame, parseServerText } from "./server_frames.ts";

/** How a session ended. */
export type SessionEnd = "quit" | "expired" | "interrupted";

/** Everything a session needs; clocks, randomness and sockets can be injected. */
export interface ChatSessionOptions {
  /** The chat address `/login` handed out. */
  chatUrl: string;
  /** The session token, sent only in the `Authorization` header. */
  token: string;
  /** The logged-in user. */
  username: string;
  /** The shared line reader (menu, password and chat read from it). */
  lines: LineReader;
  /** Whether to colour the view. */
  color: boolean;
  /** Asks the auth server whether the session is still valid. */
  checkSession: () => Promise<TokenState>;
  /** Opens a WebSocket; the default sends the token as a Bearer header. */
  connect?: (url: string, token: string) => WebSocket;
  /** Randomness for the backoff jitter, in [0, 1). */
  random?: () => number;
  /** First reconnect delay in milliseconds (doubles each failure). */
  initialBackoffMs?: number;
  /** Longest reconnect delay in milliseconds. */
  maxBackoffMs?: number;
  /** How long `/quit` waits for the echoes of messages still pending. */
  quitGraceMs?: number;
  /** How long a connection may take to open before it counts as failed. */
  connectTimeoutMs?: number;
  /**
   * Where an earlier session of the same user left off when it expired: its
   * rooms are joined again, what they missed is fetched, and its unconfirmed
   * messages are sent with their `client_id`, as after a reconnect.
   */
  resume?: SessionState;
  /** Silence from the server after which the client sends a `ping`. */
  heartbeatMs?: number;
  /** How long the server has to say anything after that `ping`, or the connection counts as lost. */
  heartbeatTimeoutMs?: number;
}

/**
 * A room name as typed, lower-cased, or undefined when it is not one. It is
 * checked before lower-casing, as the server does: "\u212a" (the Kelvin
 * sign) lower-cases to "k".
 */
function typedRoom(text: string | undefined): string | undefined {
  if (text === undefined || !/^[A-Za-z0-9_-]+$/.test(text)) return undefined;
  const room = text.toLowerCase();
  return isRoomName(room) ? room : undefined;
}

/** Lines of `/help`. */
export const CHAT_HELP = [
  "/join ROOM        join a room (created if new) and make it the current one",
  "/leave [ROOM]     leave a room (the current one without ROOM)",
  "/rooms            list the rooms",
  "/who [ROOM]       who is in the current room (or ROOM)",
  "/msg USER TEXT    send a direct message",
  "/history [N]      show N older messages of the current room (default 20)",
  "/quit             leave the chat (Ctrl+D too)",
  "/help             this help",
  "Any other line is a message to the current room; //text sends /text.",
];

/** The commands Tab completes. */
const COMMANDS = [
  "/help",
  "/join",
  "/leave",
  "/rooms",
  "/who",
  "/msg",
  "/history",
  "/quit",
];
/** At most this many user names and room names are kept for Tab. */
const MAX_NAMES = 10_000;

const DEFAULT_HISTORY_PAGE = 20;
/** Ids (with their `ts`) remembered per room to tell a history that started over. */
const SEEN_KEPT = 256;
/**
 * The user's own messages remembered the same way, beyond the last
 * {@linkcode SEEN_KEPT} of the room: a resend after a reconnect gets the
 * original's echo again (its old id), however much was said since.
 */
const OWN_KEPT = 1024;
/**
 * Own messages sent and not yet echoed, at most: pasted or piped lines beyond
 * it wait their turn instead of running into the server's message rate (a
 * burst of 10 by default) and its flood close.
 */
const SEND_WINDOW = 8;
/**
 * Requests with a large answer in flight at once, at most: a `joined` or
 * `history` carries a page of history (up to 256 KiB), `rooms` and `who` a
 * list that can be longer still, and a reconnect asks for every room's; more
 * at once could pass the server's 1 MiB of unsent data per connection on a
 * slow link, which it closes with 1013.
 */
const PAGE_WINDOW = 2;

/** Whether a frame is something said (rated as messages), or a command. */
function saying(frame: ClientFrame): boolean {
  return frame.type === "message" || frame.type === "dm";
}

/** Whether a frame's answer can be large (see {@linkcode PAGE_WINDOW}). */
function carriesPage(frame: ClientFrame): boolean {
  return LARGE_ANSWER_FRAMES.has(frame.type);
}

/** What a session hands on to the next login of its user (see `resume`). */
export interface SessionState {
  /** The rooms as typed (the prompt's). */
  rooms: string[];
  /** The rooms the server had confirmed. */
  serverRooms: string[];
  /** What was typed and not answered yet, in order. */
  outbox: ClientFrame[];
  /** Per room, the oldest message shown (where `/history` goes on). */
  oldestId: [string, string][];
  lastId: [string, bigint][];
  pending: [string, PendingMessage][];
  /** Per room, the `after` id whose gap the user was told about. */
  gapTold: [string, string][];
  /** Per room, the `ts` of the newest messages shown, by id. */
  seenTs: [string, [string, string][]][];
  /** The same for the user's own newest messages (see `OWN_KEPT`). */
  ownTs: [string, [string, string][]][];
}

/** A message typed and not yet confirmed by the server. */
export interface PendingMessage {
  room: string;
  text: string;
}

/**
 * The text of what was typed and is not confirmed, in the order typed, one
 * line each (sanitized): `#lobby hi` for a message, `/msg bob hi` for a
 * direct message. `frames` are those still to send or awaiting an answer,
 * in the order they go out; `pending`, the messages not yet echoed.
 */
export function unconfirmedTexts(
  frames: readonly ClientFrame[],
  pending: ReadonlyMap<string, PendingMessage>,
): string[] {
  const lines: string[] = [];
  const listed = new Set<string>();
  const say = (id: string, m: PendingMessage) => {
    listed.add(id);
    lines.push(`#${m.room} ${m.text}`);
  };
  for (const frame of frames) {
    if (frame.type === "dm") lines.push(`/msg ${frame.to} ${frame.text}`);
    if (frame.type !== "message" || frame.client_id === undefined) continue;
    const message = pending.get(frame.client_id);
    if (message !== undefined && !listed.has(frame.client_id)) {
      say(frame.client_id, message);
    }
  }
  // Any pending message not found among the frames still goes on the list.
  for (const [id, message] of pending) if (!listed.has(id)) say(id, message);
  return lines.map(sanitize);
}

/** A chat session; {@linkcode ChatSession.run} resolves when it ends. */
export class ChatSession {
  #opts: Required<Omit<ChatSessionOptions, "resume">>;
  #me: string;
  #ws: WebSocket | null = null;
  #openedThisSocket = false;
  #everOpened = false;
  #ready = false;
  #firstWelcome = Promise.withResolvers<void>();
  #welcomes = 0;
  /** Started from an expired session's state: the first welcome resyncs too. */
  #resuming = false;
  #lineLoop: Promise<void> | null = null;
  #attempt = 0;
  #reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  #lastError = "";
  #ending = false;
  #done = Promise.withResolvers<SessionEnd>();
  #readAbort = new AbortController();

  /** The rooms this session is in, in join order: the last is current. */
  #rooms: string[] = [LOBBY];
  /**
   * The rooms the server has confirmed (`joined`/`left` answers), in join
   * order: what a reconnect restores before the frames still queued (which
   * may leave or join rooms in turn) go out again.
   */
  #serverRooms: string[] = [LOBBY];
  /** Per room, the id of the newest message shown (0n: none, but joined). */
  #lastId = new Map<string, bigint>();
  /** Per room, the id of the oldest message shown, for `/history`. */
  #oldestId = new Map<string, string>();
  /** User names seen (lower-case → as shown), for Tab. */
  #names = new Map<string, string>();
  /** Rooms named by a `rooms` answer, for Tab. */
  #knownRooms = new Set<string>();
  /**
   * The local day of the last message shown (today at the start: the first
   * messages say their day only when it is another).
   */
  #shownDay: { last: string | undefined } = {
    last: formatDay(new Date().toISOString()),
  };
  /** Per room, the `after` id whose gap the user has been told about. */
  #gapTold = new Map<string, string>();
  /**
   * Per room, the `ts` of the newest messages shown (up to
   * {@linkcode SEEN_KEPT}), by id. A message with one of those ids and
   * another `ts` means the server's history of the room started over (a
   * chat server restarted on other or wiped data hands out the same ids
   * again): the ids seen before say nothing any more.
   */
  #seenTs = new Map<string, Map<string, string>>();
  /**
   * Per room, the `ts` of the user's own newest messages shown (up to
   * {@linkcode OWN_KEPT}), by id: the original echo of a message sent again
   * is one of them, and neither shown twice nor taken for a start-over.
   */
  #ownTs = new Map<string, Map<string, string>>();
  /** Rooms waiting for their `history after` answer, with held-back messages. */
  #syncing = new Map<string, RoomMessage[]>();
  /**
   * The frames sent on this socket whose answer has not come yet, oldest
   * first. The server answers every frame, in order, with its answer or one
   * error: an error is about the oldest frame still waiting.
   */
  #asked: ClientFrame[] = [];
  /**
   * What is still to be sent on this socket, in the order it was typed (or,
   * after a reconnect, the resync first, then the unconfirmed messages): at
   * most {@linkcode SEND_WINDOW} frames wait for their answer at once, so
   * pasted or piped lines never run into the server's rates.
   */
  #outbox: ClientFrame[] = [];
  /** `/history` pages, whose `before` is filled in when they are sent. */
  #olderPages = new WeakSet<ClientFrame>();
  /** Frames refused for the server's rate: first again once the wait is over. */
  #requeue: ClientFrame[] = [];
  /** The current room when a typed frame was typed, before it took effect. */
  #typedIn = new WeakMap<ClientFrame, string | undefined>();
  /** Rooms rejoined after a reconnect, whose `joined` is not announced. */
  #quietJoins = new Set<string>();
  /** Rooms left again after a reconnect, whose `left` is not announced. */
  #quietLeaves = new Set<string>();
  /**
   * Rooms left while disconnected: said when typed, so the server's `left`
   * is not announced again (kept across failed reconnect attempts).
   */
  #offlineLeaves = new Set<string>();
  #quitting = false;
  /** Own messages not yet echoed, by `client_id`, oldest first. */
  #pending = new Map<string, PendingMessage>();
  #pendingShown = new Set<string>();
  /**
   * Set by a `rate_limited` answer: from then on one frame at a time, each
   * after the previous answer and the server's wait, until the outbox is empty.
   */
  #paced = false;
  /** Running while the server's `retry_after_ms` is not over: nothing is sent. */
  #holdTimer: ReturnType<typeof setTimeout> | undefined;
  /** While paced, the wait between two frames: the longest `retry_after_ms` seen. */
  #paceMs = 0;
  /** Answers and errors received (to see that the server keeps answering). */
  #answers = 0;
  /** Called on every frame and on a close: what `#quit` waits on. */
  #wake: (() => void) | null = null;
  /** Fails a connection attempt that does not open in time. */
  #connectTimer: ReturnType<typeof setTimeout> | undefined;
  /** Checks that an open connection is alive (see {@linkcode ChatSessionOptions.heartbeatMs}). */
  #heartbeatTimer: ReturnType<typeof setInterval> | undefined;
  /** When the server last said anything on this socket. */
  #lastHeard = 0;
  /** When the heartbeat's `ping` went out, while its answer is awaited. */
  #probeAt: number | undefined;

  /** Builds a session; nothing happens until {@linkcode ChatSession.run}. */
  constructor(options: ChatSessionOptions) {
    this.#opts = {
      connect: (url, token) =>
        new WebSocket(url, {
          headers: { authorization: `Bearer ${token}` },
        }),
      random: Math.random,
      initialBackoffMs: 500,
      maxBackoffMs: 30_000,
      quitGraceMs: 3_000,
      connectTimeoutMs: 10_000,
      heartbeatMs: 15_000,
      heartbeatTimeoutMs: 10_000,
      ...options,
    };
    const resume = options.resume;
    if (resume !== undefined) {
      this.#resuming = true;
      this.#rooms = [...resume.rooms];
      this.#serverRooms = [...resume.serverRooms];
      this.#outbox = [...resume.outbox];
      this.#oldestId = new Map(resume.oldestId);
      for (const frame of this.#outbox) {
        if (frame.type === "history" && frame.after === undefined) {
          this.#olderPages.add(frame);
        }
      }
      this.#lastId = new Map(resume.lastId);
      this.#pending = new Map(resume.pending);
      this.#gapTold = new Map(resume.gapTold);
      this.#seenTs = new Map(
        resume.seenTs.map(([room, seen]) => [room, new Map(seen)]),
      );
      this.#ownTs = new Map(
        resume.ownTs.map(([room, own]) => [room, new Map(own)]),
      );
    }
    this.#me = options.username;
  }

  /**
   * Connects and chats until `/quit`, end of input, Ctrl+C or an expired
   * session. Rejects with {@linkcode CliError} when the chat server cannot be
   * reached at all.
   */
  run(): Promise<SessionEnd> {
    // A signal ends the session whatever it is doing: reading a line,
    // waiting for its first welcome, or for answers after /quit.
    this.#lines().setInterruptHandler(() => this.#interrupted());
    this.#lines().setCompleter((before) => this.complete(before));
    if (this.#pending.size > 0) {
      this.#updatePending();
      this.#showPendingAsPending();
    }
    this.#connect();
    return this.#done.promise;
  }

  /** Where this session is: its rooms, what it has shown, what is unconfirmed. */
  get state(): SessionState {
    return {
      rooms: [...this.#rooms],
      serverRooms: [...this.#serverRooms],
      outbox: [...this.#outbox],
      oldestId: [...this.#oldestId],
      lastId: [...this.#lastId],
      pending: [...this.#pending],
      gapTold: [...this.#gapTold],
      seenTs: [...this.#seenTs].map(([room, seen]) => [room, [...seen]]),
      ownTs: [...this.#ownTs].map(([room, own]) => [room, [...own]]),
    };
  }

  /** The socket opened: start reading the user's lines and sending them. */
  onOpen(_event: Event): void {
    this.#openedThisSocket = true;
    this.#everOpened = true;
    this.#lastError = "";
    clearTimeout(this.#connectTimer);
    this.#lastHeard = Date.now();
    this.#probeAt = undefined;
    const ws = this.#ws;
    const { heartbeatMs, heartbeatTimeoutMs } = this.#opts;
    clearInterval(this.#heartbeatTimer);
    this.#heartbeatTimer = setInterval(
      () => ws !== null && this.#heartbeat(ws),
      Math.max(10, Math.min(heartbeatMs, heartbeatTimeoutMs) / 4),
    );
    this.#lineLoop ??= this.#readLines();
  }

  /** A server text frame arrived: split it, check each object, show it. */
  onMessage(event: MessageEvent): void {
    this.#lastHeard = Date.now();
    if (typeof event.data !== "string") return;
    for (const frame of parseServerText(event.data)) this.handleFrame(frame);
    // Answers free places in the window; `/quit` may be waiting for them.
    this.#pump();
    this.#wake?.();
  }

  /** The socket failed; the close that follows decides what to do. */
  onError(event: Event): void {
    this.#lastError = event instanceof ErrorEvent ? event.message : "";
  }

  /** The socket closed: finish, reconnect, or go back to login. */
  onClose(event: CloseEvent): void {
    const opened = this.#openedThisSocket;
    this.#ws = null;
    this.#openedThisSocket = false;
    this.#ready = false;
    this.#syncing.clear();
    // What was not answered goes again after the reconnect, in the order
    // typed: messages (with their client_id, stored once), joins and leaves
    // (the same twice is harmless), questions. Not a direct message already
    // sent: it has no client_id, so it could arrive twice. Pings and resync
    // requests are made anew.
    const lost = this.#asked.filter((f) => f.type === "dm").length;
    if (lost > 0) {
      this.#print(hint(
        `${lost} direct message(s) may not have been sent: the connection was lost`,
        this.#view(),
      ));
    }
    // Refused frames were sent before those still awaiting an answer.
    this.#outbox = [
      ...this.#requeue,
      ...this.#asked.filter((f) => f.type !== "dm"),
      ...this.#outbox,
    ].filter((f) =>
      f.type !== "ping" && !(f.type === "history" && f.after !== undefined)
    );
    this.#asked = [];
    this.#requeue = [];
    this.#quietJoins.clear();
    this.#quietLeaves.clear();
    clearTimeout(this.#holdTimer);
    this.#holdTimer = undefined;
    // A new connection starts unpaced: a refusal there paces it again.
    this.#paced = false;
    this.#paceMs = 0;
    clearTimeout(this.#connectTimer);
    clearInterval(this.#heartbeatTimer);
    this.#heartbeatTimer = undefined;
    this.#wake?.();
    if (this.#ending) return;
    void this.#afterClose(event.code, opened);
  }

  /**
   * What Tab makes of `before`, the text before the cursor: its last word
   * completed, a command at the start (`/jo` → `/join `), a room after
   * `/join`, `/leave`, `/who` or `#`, else a user name seen in this session
   * (`ali` → `alice: ` at the start, `alice ` elsewhere); as far as the
   * candidates agree when there are several. `undefined` when nothing fits.
   */
  complete(before: string): string | undefined {
    const word = /\S*$/.exec(before)![0];
    if (word === "") return undefined;
    const head = before.slice(0, before.length - word.length);
    let options: string[];
    if (head === "" && word.startsWith("/")) {
      options = COMMANDS.map((c) => `${c} `);
    } else if (word.startsWith("#")) {
      options = [...this.#roomNames()].map((r) => `#${r} `);
    } else if (/^\/(join|leave|who)\s+$/.test(head)) {
      options = [...this.#roomNames()].map((r) => `${r} `);
    } else {
      options = [...this.#names.values()].map((n) =>
        head === "" ? `${n}: ` : `${n} `
      );
    }
    const lower = word.toLowerCase();
    const fits = options.filter((o) => o.toLowerCase().startsWith(lower))
      .sort();
    if (fits.length === 0) return undefined;
    let common = fits[0]!;
    for (const fit of fits) {
      let n = 0;
      while (
        n < common.length && n < fit.length &&
        common[n]!.toLowerCase() === fit[n]!.toLowerCase()
      ) n++;
      common = common.slice(0, n);
    }
    if (common.length <= word.length) return undefined;
    // One candidate: as it is spelt; several: what was typed, carried on.
    return head +
      (fits.length === 1 ? common : word + common.slice(word.length));
  }

  #roomNames(): Set<string> {
    return new Set([...this.#rooms, ...this.#knownRooms]);
  }

  /** Remembers the names a frame shows, for {@linkcode complete}. */
  #learn(frame: IncomingFrame): void {
    const names: string[] = [];
    switch (frame.type) {
      case "welcome":
      case "joined":
      case "who":
        names.push(...frame.users);
        break;
      case "message":
        names.push(frame.from);
        break;
      case "dm":
        names.push(frame.from, frame.to);
        break;
      case "join":
      case "leave":
        names.push(frame.user);
        break;
      case "rooms":
        for (const r of frame.rooms) {
          if (this.#knownRooms.size < MAX_NAMES) this.#knownRooms.add(r.name);
        }
        break;
    }
    for (const name of names) {
      const key = name.toLowerCase();
      if (key === this.#me.toLowerCase() || this.#names.has(key)) continue;
      if (this.#names.size < MAX_NAMES) this.#names.set(key, name);
    }
  }

  /** Shows one server frame and updates the session's state. */
  handleFrame(frame: IncomingFrame): void {
    this.#learn(frame);
    switch (frame.type) {
      case "welcome":
        return this.#onWelcome(frame.username, frame.history);
      case "joined":
        this.#answered((f) => f.type === "join" && f.room === frame.room);
        return this.#onJoined(frame.room, frame.users, frame.history);
      case "left":
        this.#answered((f) => f.type === "leave" && f.room === frame.room);
        this.#serverRooms = this.#serverRooms.filter((r) => r !== frame.room);
        if (
          !this.#quietLeaves.delete(frame.room) &&
          !this.#offlineLeaves.delete(frame.room)
        ) {
          this.#print(status(`you left #${frame.room}`, this.#view()));
        }
        return this.#updatePrompt();
      case "message":
        return this.#onRoomMessage(frame);
      case "dm":
        if (frame.from.toLowerCase() === this.#me.toLowerCase()) {
          // Only as the oldest awaited answer: the same text to the same
          // user from another terminal of mine must not settle others.
          this.#answered(
            (f) =>
              f.type === "dm" && f.text === frame.text &&
              f.to.toLowerCase() === frame.to.toLowerCase(),
            true,
          );
        }
        return this.#print(renderDirectMessage(frame, this.#view()), {
          bell: frame.from.toLowerCase() !== this.#me.toLowerCase(),
        });
      case "join":
      case "leave":
        if (frame.user.toLowerCase() === this.#me.toLowerCase()) return;
        return this.#print(renderPresence(frame, this.#view()));
      case "who":
        this.#answered((f) => f.type === "who" && f.room === frame.room);
        return this.#print(
          status(
            `in #${frame.room}: ${userList(frame.users, this.#view())}`,
            this.#view(),
          ),
        );
      case "rooms":
        this.#answered((f) => f.type === "rooms");
        return this.#print(status(
          frame.rooms.length === 0
            ? "no rooms"
            : `rooms: ${
              frame.rooms.map((r) =>
                `#${r.name} (${r.users} ${r.users === 1 ? "user" : "users"})`
              ).join(", ")
            }`,
          this.#view(),
        ));
      case "history": {
        const asked = this.#answered((f) =>
          f.type === "history" && f.room === frame.room
        );
        // `before` pages are asked by `/history`; without a request, a resync.
        const older = asked?.type === "history" && asked.after === undefined;
        return this.#onHistory(frame.room, frame.messages, {
          gap: frame.gap === true,
          older,
          after: asked?.type === "history" ? asked.after : undefined,
        });
      }
      case "pong":
        this.#answered((f) => f.type === "ping");
        return;
      case "error":
        return this.#onError(frame);
    }
  }

  /**
   * An answer came: the frame it answers is no longer waiting, nor is any
   * sent before it (answers come in order). Returns that frame, if found.
   */
  #answered(
    matches: (frame: ClientFrame) => boolean,
    headOnly = false,
  ): ClientFrame | undefined {
    const index = headOnly
      ? (this.#asked.length > 0 && matches(this.#asked[0]!) ? 0 : -1)
      : this.#asked.findIndex(matches);
    if (index === -1) return undefined;
    this.#answers++;
    const frame = this.#asked[index];
    this.#asked.splice(0, index + 1);
    return frame;
  }

  /** An error: it is about the oldest frame still waiting for its answer. */
  #onError(error: Extract<IncomingFrame, { type: "error" }>): void {
    const asked = this.#asked.shift();
    if (asked !== undefined) this.#answers++;
    if (error.error === "rate_limited" && asked?.type === "ping") return;
    // A message the server could not store (its disk is full) is not lost
    // either: it stays pending and goes again, as for the rate; but a quit
    // does not wait for a disk, so then it is left unconfirmed.
    const unstored = error.error === "storage_unavailable" &&
      asked?.type === "message";
    if (unstored && this.#quitting) {
      return this.#print(renderError(error, this.#view()));
    }
    if ((error.error === "rate_limited" || unstored) && asked !== undefined) {
      // Not lost: sent again, first, once the wait is over. Shown once; while
      // paced, a refusal just means "again, later".
      const wait = Math.min(Math.max(error.retry_after_ms ?? 1000, 50), 60_000);
      const quiet = this.#paced;
      this.#requeue.push(asked);
      this.#holdSending(wait);
      if (quiet) return;
      return this.#print(renderError(error, this.#view()));
    }
    let notSent: string | undefined;
    switch (asked?.type) {
      case "dm":
        // Not sent again either: the error says which one (its text is lost
        // otherwise, e.g. one typed offline, refused after the reconnect).
        notSent = `/msg ${asked.to} ${asked.text}`;
        break;
      case "message": {
        // Refused for good (a room left in between, a server error): not
        // sent again, and no longer pending.
        const id = asked.client_id ?? "";
        this.#pending.delete(id);
        this.#pendingShown.delete(id);
        this.#updatePending();
        break;
      }
      case "join":
        // Not joined after all: the room leaves the list (and the prompt).
        this.#rooms = this.#rooms.filter((r) => r !== asked.room);
        this.#serverRooms = this.#serverRooms.filter((r) => r !== asked.room);
        this.#quietJoins.delete(asked.room);
        this.#updatePrompt();
        break;
      case "history":
        if (asked.after !== undefined && asked.room !== undefined) {
          // No answer is coming: stop holding back the room's live messages.
          this.#endSync(asked.room);
        }
        break;
    }
    this.#print(renderError(error, this.#view(), notSent));
  }

  /** Acts on one typed line: a slash command or a message. */
  handleLine(line: string): void {
    const text = line.trim();
    if (text === "") return;
    if (text.startsWith("/") && !text.startsWith("//")) {
      return this.#command(text);
    }
    this.#say(text.startsWith("//") ? text.slice(1) : text);
  }

  // --- connection -----------------------------------------------------------

  #connect(): void {
    this.#reconnectTimer = undefined;
    let ws: WebSocket;
    try {
      ws = this.#opts.connect(this.#opts.chatUrl, this.#opts.token);
    } catch (err) {
      // A malformed chat address is not worth retrying.
      this.#finish(
        new CliError(
          `cannot connect to the chat server at ${this.#opts.chatUrl} (${
            err instanceof Error ? err.message : String(err)
          })`,
        ),
      );
      return;
    }
    this.#ws = ws;
    const timeout = this.#opts.connectTimeoutMs;
    this.#connectTimer = setTimeout(
      () =>
        this.#abandon(
          ws,
          `no answer within ${Math.round(timeout / 100) / 10} s`,
        ),
      timeout,
    );
    ws.onopen = (e) => ws === this.#ws && this.onOpen(e);
    ws.onmessage = (e) => ws === this.#ws && this.onMessage(e);
    ws.onerror = (e) => ws === this.#ws && this.onError(e);
    ws.onclose = (e) => ws === this.#ws && this.onClose(e);
  }

  async #afterClose(code: number, opened: boolean): Promise<void> {
    const refused = /status code:? 401/i.test(this.#lastError);
    // The WebSocket cannot see why an upgrade failed (a 401 for an expired
    // session looks like a dead server), so ask the auth server.
    if (!opened || code === 1008 || refused) {
      const state = await this.#opts.checkSession();
      if (this.#ending) return;
      if (state === "invalid") return this.#finish("expired");
      if (!this.#everOpened) {
        return this.#finish(
          new CliError(
            `cannot reach the chat server at ${this.#opts.chatUrl} (${this.#describeConnectError()})`,
          ),
        );
      }
    }
    const base = Math.min(
      this.#opts.maxBackoffMs,
      this.#opts.initialBackoffMs * 2 ** this.#attempt,
    );
    const delay = Math.min(
      this.#opts.maxBackoffMs,
      Math.round(base * (0.8 + 0.4 * this.#opts.random())),
    );
    this.#attempt++;
    const seconds = (delay / 1000).toFixed(1);
    this.#print(status(
      opened
        ? `connection lost, reconnecting in ${seconds}s...`
        : `still no connection (${this.#describeConnectError()}), retrying in ${seconds}s...`,
      this.#view(),
    ));
    if (opened) this.#showPendingAsPending();
    this.#updatePrompt();
    this.#reconnectTimer = setTimeout(() => this.#connect(), delay);
  }

  #describeConnectError(): string {
    if (this.#lastError.startsWith("no answer")) return this.#lastError;
    const status = /status code:? (\d{3})/i.exec(this.#lastError)?.[1];
    if (status !== undefined) return `it answered HTTP ${status}`;
    const reason = describeNetworkError(this.#lastError);
    if (reason !== "network error") return reason;
    return /tcp connect/i.test(this.#lastError)
      ? "connection refused"
      : "the connection failed";
  }

  /** Ctrl+C or a signal: the end, exit 1 if something is unconfirmed. */
  #interrupted(): void {
    this.#finish(this.#unconfirmed({ endsProgram: true }) ?? "interrupted");
  }

  #finish(end: SessionEnd | CliError): void {
    if (this.#ending) return;
    this.#ending = true;
    this.#lines().setInterruptHandler(null);
    this.#lines().setCompleter(null);
    this.#wake?.();
    clearTimeout(this.#reconnectTimer);
    clearTimeout(this.#holdTimer);
    clearTimeout(this.#connectTimer);
    clearInterval(this.#heartbeatTimer);
    this.#readAbort.abort(new Error("Session over"));
    this.#lines().setFooter([]);
    const ws = this.#ws;
    this.#ws = null;
    const settle = () => {
      if (end instanceof CliError) this.#done.reject(end);
      else this.#done.resolve(end);
    };
    if (ws === null || ws.readyState === WebSocket.CLOSED) return settle();
    // Wait (not forever) for the close handshake, so the server sees 1000.
    const timer = setTimeout(settle, 2_000);
    ws.onclose = () => {
      clearTimeout(timer);
      settle();
    };
    ws.onmessage = null;
    ws.onerror = null;
    try {
      ws.close(1000, "bye");
    } catch {
      clearTimeout(timer);
      settle();
    }
  }

  #send(frame: ClientFrame): boolean {
    const ws = this.#ws;
    if (ws === null || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    this.#asked.push(frame);
    return true;
  }

  /**
   * Queues a typed frame behind what was typed before it; `before` is the
   * current room before it took effect (see `#messageView`). Offline, a
   * question (`who`, `rooms`, `history`) is not kept (false); anything else
   * waits for the reconnect (true).
   */
  #enqueue(frame: ClientFrame, before = this.#currentRoom()): boolean {
    const question = frame.type === "who" || frame.type === "rooms" ||
      frame.type === "history";
    if (!this.#ready && question) return false;
    this.#typedIn.set(frame, before);
    this.#outbox.push(frame);
    this.#pump();
    return true;
  }

  /**
   * Gives up on a socket that does not answer (a frozen or unreachable
   * server never sends a close): it is handled as closed, code 1006.
   */
  #abandon(ws: WebSocket, why: string): void {
    if (ws !== this.#ws) return;
    this.#lastError = why;
    ws.onopen = null;
    ws.onmessage = null;
    ws.onerror = null;
    ws.onclose = null;
    try {
      ws.close();
    } catch {
      // Not open yet or already closing: nothing more to do.
    }
    this.onClose(new CloseEvent("close", { code: 1006, reason: why }));
  }

  /** Pings a silent server, and gives up on one that does not answer. */
  #heartbeat(ws: WebSocket): void {
    if (ws !== this.#ws) return;
    const { heartbeatMs, heartbeatTimeoutMs } = this.#opts;
    const now = Date.now();
    if (this.#probeAt !== undefined && this.#lastHeard >= this.#probeAt) {
      this.#probeAt = undefined;
    }
    const since = this.#probeAt ?? this.#lastHeard + heartbeatMs;
    if (now - since >= heartbeatTimeoutMs) {
      return this.#abandon(
        ws,
        `no answer from the chat server for ${
          Math.round((now - this.#lastHeard) / 1000)
        } s`,
      );
    }
    if (
      this.#probeAt === undefined && now - this.#lastHeard >= heartbeatMs &&
      this.#send({ type: "ping" })
    ) this.#probeAt = now;
  }

  // --- frames ---------------------------------------------------------------

  #onWelcome(username: string, history: RoomMessage[]): void {
    this.#me = username;
    this.#ready = true;
    this.#wake?.();
    this.#attempt = 0;
    const reconnect = this.#welcomes > 0;
    // Rooms taken up again (after a reconnect or an expiry) come back quietly.
    const quiet = reconnect || this.#resuming;
    this.#resuming = false;
    this.#welcomes++;
    // The rooms the server had confirmed, which the resync restores (this
    // connection is in the lobby only): they stay the rooms to restore if
    // the connection drops again before the answers. What was typed since
    // (and not answered) is still in the outbox; a room left since is not
    // taken up again (others would see a join and a leave, and its missed
    // messages would be shown) unless what was typed before the leave still
    // has to land in it.
    const needed = new Set<string>();
    for (const f of this.#outbox) {
      if (f.type === "message" && f.room !== undefined) needed.add(f.room);
    }
    const wanted = this.#serverRooms.filter((r) =>
      this.#rooms.includes(r) || needed.has(r)
    );
    if (reconnect) this.#print(status("reconnected", this.#view()));
    else {
      this.#print(status(
        `connected as ${username}; type /help for commands`,
        this.#view(),
      ));
    }
    // First the resync: leave the lobby again (before the joins: it would
    // take one of the places), rejoin, ask each room what was missed; then
    // the outbox, in the order typed (unconfirmed messages with their
    // client_id).
    if (wanted.includes(LOBBY)) this.#checkStartOver(LOBBY, history);
    const resync: ClientFrame[] = [];
    if (!wanted.includes(LOBBY)) {
      if (quiet) this.#quietLeaves.add(LOBBY);
      resync.push({ type: "leave", room: LOBBY });
    }
    for (const room of wanted) {
      if (room === LOBBY) continue;
      if (quiet) this.#quietJoins.add(room);
      resync.push({ type: "join", room });
    }
    for (const room of wanted) {
      const last = this.#lastId.get(room);
      if (last === undefined) continue;
      this.#syncing.set(room, []);
      resync.push({
        type: "history",
        room,
        after: String(last),
        limit: MAX_HISTORY_LIMIT,
      });
    }
    this.#outbox = [...resync, ...this.#outbox];
    if (wanted.includes(LOBBY) && !this.#syncing.has(LOBBY)) {
      this.#showMessages(LOBBY, history);
    }
    this.#pump();
    this.#updatePrompt();
    this.#firstWelcome.resolve();
  }

  #onJoined(room: string, users: string[], history: RoomMessage[]): void {
    // The typed room list already has it (where the user put it: a later
    // /leave or /join may have moved it since).
    this.#serverRooms = this.#serverRooms.filter((r) => r !== room).concat(
      room,
    );
    if (this.#quietJoins.delete(room)) {
      // Its `history after` is on the way; a room that started over on the
      // server shows what it has now instead (the answer then adds nothing).
      if (this.#checkStartOver(room, history)) {
        this.#showMessages(room, history);
      } else if (!this.#syncing.has(room)) this.#showMessages(room, history);
      return;
    }
    this.#print(
      status(
        `now in #${room} with ${userList(users, this.#view())}`,
        this.#view(),
      ),
    );
    if (!this.#syncing.has(room)) this.#showMessages(room, history);
  }

  #onRoomMessage(message: RoomMessage): void {
    if (message.client_id !== undefined) {
      const id = message.client_id;
      this.#answered((f) => f.type === "message" && f.client_id === id);
      this.#pending.delete(message.client_id);
      this.#pendingShown.delete(message.client_id);
      this.#updatePending();
    }
    const held = this.#syncing.get(message.room);
    if (held !== undefined) {
      held.push(message);
      return;
    }
    this.#showMessages(message.room, [message]);
  }

  #onHistory(
    room: string,
    messages: RoomMessage[],
    { gap, older, after }: {
      gap: boolean;
      older: boolean;
      after: string | undefined;
    },
  ): void {
    if (older) {
      if (messages.length === 0) {
        this.#print(status(`no older messages in #${room}`, this.#view()));
        return;
      }
      this.#print(status(`earlier in #${room}:`, this.#view()));
      // Days of their own: the page's first message says its day unless
      // that is today, and so does each change of day after it.
      const days = { last: formatDay(new Date().toISOString()) };
      for (const message of messages) {
        this.#dayChange(message.ts, days);
        this.#print(renderRoomMessage(message, this.#messageView()));
      }
      this.#oldestId.set(room, messages[0]!.id);
      return;
    }
    // The same gap is told once: with nothing newer seen since, every later
    // resync asks from the same id and hears about it again.
    if (gap && (after === undefined || this.#gapTold.get(room) !== after)) {
      if (after !== undefined) this.#gapTold.set(room, after);
      this.#print(status(
        `some messages of #${room} from while you were away may be missing (the server no longer keeps them, or stopped abruptly)`,
        this.#view(),
      ));
    }
    this.#showMessages(room, messages);
    const last = this.#lastId.get(room);
    if (last !== undefined && this.#mayMissMore(room, messages, after)) {
      // Ask for the next page first. A gap this page reported is the same
      // gap on the next (the server names a crash's lost ids up to where
      // they end): told once per resync, and not again for a later one
      // that asks from where this one goes on.
      if (this.#ready) {
        if (gap) this.#gapTold.set(room, String(last));
        this.#outbox.unshift({
          type: "history",
          room,
          after: String(last),
          limit: MAX_HISTORY_LIMIT,
        });
        return this.#pump();
      }
    }
    this.#endSync(room);
  }

  /**
   * Whether, after a `history after` page, more of what was missed may be
   * on the server. A page is short when it reached the newest message, but
   * also when the server's size limit cut it (such a page holds more than
   * the limit less one message, 25 KB at most): a short page well under the
   * limit, an empty page, or one that reaches the live messages held back
   * since the rejoin ends it.
   */
  #mayMissMore(
    room: string,
    messages: RoomMessage[],
    after: string | undefined,
  ): boolean {
    const newest = messages.at(-1);
    if (newest === undefined || after === undefined) return false;
    // A server that answered with nothing newer than asked has no more.
    if (BigInt(newest.id) <= BigInt(after)) return false;
    const firstLive = this.#syncing.get(room)?.[0];
    if (firstLive !== undefined && BigInt(newest.id) >= BigInt(firstLive.id)) {
      return false;
    }
    return messages.length >= MAX_HISTORY_LIMIT ||
      new TextEncoder().encode(JSON.stringify(messages)).length >=
        MAX_PAGE_BYTES / 2;
  }

  #endSync(room: string): void {
    const held = this.#syncing.get(room);
    this.#syncing.delete(room);
    if (held !== undefined) this.#showMessages(room, held);
  }

  /** Shows the messages newer than the last one shown in their room. */
  #showMessages(room: string, messages: RoomMessage[]): void {
    this.#checkStartOver(room, messages);
    let last = this.#lastId.get(room);
    let seen = this.#seenTs.get(room);
    for (const message of messages) {
      const id = BigInt(message.id);
      if (last !== undefined && id <= last) continue;
      last = id;
      if (!this.#oldestId.has(room)) this.#oldestId.set(room, message.id);
      if (seen === undefined) this.#seenTs.set(room, seen = new Map());
      seen.set(message.id, message.ts);
      if (seen.size > SEEN_KEPT) seen.delete(seen.keys().next().value!);
      if (message.from.toLowerCase() === this.#me.toLowerCase()) {
        let own = this.#ownTs.get(room);
        if (own === undefined) this.#ownTs.set(room, own = new Map());
        own.set(message.id, message.ts);
        if (own.size > OWN_KEPT) own.delete(own.keys().next().value!);
      }
      this.#dayChange(message.ts, this.#shownDay);
      this.#print(renderRoomMessage(message, this.#messageView()), {
        bell: mentions(message.text, this.#me, message.from) &&
          isRecent(message.ts),
      });
    }
    this.#lastId.set(room, last ?? 0n);
  }

  /**
   * Whether `messages` show that the server's history of `room` started
   * over (an id already shown, with another `ts`). If so the user is told,
   * and what was shown of the room no longer counts: the ids come again.
   */
  #checkStartOver(room: string, messages: RoomMessage[]): boolean {
    const seen = this.#seenTs.get(room);
    if (seen === undefined) return false;
    const own = this.#ownTs.get(room);
    const last = this.#lastId.get(room);
    const oldest = seen.keys().next().value;
    const changed = last !== undefined && oldest !== undefined &&
      messages.some((m) => {
        const ts = seen.get(m.id) ?? own?.get(m.id);
        if (ts !== undefined) return ts !== m.ts;
        // Not remembered: new (above the last shown), or older than all
        // that is remembered, which a server only sends again after its
        // history started over (ids below the remembered ones come back).
        const id = BigInt(m.id);
        return id <= last && id < BigInt(oldest);
      });
    if (!changed) return false;
    this.#lastId.delete(room);
    this.#oldestId.delete(room);
    this.#gapTold.delete(room);
    this.#seenTs.delete(room);
    this.#ownTs.delete(room);
    this.#print(status(
      `the server's history of #${room} has started over: messages shown before are no longer there`,
      this.#view(),
    ));
    return true;
  }

  // --- lines ----------------------------------------------------------------

  async #readLines(): Promise<void> {
    // Lines typed before the first welcome wait for it, in order.
    await this.#firstWelcome.promise;
    const signal = this.#readAbort.signal;
    for (;;) {
      let line: string | null;
      try {
        line = await this.#lines().readLine({
          history: true,
          prompt: this.#prompt(),
          transient: true,
          signal,
        });
      } catch (err) {
        if (this.#ending) return;
        if (err instanceof Interrupted) return this.#interrupted();
        throw err;
      }
      if (this.#ending) return;
      if (line === null) return void this.#quit();
      this.handleLine(line);
      if (this.#ending || this.#quitting) return;
    }
  }

  #command(text: string): void {
    const [name = "", ...args] = text.split(/\s+/);
    const view = this.#view();
    const current = this.#currentRoom();
    switch (name.toLowerCase()) {
      case "/help":
        for (const line of CHAT_HELP) this.#print(status(line, view));
        return;
      case "/quit":
      case "/exit":
        // "/quit now" may be a message typed after a stray slash: ask.
        if (args.length !== 0) {
          return this.#hint(`usage: ${name.toLowerCase()}`);
        }
        return void this.#quit();
      case "/join": {
        const room = typedRoom(args[0]);
        if (args.length !== 1 || room === undefined) {
          return this.#hint(
            "usage: /join ROOM (1 to 32 characters of a-z, 0-9, _ and -)",
          );
        }
        this.#rooms = this.#rooms.filter((r) => r !== room).concat(room);
        this.#updatePrompt();
        this.#enqueue({ type: "join", room }, current);
        if (!this.#ready) {
          this.#print(status(`will join #${room} when reconnected`, view));
        }
        return;
      }
      case "/leave": {
        const room = args[0] === undefined ? current : typedRoom(args[0]);
        if (args.length > 1 || room === undefined) {
          return this.#hint("usage: /leave [ROOM]");
        }
        if (!this.#rooms.includes(room)) {
          return this.#hint(`you are not in #${room}`);
        }
        this.#rooms = this.#rooms.filter((r) => r !== room);
        this.#updatePrompt();
        this.#enqueue({ type: "leave", room }, current);
        if (!this.#ready) {
          // Said now; the server's answer after the reconnect is not.
          this.#offlineLeaves.add(room);
          this.#print(status(`left #${room}`, view));
        }
        return;
      }
      case "/rooms":
        if (args.length !== 0) return this.#hint("usage: /rooms");
        if (!this.#enqueue({ type: "rooms" })) return this.#offline();
        return;
      case "/who": {
        const room = args[0] === undefined ? current : typedRoom(args[0]);
        if (args.length > 1 || (args[0] !== undefined && room === undefined)) {
          return this.#hint("usage: /who [ROOM]");
        }
        if (room === undefined) {
          return this.#hint("you are in no room: /join one first");
        }
        if (!this.#enqueue({ type: "who", room })) return this.#offline();
        return;
      }
      case "/msg": {
        const match = /^\/msg\s+(\S+)\s+(.+)$/is.exec(text);
        const to = match?.[1];
        const body = match?.[2]?.trim();
        if (to === undefined || body === undefined || !isUsername(to)) {
          return this.#hint("usage: /msg USER TEXT");
        }
        if (!this.#checkLength(body)) return;
        this.#enqueue({ type: "dm", to, text: body });
        if (!this.#ready) {
          this.#print(status(`will send it to ${to} when reconnected`, view));
        }
        return;
      }
      case "/history": {
        const n = args[0] === undefined
          ? DEFAULT_HISTORY_PAGE
          : Number(args[0]);
        if (
          args.length > 1 || !Number.isInteger(n) || n < 1 ||
          n > MAX_HISTORY_LIMIT
        ) {
          return this.#hint(
            `usage: /history [N] (N from 1 to ${MAX_HISTORY_LIMIT})`,
          );
        }
        if (current === undefined) {
          return this.#hint("you are in no room: /join one first");
        }
        // Where the page starts is decided when it is sent (an earlier
        // page may still be on its way).
        const page: ClientFrame = { type: "history", room: current, limit: n };
        this.#olderPages.add(page);
        if (!this.#enqueue(page)) return this.#offline();
        return;
      }
      default:
        return this.#hint(
          `unknown command ${name}: type /help for the commands (//text sends /text)`,
        );
    }
  }

  #say(text: string): void {
    const room = this.#currentRoom();
    if (room === undefined) {
      return this.#hint("you are in no room: /join one first");
    }
    if (!this.#checkLength(text)) return;
    const clientId = crypto.randomUUID();
    this.#pending.set(clientId, { room, text });
    this.#updatePending();
    // Offline, it goes out after the reconnect, with every other pending one.
    const frame: ClientFrame = {
      type: "message",
      text,
      room,
      client_id: clientId,
    };
    this.#enqueue(frame);
    if (!this.#ready) this.#showPendingAsPending();
  }

  /**
   * Sends from the outbox, in order, while fewer than the window wait for
   * their answer and no `retry_after_ms` runs; while paced, one at a time,
   * one per `#paceMs`.
   */
  #pump(): void {
    if (!this.#ready || this.#holdTimer !== undefined) return;
    if (this.#requeue.length > 0) {
      // The frames refused for the rate go again first, in the order sent,
      // once every answer to what was in flight with them is in.
      if (this.#asked.length > 0) return;
      this.#outbox.unshift(...this.#requeue);
      this.#requeue = [];
    }
    const window = this.#paced ? 1 : SEND_WINDOW;
    while (this.#outbox.length > 0 && this.#asked.length < window) {
      // Messages and commands are not in flight together: a message refused
      // for its rate goes again later, and must not land after a `/leave`
      // of its room typed after it (nor a command's answer after later lines).
      const kind = saying(this.#outbox[0]!);
      if (this.#asked.some((f) => saying(f) !== kind)) return;
      if (
        carriesPage(this.#outbox[0]!) &&
        this.#asked.filter(carriesPage).length >= PAGE_WINDOW
      ) return;
      const frame = this.#outbox.shift()!;
      // A message confirmed meanwhile (an echo to an earlier send) is done.
      if (frame.type === "message" && !this.#pending.has(frame.client_id!)) {
        continue;
      }
      if (frame.type === "history" && this.#olderPages.has(frame)) {
        // One page of a room at a time: the next starts where it ends. A
        // join's answer brings the room's recent messages: the page starts
        // before those.
        const room = frame.room;
        if (
          this.#asked.some((f) =>
            (f.type === "join" || f.type === "history") && f.room === room &&
            (f.type === "join" || this.#olderPages.has(f))
          )
        ) {
          this.#outbox.unshift(frame);
          return;
        }
        const before = this.#oldestId.get(room ?? "");
        if (before !== undefined) frame.before = before;
      }
      if (!this.#send(frame)) {
        this.#outbox.unshift(frame);
        return;
      }
      if (this.#paced) return this.#hold(this.#paceMs);
    }
    if (this.#paced && this.#outbox.length === 0 && this.#asked.length === 0) {
      this.#paced = false;
      this.#paceMs = 0;
    }
  }

  /**
   * The server refused a frame for its rate: nothing more goes out until the
   * wait it named is over; then the refused frames go first, and the rest
   * follows one at a time.
   */
  #holdSending(retryAfterMs: number): void {
    this.#paced = true;
    // The longest wait the server named (a first one may be the rest of a
    // period), a little over, so that the next frame is not early.
    const wait = retryAfterMs * 1.1;
    this.#paceMs = Math.max(this.#paceMs, wait);
    this.#hold(wait);
  }

  #hold(ms: number): void {
    clearTimeout(this.#holdTimer);
    this.#holdTimer = setTimeout(() => {
      this.#holdTimer = undefined;
      this.#pump();
    }, ms);
  }

  #checkLength(text: string): boolean {
    if ([...text].length <= MAX_TEXT_CHARS) return true;
    this.#hint(
      `message too long (${
        [...text].length
      } characters, at most ${MAX_TEXT_CHARS}): not sent`,
    );
    return false;
  }

  async #quit(): Promise<void> {
    if (this.#ending || this.#quitting) return;
    this.#quitting = true;
    // A connection's frames are answered in order, so once a ping's pong is
    // in, so is every answer and echo to what was typed before: scripted
    // input that ends right after `/who` still gets its answer shown. A
    // socket still opening gets its welcome first (waiting messages go then).
    const grace = this.#opts.quitGraceMs;
    const waiting = () =>
      this.#outbox.length + this.#requeue.length + this.#asked.length;
    // A drop on the way gives the reconnect its grace again (a few times).
    for (let attempt = 0; attempt < 3 && !this.#ending; attempt++) {
      // Reconnecting, or still opening: the welcome gets the grace to come.
      if (!this.#ready) {
        await this.#until(() => this.#ready, Date.now() + grace);
        if (!this.#ready) break;
      }
      // What still waits behind the window or a rate limit goes out as
      // answers come back: wait as long as they keep coming (a refusal for
      // the rate counts: what it refused goes again once the wait is over).
      while (this.#ready && waiting() > 0) {
        const seen = this.#answers;
        await this.#until(
          () => this.#answers !== seen || waiting() === 0 || !this.#ready,
          Date.now() + grace + (this.#paced ? this.#paceMs : 0),
        );
        if (this.#answers === seen) break;
      }
      if (!this.#ready) continue;
      const ping: ClientFrame = { type: "ping" };
      if (this.#send(ping)) {
        await this.#until(
          () => !this.#asked.includes(ping),
          Date.now() + grace,
        );
      }
      if (this.#ready) break;
    }
    // Ends the program from the menu's chat too: going back to the menu
    // would drop what is unconfirmed without the exit code saying so.
    this.#finish(this.#unconfirmed({ endsProgram: true }) ?? "quit");
  }

  /**
   * Leaving with something unconfirmed is a failure a script must see: one
   * line on stderr and exit 1 (not 0). The error to end with, if so.
   */
  #unconfirmed(options: { endsProgram?: boolean } = {}): CliError | undefined {
    const dms = [...this.#outbox, ...this.#requeue, ...this.#asked]
      .filter((f) => f.type === "dm").length;
    const lost = [
      ...(this.#pending.size > 0 ? [`${this.#pending.size} message(s)`] : []),
      ...(dms > 0 ? [`${dms} direct message(s)`] : []),
    ];
    if (lost.length === 0) return undefined;
    // Their text first, in the order typed: the pending rows are erased.
    const texts = unconfirmedTexts(
      [...this.#requeue, ...this.#asked, ...this.#outbox],
      this.#pending,
    );
    return new CliError(
      `${lost.join(" and ")} not confirmed by the server`,
      EXIT_ERROR,
      { ...options, details: texts.map((t) => `not confirmed: ${t}`) },
    );
  }

  /** Waits until `done()` holds (checked at every wake-up) or the deadline. */
  async #until(done: () => boolean, deadline: number): Promise<void> {
    while (!done() && !this.#ending) {
      const left = deadline - Date.now();
      if (left <= 0) return;
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#wake = resolve;
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
      this.#wake = null;
    }
  }

  // --- view -----------------------------------------------------------------

  #currentRoom(): string | undefined {
    return this.#rooms.at(-1);
  }

  #view(): ViewOptions {
    return {
      color: this.#opts.color,
      currentRoom: this.#currentRoom(),
      me: this.#me,
    };
  }

  /**
   * The view for room messages: what arrives now comes before the oldest
   * line still unanswered took effect, so `#room` is left out for the room
   * current when that line was typed (with lines typed ahead, the echo of a
   * line comes before the answer to a `/leave` typed after it); with none,
   * for the current room.
   */
  #messageView(): ViewOptions {
    const view = this.#view();
    for (const frames of [this.#requeue, this.#asked, this.#outbox]) {
      for (const frame of frames) {
        if (this.#typedIn.has(frame)) {
          return { ...view, currentRoom: this.#typedIn.get(frame) };
        }
      }
    }
    return view;
  }

  #prompt(): string {
    const room = this.#currentRoom();
    const where = room === undefined ? "(no room)" : `#${room}`;
    return this.#ready ? `${where}> ` : `(offline) ${where}> `;
  }

  #updatePrompt(): void {
    this.#lines().setPrompt(this.#prompt());
    // The current room may have changed: the pending rows' #room marks with it.
    if (this.#pending.size > 0) this.#updatePending();
  }

  #updatePending(): void {
    const view = this.#view();
    this.#lines().setFooter(
      [...this.#pending.values()].map((m) =>
        renderPending(m.room, m.text, view)
      ),
    );
  }

  /** Without a terminal footer, pending messages are listed once as lines. */
  #showPendingAsPending(): void {
    if (this.#lines().showsFooter) return;
    for (const [clientId, message] of this.#pending) {
      if (this.#pendingShown.has(clientId)) continue;
      this.#pendingShown.add(clientId);
      this.#print(renderPending(message.room, message.text, this.#view()));
    }
  }

  #offline(): void {
    this.#hint("not connected: try again once reconnected");
  }

  #hint(text: string): void {
    this.#print(hint(text, this.#view()));
  }

  /**
   * `* Fri 27 Nov 2026` before a message of another day than the one shown
   * before it (`days.last`), so that `[HH:MM]` is not taken for today's.
   */
  #dayChange(ts: string, days: { last: string | undefined }): void {
    const day = formatDay(ts);
    if (day === undefined || day === days.last) return;
    days.last = day;
    this.#print(status(day, this.#view()));
  }

  #print(line: string, options: { bell?: boolean } = {}): void {
    this.#lines().print(line, options);
  }

  #lines(): LineReader {
    return this.#opts.lines;
  }
}

/**
 * Whether a message is news (a minute old at most): what is shown again from
 * history at a login or a join does not ring the bell.
 */
function isRecent(ts: string): boolean {
  return Date.now() - Date.parse(ts) < 60_000;
}
