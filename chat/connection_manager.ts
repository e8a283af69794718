/**
 * The ConnectionManager keeps the live WebSocket connections, the rooms and
 * presence, and carries messages between them.
 *
 * Outgoing frames are queued per connection and written together at the end
 * of the event-loop turn, newline-separated in one WebSocket frame (the
 * contract allows it): one system call per recipient per burst instead of
 * per message; presence may wait a little longer to be batched.
 * Every frame is serialised once per message, never once per recipient.
 *
 * @module
 */
import type { TokenCheck, TokenValidator } from "./auth_client.ts";
import { AuthUnavailableError } from "./auth_client.ts";
import { type HistoryStore, HistoryWriteError } from "./history.ts";
import {
  type ClientFrame,
  CloseCode,
  type ErrorCode,
  FrameError,
  LARGE_ANSWER_FRAMES,
  LOBBY,
  MAX_FRAME_BYTES,
  parseClientFrameText,
  type ServerFrame,
} from "./protocol.ts";
import { TokenBucket } from "./token_bucket.ts";
import { tokenHash } from "../token_hash.ts";
import { setImmediate } from "node:timers";

/** A connection's queue at this size is written at once, not at the next flush. */
const WRITE_NOW_BYTES = 64 * 1024;
/**
 * The wait named to a sender whose message could not be stored (a full
 * disk): the history tries its files again every second.
 */
const STORAGE_RETRY_MS = 1000;

/** Limits of the chat server; every one is configurable. */
export interface ChatLimits {
  /** Messages and DMs a user may send in a burst, across all connections. */
  messageBurst: number;
  /** Sustained messages and DMs per second per user. */
  messagesPerSecond: number;
  /** Frames of any kind a connection may send in a burst. */
  frameBurst: number;
  /** Sustained frames of any kind per second per connection. */
  framesPerSecond: number;
  /** Frames sent before the wait a `rate_limited` named, tolerated in a burst before the connection is closed with 1008. */
  floodStrikes: number;
  /** How fast those strikes are forgiven, per second. */
  floodStrikesPerSecond: number;
  /** Open connections per user. */
  maxConnectionsPerUser: number;
  /** Open (and pending) connections per client address. */
  maxConnectionsPerAddress: number;
  /** Open connections in all. */
  maxConnections: number;
  /**
   * Connection attempts per client address in a burst (those refused by
   * the address or server-wide cap not counted; the per-user cap comes
   * after the token check, so those are): each one that passes the caps
   * costs a token check and a `welcome` with recent history, so closing and
   * opening again as fast as possible must not be free.
   */
  connectBurst: number;
  /** How fast those come back, per second. */
  connectsPerSecond: number;
  /** Rooms one connection may be in at once. */
  maxRoomsPerConnection: number;
  /**
   * Rooms that may exist (with members or history): a `join` that would
   * create one more gets `too_many_rooms`. Every room's recent history is
   * kept in memory, so their number must not grow without bound.
   */
  maxRooms: number;
  /** Unsent bytes (ours plus the runtime's) before a slow reader is closed with 1013. */
  maxBufferedBytes: number;
  /**
   * Size of answers (`joined`, `who`, `rooms`, `history`) per user in a
   * burst, in UTF-16 units (bytes, for ASCII): a request for one waits
   * (`rate_limited`) while the user's answers have used more. A 20-byte
   * request can ask for half a megabyte (a page of history, the room list
   * of a busy server).
   */
  answerBurstBytes: number;
  /** How fast that budget comes back, per second. */
  answerBytesPerSecond: number;
  /** How often open sessions are re-checked with the auth server. */
  recheckIntervalMs: number;
  /**
   * How often instead, for a session confirmed while the auth server's
   * session events are watched (see `chat/session_watch.ts`): its early
   * end would have been told at once, so this is a safety net only.
   */
  watchedRecheckIntervalMs: number;
  /** How long an upgraded socket may take to open before its place is given back. */
  handshakeTimeoutMs: number;
  /**
   * How long outgoing frames wait to be coalesced. 0 (the default) writes at
   * the end of the event-loop turn: what arrived together leaves together,
   * with no delay added, and batches grow by themselves under load.
   */
  coalesceMs: number;
  /**
   * How long presence frames alone may wait (anything else sent to the
   * connection takes them along, in order): a storm of arrivals costs one
   * write per member per this period, not one per `coalesceMs`.
   */
  presenceCoalesceMs: number;
  /** How long a `client_id` is remembered for exactly-once sending. */
  dedupWindowMs: number;
}

/** Defaults of {@linkcode ChatLimits}. */
export const DEFAULT_CHAT_LIMITS: ChatLimits = {
  messageBurst: 10,
  messagesPerSecond: 2,
  frameBurst: 60,
  framesPerSecond: 20,
  floodStrikes: 30,
  floodStrikesPerSecond: 1,
  maxConnectionsPerUser: 16,
  maxConnectionsPerAddress: 128,
  maxConnections: 20_000,
  connectBurst: 256,
  connectsPerSecond: 32,
  maxRoomsPerConnection: 64,
  maxRooms: 10_000,
  maxBufferedBytes: 1024 * 1024,
  answerBurstBytes: 16 * 1024 * 1024,
  answerBytesPerSecond: 2 * 1024 * 1024,
  recheckIntervalMs: 30_000,
  watchedRecheckIntervalMs: 10 * 60_000,
  handshakeTimeoutMs: 10_000,
  coalesceMs: 0,
  presenceCoalesceMs: 50,
  dedupWindowMs: 10 * 60_000,
};

/** Options of {@linkcode ConnectionManager}. */
export interface ConnectionManagerOptions {
  history: HistoryStore;
  /** Checks a token with the auth server (for the periodic re-check). */
  validateToken: TokenValidator;
  /** False lifts message rates, flood closes and connection caps. Default true. */
  rateLimits?: boolean;
  limits?: Partial<ChatLimits>;
  log?: (line: string) => void;
  now?: () => number;
}

/** A validated session that is about to become a connection. */
export interface SessionInfo {
  username: string;
  token: string;
  expiresAt: number;
  address: string;
  /**
   * `performance.now()` when the request that confirmed the token was sent
   * (see `TokenCheck`); unknown counts as before any watch.
   */
  askedAt?: number;
}

interface User {
  name: string;
  conns: Set<Conn>;
  /** Upgraded connections not open yet: they count against the cap too. */
  pending: number;
  /**
   * Connections the server closed whose socket is not gone yet (a peer that
   * does not read holds it, and what the runtime buffered for it, for as
   * long as it likes): they count against the caps too.
   */
  lingering: number;
  /**
   * Its message rate, made at its first message (see `#bucketOf`): most
   * users of a large room never send, and a bucket made later is the same
   * full bucket one made at the start would be by then.
   */
  bucket: TokenBucket | undefined;
  /**
   * Bytes of large answers (see {@linkcode ChatLimits.answerBurstBytes}),
   * made at its first large request, like `bucket`.
   */
  answers: TokenBucket | undefined;
  /**
   * client_id → the echo line of the message it sent, with when it was sent
   * (made at its first message with a client_id).
   */
  sent: Map<string, { line: string; at: number }> | undefined;
  lastSeen: number;
}

/** How often addresses with a full connection-attempt bucket are forgotten. */
const CONNECT_SWEEP_MS = 60_000;
/** Most addresses whose connection attempts are counted at once. */
const MAX_CONNECT_ADDRESSES = 100_000;

interface Conn {
  id: number;
  socket: WebSocket;
  user: User;
  token: string;
  address: string;
  /** Rooms in join order; the last is the current room. */
  rooms: Set<string>;
  /**
   * The first line waiting for the next flush ("" when none). Most flushes
   * carry one line: it needs no array, so a broadcast allocates nothing per
   * recipient.
   */
  first: string;
  /** The lines after `first`, when more than one waits. */
  rest: string[] | undefined;
  outboxBytes: number;
  /** Which flush list holds it: none, the presence one, or the prompt one. */
  queued: "none" | "presence" | "prompt";
  /**
   * Its place in the manager's per-connection arrays (the bound of what the
   * runtime holds unsent, and whether a room batch must pass through its own
   * queue): -1 until it opens and after it is dropped.
   */
  slot: number;
  /**
   * How many lines of the room batch of generation `takenGen` it has
   * already had (queued as its own, or not meant for it: it joined after).
   */
  taken: number;
  takenGen: number;
  open: boolean;
  /** Closed by the server, its socket not gone yet (see `User.lingering`). */
  lingering: boolean;
  /** Its frame rate and flood strikes, made when first needed (as `User.bucket`). */
  frames: TokenBucket | undefined;
  strikes: TokenBucket | undefined;
  /** Until when the last `rate_limited` told this connection to wait (ms). */
  retryAt: number;
}

interface Room {
  name: string;
  conns: Set<Conn>;
  /** Connections each user has in the room: presence changes at 0 ↔ 1. */
  members: Map<User, number>;
  /** The members' names, kept sorted as users arrive and leave. */
  names: string[];
  /** JSON of `names`; dropped when a user arrives or leaves. */
  usersJson: string | undefined;
  /**
   * The connections of `conns` again, with their sockets and slots, side by
   * side in arrays: a room's broadcast reads these dense arrays rather than
   * one object per member (see `ConnectionManager.#flushBatch`).
   */
  list: Conn[];
  sockets: WebSocket[];
  slots: number[];
}

/**
 * A list of connections emptied after every flush without giving its storage
 * back: a plain array set to length 0 is trimmed, and regrowing it to a
 * room's size made every broadcast to 1000 members allocate about 26 KB.
 */
interface ConnList {
  items: (Conn | undefined)[];
  size: number;
}

interface TokenEntry {
  conns: Set<Conn>;
  expiresAt: number;
  /** When the auth server last said the session is valid (or could not say). */
  checkedAt: number;
  /**
   * `performance.now()` when that confirmation was asked for: from a time
   * the session events were watched, an early end would have been told.
   */
  askedAt: number;
  /** The token's SHA-256 (hex), as session events name it. */
  hash: string;
}

/** Re-check ticks per `recheckIntervalMs`: the auth calls are spread over them. */
const RECHECK_TICKS = 30;
/** When the auth server could not answer a re-check, ask again after this long. */
const RECHECK_RETRY_MS = 5000;
/**
 * How long an ended session's token is kept to refuse upgrades still
 * opening, beyond the longest a handshake may take (`handshakeTimeoutMs`):
 * the check that let it through may have been answered just before the end.
 */
const ENDED_MEMORY_MS = 60_000;
/** Most hashes of ended sessions kept for upgrades still opening. */
const MAX_ENDED_HASHES = 100_000;

/** Live connections, rooms and presence. Call {@linkcode close} to shut down. */
export class ConnectionManager {
  #history: HistoryStore;
  #validateToken: TokenValidator;
  #rateLimits: boolean;
  #limits: ChatLimits;
  #log: (line: string) => void;
  #now: () => number;
  #users = new Map<string, User>();
  #rooms = new Map<string, Room>();
  /**
   * The connection whose large request is being answered, and the UTF-16
   * units queued for it meanwhile: what it is charged (presence the request
   * sends to others is not its answer).
   */
  #answering: Conn | undefined;
  #answerBytes = 0;
  /**
   * The `rooms` answer, serialised once per change of a room's user count
   * (a user's first connection in, last one out, which is also when a room
   * comes and goes; a room's first message does not change the list: its
   * sender is in it). With 10,000 rooms it takes 1.5 ms to build; asked for
   * 20 times a second on each of 128 connections, that was more than the
   * server's whole CPU.
   */
  #roomsJson: string | undefined;
  #tokens = new Map<string, TokenEntry>();
  /**
   * Tokens of sessions ended by {@linkcode ConnectionManager.endSessions},
   * with when: an upgrade validated just before still opens, and is closed.
   */
  #ended = new Map<string, number>();
  /** Token hash → token, of {@linkcode ConnectionManager.#tokens}. */
  #hashes = new Map<string, string>();
  /**
   * Hashes of ended sessions no open connection holds, with when: an
   * upgrade validated just before still opens, and is closed.
   */
  #endedHashes = new Map<string, number>();
  /**
   * `performance.now()` since when the auth server's session events are
   * watched without a break; `Infinity` while they are not.
   */
  #watchedSince = Infinity;
  #addresses = new Map<string, number>();
  /** Connection attempts per address (see `ChatLimits.connectBurst`). */
  #connects = new Map<string, TokenBucket>();
  #connectsSweptAt = 0;
  /** Open connections plus upgrades in progress: the sum of `#addresses`. */
  #reserved = 0;
  #conns = new Set<Conn>();
  /** Connections with frames to write at the next flush. */
  #dirty: ConnList = { items: [], size: 0 };
  /** Connections holding only presence frames, for the next presence flush. */
  #lazy: ConnList = { items: [], size: 0 };
  #lazyTimer: ReturnType<typeof setTimeout> | undefined;
  /** The lines and frame of the last multi-line write (see `#take`). */
  #lastFirst = "";
  #lastRest: string[] = [];
  #lastJoined = "";
  /** A flush is scheduled. */
  #flushPending = false;
  /**
   * Per connection slot: an upper bound of the bytes the runtime holds
   * unsent (its `bufferedAmount` when last read, plus what was handed to it
   * since), and whether a room batch must go through the connection's own
   * queue (it has lines queued, or had part of the batch).
   */
  #bounds = new Float64Array(256);
  #special = new Uint8Array(256);
  #freeSlots: number[] = [];
  #nextSlot = 0;
  /**
   * This turn's messages to one room, not yet queued per member: at the
   * flush, every member that needs nothing else gets them as one shared
   * frame, without a queue of its own (a broadcast costs no per-member work
   * before the write). A line for a member of the room from anything else
   * first queues the batch's lines it has not had, so each connection's
   * frames stay in order. `#batchOwn[k]` is the sender's own echo of line k
   * (with its `client_id`) when it differs.
   */
  #batchRoom: Room | undefined;
  #batchLines: string[] = [];
  #batchOwn: (string | undefined)[] = [];
  #batchFrom: User[] = [];
  #batchBytes = 0;
  #batchGen = 1;
  /** Queues past `WRITE_NOW_BYTES` wait (see `#writeLarge`). */
  #holdWrites = false;
  #recheckTimer: ReturnType<typeof setInterval>;
  #rechecking = false;
  #prunedAt = 0;
  /** At shutdown: the connections whose close handshake is awaited. */
  #awaitingClose: { conns: Set<Conn>; done: () => void } | undefined;
  #nextConnId = 1;
  /**
   * The last direct message's id: a number, like a room message's, from the
   * clock in microseconds, so that ids keep increasing across restarts.
   */
  #dmSeq = 0;
  #closing = false;

  /** Starts the manager and its session re-check timer. */
  constructor(options: ConnectionManagerOptions) {
    this.#history = options.history;
    this.#validateToken = options.validateToken;
    this.#rateLimits = options.rateLimits ?? true;
    this.#limits = { ...DEFAULT_CHAT_LIMITS, ...options.limits };
    this.#log = options.log ?? (() => {});
    this.#now = options.now ?? Date.now;
    // Exactly-once sending holds across a restart: the window's client_ids
    // come back from the history files.
    const now = this.#now();
    for (
      const sent of this.#history.sentSince(now - this.#limits.dedupWindowMs)
    ) {
      (this.#user(sent.from, now).sent ??= new Map()).set(sent.clientId, {
        line: sent.own,
        at: sent.at,
      });
    }
    this.#recheckTimer = setInterval(
      () => void this.#recheck(),
      Math.max(10, this.#limits.recheckIntervalMs / RECHECK_TICKS),
    );
  }

  /** Number of open connections. */
  get size(): number {
    return this.#conns.size;
  }

  /** Whether the manager is shutting down. */
  get closing(): boolean {
    return this.#closing;
  }

  /**
   * Counts a connection attempt from `address` against the caps. Returns
   * false when over a cap; otherwise the caller must either {@linkcode accept}
   * or {@linkcode releaseAddress}.
   */
  reserveAddress(address: string): boolean {
    const count = this.#addresses.get(address) ?? 0;
    if (
      this.#rateLimits &&
      (count >= this.#limits.maxConnectionsPerAddress ||
        this.#reserved >= this.#limits.maxConnections)
    ) {
      return false;
    }
    this.#addresses.set(address, count + 1);
    this.#reserved++;
    return true;
  }

  /**
   * Counts a connection attempt from `address` that passed the caps.
   * Returns 0 when it may go on, otherwise the milliseconds until one may.
   */
  connectWait(address: string): number {
    if (!this.#rateLimits) return 0;
    const now = this.#now();
    const buckets = this.#connects;
    // Addresses whose bucket is full again are forgotten (a new one starts
    // full); so many at once that memory would matter, the oldest too.
    if (
      now - this.#connectsSweptAt >= CONNECT_SWEEP_MS ||
      buckets.size > MAX_CONNECT_ADDRESSES
    ) {
      this.#connectsSweptAt = now;
      for (const [key, bucket] of buckets) {
        if (bucket.isFull(now)) buckets.delete(key);
      }
      // Down to nine tenths, so that the next new addresses do not each
      // pay for a pass over all of them.
      for (const key of buckets.keys()) {
        if (buckets.size <= MAX_CONNECT_ADDRESSES * 0.9) break;
        buckets.delete(key);
      }
    }
    let bucket = buckets.get(address);
    if (bucket === undefined) {
      bucket = new TokenBucket(
        this.#limits.connectBurst,
        this.#limits.connectsPerSecond,
        now,
      );
      buckets.set(address, bucket);
    }
    return bucket.take(now);
  }

  /** Gives back a reservation that did not become a connection. */
  releaseAddress(address: string): void {
    const count = this.#addresses.get(address);
    if (count === undefined) return;
    this.#reserved--;
    if (count <= 1) this.#addresses.delete(address);
    else this.#addresses.set(address, count - 1);
  }

  /** Whether `username` already holds as many connections as allowed. */
  userAtCapacity(username: string): boolean {
    if (!this.#rateLimits) return false;
    const user = this.#users.get(username.toLowerCase());
    if (user === undefined) return false;
    return user.conns.size + user.pending + user.lingering >=
      this.#limits.maxConnectionsPerUser;
  }

  /** Takes over an upgraded socket; its address reservation moves with it. */
  accept(socket: WebSocket, session: SessionInfo): void {
    const now = this.#now();
    const { expiresAt, askedAt = -Infinity } = session;
    const user = this.#user(session.username, now);
    const conn: Conn = {
      id: this.#nextConnId++,
      socket,
      user,
      token: session.token,
      address: session.address,
      rooms: new Set(),
      first: "",
      rest: undefined,
      outboxBytes: 0,
      queued: "none",
      slot: -1,
      taken: 0,
      takenGen: 0,
      open: false,
      lingering: false,
      frames: undefined,
      strikes: undefined,
      retryAt: 0,
    };
    let settled = false;
    user.pending++;
    // A client that leaves before the handshake completes leaves a socket
    // that never opens nor closes: give its places back after a while.
    const giveUp = () => {
      settled = true;
      user.pending--;
      this.releaseAddress(conn.address);
    };
    // Let go of at the open: a pending timer and what it holds are per
    // connection, for the connection's whole life.
    let deadline: ReturnType<typeof setTimeout> | undefined = setTimeout(() => {
      if (settled) return;
      giveUp();
      try {
        socket.close();
      } catch {
        // Not open: nothing to close.
      }
    }, this.#limits.handshakeTimeoutMs);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => {
      clearTimeout(deadline);
      deadline = undefined;
      if (settled) {
        // Opened after the deadline: its places are gone.
        socket.close(CloseCode.tryAgainLater, "handshake too slow");
        return;
      }
      if (this.#closing) {
        giveUp();
        // Its close handshake is waited for like the others'.
        this.#awaitingClose?.conns.add(conn);
        socket.close(CloseCode.goingAway, "server shutting down");
        return;
      }
      if (
        this.#ended.has(conn.token) ||
        (this.#endedHashes.size > 0 &&
          this.#endedHashes.has(
            this.#tokens.get(conn.token)?.hash ?? tokenHash(conn.token),
          ))
      ) {
        giveUp();
        socket.close(CloseCode.policy, "session ended");
        return;
      }
      settled = true;
      user.pending--;
      this.#register(conn, expiresAt, askedAt);
    };
    socket.onmessage = (event) => this.#onFrame(conn, event.data);
    socket.onclose = () => {
      const waiting = this.#awaitingClose;
      if (waiting?.conns.delete(conn) && waiting.conns.size === 0) {
        waiting.done();
      }
      clearTimeout(deadline);
      if (!settled) {
        giveUp();
        return;
      }
      this.#drop(conn);
      if (conn.lingering) {
        conn.lingering = false;
        conn.user.lingering--;
        this.releaseAddress(conn.address);
      }
    };
    socket.onerror = ignore;
  }

  /**
   * The session of `token` is over (told by the auth server): its
   * connections close with 1008 now, and so does one still opening.
   */
  #endToken(token: string): void {
    this.#ended.set(token, this.#now());
    const entry = this.#tokens.get(token);
    if (entry !== undefined) this.#endSession(entry, "session ended");
  }

  /**
   * Sessions ended at the auth server (told by its session events, as
   * SHA-256 hashes of their tokens): their connections close with 1008 now,
   * and so does one still opening.
   */
  endSessions(tokenHashes: string[]): void {
    const now = this.#now();
    for (const hash of tokenHashes) {
      const token = this.#hashes.get(hash);
      if (token !== undefined) {
        this.#endToken(token);
        continue;
      }
      // Bounded: past the cap the oldest go (an upgrade opening for that
      // long is refused by the handshake deadline anyway).
      this.#endedHashes.delete(hash);
      this.#endedHashes.set(hash, now);
      if (this.#endedHashes.size > MAX_ENDED_HASHES) {
        for (const old of this.#endedHashes.keys()) {
          this.#endedHashes.delete(old);
          break;
        }
      }
    }
  }

  /**
   * Whether the auth server's session events are watched: since when
   * (`performance.now()`), or `Infinity` when not (see `chat/session_watch.ts`).
   */
  setWatchedSince(since: number): void {
    this.#watchedSince = since;
  }

  /**
   * Closes every connection with 1001 after sending what is queued, and waits
   * (at most `timeoutMs`) for the close handshakes.
   */
  async close(timeoutMs = 2000): Promise<void> {
    if (this.#closing) return;
    this.#closing = true;
    clearInterval(this.#recheckTimer);
    this.#flushPresence();
    this.#flush();
    const conns = [...this.#conns];
    const closed = new Promise<void>((done) => {
      this.#awaitingClose = { conns: new Set(conns), done };
      if (conns.length === 0) done();
    });
    for (const conn of conns) {
      this.#drop(conn, CloseCode.goingAway, "server shutting down");
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      closed,
      new Promise<void>((resolve) => timer = setTimeout(resolve, timeoutMs)),
    ]);
    clearTimeout(timer);
  }

  #user(username: string, now: number): User {
    const key = username.toLowerCase();
    let user = this.#users.get(key);
    if (user === undefined) {
      user = {
        name: username,
        conns: new Set(),
        pending: 0,
        lingering: 0,
        bucket: undefined,
        answers: undefined,
        sent: undefined,
        lastSeen: now,
      };
      this.#users.set(key, user);
    }
    return user;
  }

  #register(conn: Conn, expiresAt: number, askedAt: number): void {
    conn.open = true;
    conn.slot = this.#allocSlot();
    this.#conns.add(conn);
    conn.user.conns.add(conn);
    let entry = this.#tokens.get(conn.token);
    if (entry === undefined) {
      // The token was validated just before the upgrade.
      entry = {
        conns: new Set(),
        expiresAt,
        checkedAt: this.#now(),
        askedAt,
        hash: tokenHash(conn.token),
      };
      this.#tokens.set(conn.token, entry);
      this.#hashes.set(entry.hash, conn.token);
    }
    entry.conns.add(conn);
    const lobby = this.#enter(conn, LOBBY);
    // A welcome per connection: the users and history parts are serialised
    // once per change of the room, not once per connection.
    this.#send(
      conn,
      `{"type":"welcome","username":${
        JSON.stringify(conn.user.name)
      },"room":"${LOBBY}","rooms":["${LOBBY}"],"users":${
        usersJson(lobby)
      },"history":${this.#history.recentJson(LOBBY)}}`,
    );
    this.#announce(lobby, conn, "join");
    this.#log(
      `chat: connect user=${conn.user.name} addr=${conn.address} conn=${conn.id}`,
    );
  }

  /**
   * Removes a connection from every table at once (a peer that does not
   * read may never report its close), then closes the socket. Idempotent.
   */
  #drop(conn: Conn, code?: number, reason?: string): void {
    if (!conn.open) return;
    const batch = this.#batchRoom;
    // Its pending lines include the batch's (sent below, or dropped with it).
    if (batch !== undefined && batch.conns.has(conn)) this.#takeBatchHeld(conn);
    conn.open = false;
    const pending = this.#take(conn);
    this.#conns.delete(conn);
    conn.user.conns.delete(conn);
    conn.user.lastSeen = this.#now();
    const entry = this.#tokens.get(conn.token);
    entry?.conns.delete(conn);
    if (entry?.conns.size === 0) {
      this.#tokens.delete(conn.token);
      this.#hashes.delete(entry.hash);
    }
    if (code === undefined) this.releaseAddress(conn.address);
    else {
      // Closed by us: its places are given back when the socket is gone.
      conn.lingering = true;
      conn.user.lingering++;
    }
    for (const name of conn.rooms) {
      const room = this.#rooms.get(name);
      if (room !== undefined) this.#exit(conn, room);
    }
    conn.rooms.clear();
    if (conn.slot >= 0) this.#freeSlots.push(conn.slot);
    conn.slot = -1;
    if (code !== undefined) {
      const socket = conn.socket;
      try {
        // What was queued goes first (the warnings before a flood close),
        // unless the peer's backlog is the reason for closing.
        if (pending !== "" && code !== CloseCode.tryAgainLater) {
          socket.send(pending);
        }
      } catch {
        // Already closing.
      }
      // Closing from inside onmessage while more of the peer's frames wait
      // to be read loses the close frame in this runtime: close on the next turn.
      setTimeout(() => {
        try {
          socket.close(code, reason);
        } catch {
          // Already closing.
        }
      }, 0);
    }
    this.#log(
      `chat: disconnect user=${conn.user.name} conn=${conn.id}${
        code !== undefined ? ` code=${code}` : ""
      }`,
    );
  }

  #onFrame(conn: Conn, data: unknown): void {
    if (!conn.open) return;
    try {
      const size = typeof data === "string"
        ? utf8Length(data)
        : data instanceof ArrayBuffer
        ? data.byteLength
        : 0;
      if (size > MAX_FRAME_BYTES) {
        this.#drop(conn, CloseCode.tooBig, "frame too big");
        return;
      }
      // Every frame counts toward the frame rate, binary ones too: each gets
      // an answer, so they would otherwise be a flood nothing closes.
      const now = this.#now();
      if (this.#rateLimits) {
        const wait = (conn.frames ??= new TokenBucket(
          this.#limits.frameBurst,
          this.#limits.framesPerSecond,
          now,
        )).take(now);
        if (wait > 0) return this.#limited(conn, wait, now);
      }
      if (typeof data !== "string") {
        this.#sendError(conn, "invalid_frame", "Frames must be JSON text");
        return;
      }
      this.#handle(conn, parseClientFrameText(data), now);
    } catch (err) {
      if (err instanceof FrameError) {
        this.#sendError(conn, err.code, err.message);
        return;
      }
      this.#log(
        `chat: error handling a frame of ${conn.user.name}: ${
          err instanceof Error ? err.stack : err
        }`,
      );
      this.#sendError(conn, "server_error", "The server could not do that");
    }
  }

  #limited(conn: Conn, waitMs: number, now: number): void {
    // Only a frame sent before the wait named last time counts toward the
    // flood close: a client that waits as told is refused, never closed.
    const strikes = conn.strikes ??= new TokenBucket(
      this.#limits.floodStrikes,
      this.#limits.floodStrikesPerSecond,
      now,
    );
    if (now < conn.retryAt && strikes.take(now) > 0) {
      this.#drop(conn, CloseCode.policy, "flooding");
      return;
    }
    conn.retryAt = Math.max(conn.retryAt, now + waitMs);
    this.#refuse(conn, waitMs);
  }

  /** Says `rate_limited`, with how long to wait. */
  #refuse(conn: Conn, waitMs: number): void {
    this.#sendFrame(conn, {
      type: "error",
      error: "rate_limited",
      message: `Slow down: try again in ${Math.ceil(waitMs / 100) / 10} s`,
      retry_after_ms: waitMs,
    });
  }

  #handle(conn: Conn, frame: ClientFrame, now: number): void {
    if (this.#rateLimits && LARGE_ANSWER_FRAMES.has(frame.type)) {
      const answers = conn.user.answers ??= new TokenBucket(
        this.#limits.answerBurstBytes,
        this.#limits.answerBytesPerSecond,
        now,
      );
      const wait = answers.wait(now);
      // Refused, but not a flood strike: the budget is the user's, and
      // another of its connections may have used it up unknown to this one.
      if (wait > 0) return this.#refuse(conn, wait);
      this.#answering = conn;
      this.#answerBytes = 0;
      try {
        this.#answer(conn, frame, now);
      } finally {
        this.#answering = undefined;
        answers.spend(this.#answerBytes, now);
      }
      return;
    }
    this.#answer(conn, frame, now);
  }

  #answer(conn: Conn, frame: ClientFrame, now: number): void {
    switch (frame.type) {
      case "message":
        return this.#message(conn, frame, now);
      case "dm":
        return this.#directMessage(conn, frame.to, frame.text, now);
      case "join":
        return this.#join(conn, frame.room);
      case "leave":
        return this.#leave(conn, frame.room);
      case "who": {
        const room = this.#existingRoom(conn, frame.room);
        this.#send(
          conn,
          `{"type":"who","room":${JSON.stringify(room)},"users":${
            usersJson(this.#rooms.get(room))
          }}`,
        );
        return;
      }
      case "rooms":
        return this.#listRooms(conn);
      case "history": {
        const room = this.#existingRoom(conn, frame.room);
        const page = frame.after !== undefined
          ? this.#history.after(room, frame.after, frame.limit)
          : frame.before !== undefined
          ? this.#history.before(room, frame.before, frame.limit)
          : this.#history.recent(room, frame.limit);
        // The messages' JSON is the page's own: each serialised once.
        this.#send(
          conn,
          `{"type":"history","room":${
            JSON.stringify(room)
          },"messages":${page.json}${page.gap ? ',"gap":true' : ""}}`,
        );
        return;
      }
      case "ping":
        return this.#sendFrame(conn, { type: "pong" });
    }
  }

  #message(
    conn: Conn,
    frame: { text: string; room?: string; client_id?: string },
    now: number,
  ): void {
    const user = conn.user;
    const clientId = frame.client_id;
    if (clientId !== undefined) {
      const earlier = user.sent?.get(clientId);
      if (
        earlier !== undefined && now - earlier.at < this.#limits.dedupWindowMs
      ) {
        this.#send(conn, earlier.line);
        return;
      }
    }
    const roomName = frame.room ?? current(conn);
    if (roomName === undefined || !conn.rooms.has(roomName)) {
      throw new FrameError(
        "unknown_room",
        roomName === undefined
          ? "You are in no room: /join one first"
          : `You are not in #${roomName}`,
      );
    }
    if (this.#rateLimits) {
      const wait = this.#bucketOf(user, now).take(now);
      if (wait > 0) return this.#limited(conn, wait, now);
    }
    const room = this.#rooms.get(roomName)!;
    // The sender's echo (`own`) is the line plus its client_id.
    let stored;
    try {
      stored = this.#history.append(roomName, user.name, frame.text, clientId);
    } catch (err) {
      if (!(err instanceof HistoryWriteError)) throw err;
      // Not stored, so not sent to anyone: the sender tries again later.
      this.#sendFrame(conn, {
        type: "error",
        error: "storage_unavailable",
        message: err.message,
        retry_after_ms: STORAGE_RETRY_MS,
      });
      return;
    }
    const { line, own } = stored;
    if (clientId !== undefined) this.#remember(user, clientId, own, now);
    this.#broadcast(room, user, line, own);
  }

  /**
   * Batches a message line for every member of `room` (`own` for the
   * sender's connections), to be written at the flush (see `#batchRoom`).
   */
  #broadcast(room: Room, from: User, line: string, own: string): void {
    if (this.#batchRoom !== room) {
      // One room batches at a time: another's lines go to their members' queues.
      if (this.#batchRoom !== undefined) this.#queueBatch();
      this.#batchRoom = room;
    }
    this.#batchLines.push(line);
    this.#batchOwn.push(own === line ? undefined : own);
    this.#batchFrom.push(from);
    this.#batchBytes += line.length;
    if (own !== line) {
      for (const c of from.conns) if (room.conns.has(c)) this.#takeBatch(c);
    }
    this.#scheduleFlush();
    // A burst: write now rather than hold a large batch.
    if (this.#batchBytes >= WRITE_NOW_BYTES) this.#flushBatch();
  }

  /** Queues for `conn`, a member of the batching room, the lines it has not had. */
  #takeBatch(conn: Conn): void {
    this.#queueLines(
      conn,
      this.#batchGen,
      this.#batchLines,
      this.#batchOwn,
      this.#batchFrom,
    );
  }

  /**
   * {@linkcode #takeBatch} without writing a queue that grows past
   * `WRITE_NOW_BYTES` at once (a write may drop the connection, which must
   * not happen while it is being dropped or taken out of a room).
   */
  #takeBatchHeld(conn: Conn): void {
    const held = this.#holdWrites;
    this.#holdWrites = true;
    try {
      this.#takeBatch(conn);
    } finally {
      this.#holdWrites = held;
    }
  }

  #queueLines(
    conn: Conn,
    gen: number,
    lines: string[],
    owns: (string | undefined)[],
    froms: User[],
  ): void {
    let k = conn.takenGen === gen ? conn.taken : 0;
    conn.taken = lines.length;
    conn.takenGen = gen;
    if (!conn.open) return;
    this.#special[conn.slot] = 1;
    for (; k < lines.length && conn.open; k++) {
      const own = owns[k];
      this.#enqueue(
        conn,
        own !== undefined && froms[k] === conn.user ? own : lines[k]!,
        false,
      );
    }
  }

  /** Moves the batch into its members' own queues. */
  #queueBatch(): void {
    const members = [...this.#batchRoom!.list];
    for (const conn of members) this.#takeBatchHeld(conn);
    this.#endBatch();
    this.#writeLarge(members);
  }

  /**
   * Writes the queues that reached `WRITE_NOW_BYTES` while writes were held
   * (so that a connection dropped meanwhile, and the presence it sends to
   * others, comes after every member had its lines).
   */
  #writeLarge(conns: Conn[]): void {
    for (const conn of conns) this.#writeIfLarge(conn);
  }

  /** A burst: a queue at `WRITE_NOW_BYTES` is written now rather than held. */
  #writeIfLarge(conn: Conn): void {
    if (conn.open && conn.outboxBytes >= WRITE_NOW_BYTES) {
      this.#write(conn);
    }
  }

  #endBatch(): void {
    this.#batchRoom = undefined;
    this.#batchLines = [];
    this.#batchOwn = [];
    this.#batchFrom = [];
    this.#batchBytes = 0;
    this.#batchGen++;
  }

  /**
   * Writes the batch: one shared frame to each member that needs nothing
   * else (reading only the room's dense arrays and the slot arrays); the
   * others get its lines in their own queues, written by `#writeAll`.
   */
  #flushBatch(): void {
    const room = this.#batchRoom;
    if (room === undefined) return;
    const gen = this.#batchGen;
    const lines = this.#batchLines;
    const owns = this.#batchOwn;
    const froms = this.#batchFrom;
    // Whatever is sent from here on comes after the batch.
    this.#endBatch();
    const frame = lines.length === 1 ? lines[0]! : lines.join("\n");
    const { list, sockets, slots } = room;
    const bounds = this.#bounds;
    const special = this.#special;
    const max = this.#limits.maxBufferedBytes;
    const size = frame.length * 3;
    const own: Conn[] = [];
    const failed: Conn[] = [];
    for (let i = 0; i < list.length; i++) {
      const slot = slots[i]!;
      const bound = bounds[slot]!;
      // Its own queue first, or a backlog to ask the runtime about: `#write`.
      if (special[slot] !== 0 || bound > max) {
        own.push(list[i]!);
        continue;
      }
      bounds[slot] = bound + size;
      try {
        sockets[i]!.send(frame);
      } catch {
        failed.push(list[i]!);
      }
    }
    const held = this.#holdWrites;
    this.#holdWrites = true;
    try {
      for (const conn of own) this.#queueLines(conn, gen, lines, owns, froms);
    } finally {
      this.#holdWrites = held;
    }
    if (!held) this.#writeLarge(own);
    for (const conn of own) {
      if (conn.open && conn.first === "") special[conn.slot] = 0;
    }
    for (const conn of failed) this.#drop(conn);
  }

  #allocSlot(): number {
    const slot = this.#freeSlots.pop() ?? this.#nextSlot++;
    if (slot >= this.#bounds.length) {
      const bounds = new Float64Array(this.#bounds.length * 2);
      bounds.set(this.#bounds);
      this.#bounds = bounds;
      const special = new Uint8Array(this.#special.length * 2);
      special.set(this.#special);
      this.#special = special;
    }
    this.#bounds[slot] = 0;
    this.#special[slot] = 0;
    return slot;
  }

  #remember(user: User, clientId: string, line: string, now: number): void {
    const sent = user.sent ??= new Map();
    sent.delete(clientId);
    sent.set(clientId, { line, at: now });
    // Entries are in time order: forget those past the window, and bound the map.
    for (const [id, entry] of sent) {
      if (now - entry.at < this.#limits.dedupWindowMs && sent.size <= 50_000) {
        break;
      }
      sent.delete(id);
    }
  }

  /** The user's message rate (see `User.bucket`). */
  #bucketOf(user: User, now: number): TokenBucket {
    return user.bucket ??= new TokenBucket(
      this.#limits.messageBurst,
      this.#limits.messagesPerSecond,
      now,
    );
  }

  #directMessage(conn: Conn, to: string, text: string, now: number): void {
    const target = this.#users.get(to.toLowerCase());
    if (target === undefined || target.conns.size === 0) {
      throw new FrameError("unknown_user", `${to} is not connected`);
    }
    if (this.#rateLimits) {
      const wait = this.#bucketOf(conn.user, now).take(now);
      if (wait > 0) return this.#limited(conn, wait, now);
    }
    const line = JSON.stringify(
      {
        type: "dm",
        id: String(this.#dmSeq = Math.max(this.#dmSeq + 1, now * 1000)),
        from: conn.user.name,
        to: target.name,
        text,
        ts: new Date(now).toISOString(),
      } satisfies ServerFrame,
    );
    for (const c of target.conns) this.#send(c, line);
    if (target !== conn.user) {
      for (const c of conn.user.conns) this.#send(c, line);
    }
  }

  #join(conn: Conn, name: string): void {
    if (conn.rooms.has(name)) {
      // Re-joining makes it the current room again.
      conn.rooms.delete(name);
      conn.rooms.add(name);
    } else if (conn.rooms.size >= this.#limits.maxRoomsPerConnection) {
      throw new FrameError(
        "too_many_rooms",
        `Cannot join #${name}: a connection may be in at most ${this.#limits.maxRoomsPerConnection} rooms`,
      );
    }
    const fresh = !conn.rooms.has(name);
    if (
      fresh && this.#rateLimits && !this.#rooms.has(name) &&
      !this.#history.has(name) && this.#roomCount() >= this.#limits.maxRooms
    ) {
      throw new FrameError(
        "too_many_rooms",
        `Cannot create #${name}: the server has ${this.#limits.maxRooms} rooms, its most; join one that exists (/rooms)`,
      );
    }
    const room = fresh ? this.#enter(conn, name) : this.#rooms.get(name)!;
    this.#send(
      conn,
      `{"type":"joined","room":${JSON.stringify(name)},"users":${
        usersJson(room)
      },"history":${this.#history.recentJson(name)}}`,
    );
    if (fresh) this.#announce(room, conn, "join");
  }

  /** Rooms that exist: those with history, and those with members only. */
  #roomCount(): number {
    let count = this.#history.roomCount();
    for (const name of this.#rooms.keys()) {
      if (!this.#history.has(name)) count++;
    }
    return count;
  }

  #leave(conn: Conn, name: string): void {
    const room = this.#rooms.get(name);
    if (room !== undefined && conn.rooms.delete(name)) this.#exit(conn, room);
    this.#sendFrame(conn, { type: "left", room: name });
  }

  /** Adds the connection to a room (created if new); returns the room. */
  #enter(conn: Conn, name: string): Room {
    let room = this.#rooms.get(name);
    if (room === undefined) {
      room = {
        name,
        conns: new Set(),
        members: new Map(),
        names: [],
        usersJson: "[]",
        list: [],
        sockets: [],
        slots: [],
      };
      this.#rooms.set(name, room);
    }
    conn.rooms.add(name);
    room.conns.add(conn);
    room.list.push(conn);
    room.sockets.push(conn.socket);
    room.slots.push(conn.slot);
    if (room === this.#batchRoom) {
      // The lines batched before it came in are not for it.
      conn.taken = this.#batchLines.length;
      conn.takenGen = this.#batchGen;
      this.#special[conn.slot] = 1;
    }
    const count = room.members.get(conn.user) ?? 0;
    room.members.set(conn.user, count + 1);
    if (count === 0) {
      const name = conn.user.name;
      room.names.splice(sortedIndex(room.names, name), 0, name);
      room.usersJson = undefined;
      this.#roomsJson = undefined;
    }
    return room;
  }

  /** Sends a join presence frame if this is the user's first connection in the room. */
  #announce(room: Room, conn: Conn, type: "join"): void {
    if (room.members.get(conn.user) !== 1) return;
    const line = JSON.stringify(
      {
        type,
        room: room.name,
        user: conn.user.name,
        ts: new Date(this.#now()).toISOString(),
      } satisfies ServerFrame,
    );
    for (const c of room.conns) if (c !== conn) this.#send(c, line, true);
  }

  /** Removes the connection from a room; announces the user's last leave. */
  #exit(conn: Conn, room: Room): void {
    if (!room.conns.has(conn)) return;
    // The lines batched while it was in are its own.
    if (room === this.#batchRoom) this.#takeBatchHeld(conn);
    room.conns.delete(conn);
    const i = room.list.indexOf(conn);
    const last = room.list.length - 1;
    if (i !== last) {
      room.list[i] = room.list[last]!;
      room.sockets[i] = room.sockets[last]!;
      room.slots[i] = room.slots[last]!;
    }
    room.list.pop();
    room.sockets.pop();
    room.slots.pop();
    const left = (room.members.get(conn.user) ?? 1) - 1;
    if (left > 0) {
      room.members.set(conn.user, left);
      return;
    }
    room.members.delete(conn.user);
    room.names.splice(sortedIndex(room.names, conn.user.name), 1);
    room.usersJson = undefined;
    this.#roomsJson = undefined;
    if (room.conns.size === 0) {
      if (room.name !== LOBBY) this.#rooms.delete(room.name);
      return;
    }
    // At shutdown everyone leaves at once: presence would cost O(n²) for nothing.
    if (this.#closing) return;
    const line = JSON.stringify(
      {
        type: "leave",
        room: room.name,
        user: conn.user.name,
        ts: new Date(this.#now()).toISOString(),
      } satisfies ServerFrame,
    );
    for (const c of room.conns) this.#send(c, line, true);
  }

  /** The named room (or the current one) if it exists; else `unknown_room`. */
  #existingRoom(conn: Conn, name: string | undefined): string {
    const room = name ?? current(conn);
    if (room === undefined) {
      throw new FrameError("unknown_room", "You are in no room: name one");
    }
    if (
      room !== LOBBY && !this.#rooms.has(room) && !this.#history.has(room)
    ) {
      throw new FrameError("unknown_room", `There is no room #${room}`);
    }
    return room;
  }

  #listRooms(conn: Conn): void {
    this.#roomsJson ??= JSON.stringify(
      { type: "rooms", rooms: this.#roomList() } satisfies ServerFrame,
    );
    this.#send(conn, this.#roomsJson);
  }

  #roomList(): { name: string; users: number }[] {
    const names = new Set<string>([LOBBY]);
    for (const name of this.#rooms.keys()) names.add(name);
    for (const name of this.#history.roomNames()) names.add(name);
    return [...names].sort().map((name) => ({
      name,
      users: this.#rooms.get(name)?.members.size ?? 0,
    }));
  }

  #sendError(conn: Conn, error: ErrorCode, message: string): void {
    this.#sendFrame(conn, { type: "error", error, message });
  }

  #sendFrame(conn: Conn, frame: ServerFrame): void {
    this.#send(conn, JSON.stringify(frame));
  }

  /**
   * Queues one serialised frame for a connection; written at the next flush,
   * or, for a `lazy` frame (presence), at the next presence flush unless
   * something else is written to the connection first.
   */
  #send(conn: Conn, line: string, lazy = false): void {
    if (!conn.open) return;
    // The batch's lines come before this one.
    const batch = this.#batchRoom;
    if (batch !== undefined && batch.conns.has(conn)) {
      this.#takeBatch(conn);
      // Written at once and found too slow: dropped.
      if (!conn.open) return;
    }
    // Charged to the request being answered (not the room's messages before it).
    if (conn === this.#answering) this.#answerBytes += line.length;
    this.#enqueue(conn, line, lazy);
  }

  #enqueue(conn: Conn, line: string, lazy: boolean): void {
    this.#special[conn.slot] = 1;
    if (conn.first === "") conn.first = line;
    else if (conn.rest === undefined) conn.rest = [line];
    else conn.rest.push(line);
    conn.outboxBytes += line.length;
    if (!lazy) {
      if (conn.queued !== "prompt") {
        conn.queued = "prompt";
        pushConn(this.#dirty, conn);
        this.#scheduleFlush();
      }
    } else if (conn.queued === "none") {
      conn.queued = "presence";
      pushConn(this.#lazy, conn);
      this.#lazyTimer ??= setTimeout(
        this.#flushPresence,
        this.#limits.presenceCoalesceMs,
      );
    }
    if (!this.#holdWrites) this.#writeIfLarge(conn);
  }

  #scheduleFlush(): void {
    if (this.#flushPending) return;
    this.#flushPending = true;
    // setTimeout(0) waits a millisecond or more here; setImmediate runs once
    // this turn's I/O callbacks are done, which is the point.
    if (this.#limits.coalesceMs > 0) {
      setTimeout(this.#flush, this.#limits.coalesceMs);
    } else setImmediate(this.#flush);
  }

  /** Writes a connection's queue as one frame, or drops it if it is not keeping up. */
  #write(conn: Conn): void {
    if (!conn.open || conn.first === "") return;
    const data = this.#take(conn);
    conn.queued = "none";
    // What the runtime still holds unsent decides; one large answer (a long
    // history page) may pass, a reader that stopped cannot pile up more.
    // Reading it is a call into the runtime: only when the bound says the
    // limit could have been passed (a UTF-16 unit is at most 3 UTF-8 bytes).
    const slot = conn.slot;
    if (this.#bounds[slot]! > this.#limits.maxBufferedBytes) {
      const buffered = conn.socket.bufferedAmount;
      if (buffered > this.#limits.maxBufferedBytes) {
        this.#drop(conn, CloseCode.tryAgainLater, "too slow to keep up");
        return;
      }
      this.#bounds[slot] = buffered;
    }
    this.#bounds[slot]! += data.length * 3;
    try {
      conn.socket.send(data);
    } catch {
      this.#drop(conn);
    }
  }

  /**
   * Empties a connection's queue and returns its lines as one frame ("" if
   * none). The members of a room mostly hold the same lines in the same
   * order: the last joined frame is reused when the lines are the very same
   * strings, so a burst costs one join per room.
   */
  #take(conn: Conn): string {
    const { first, rest } = conn;
    conn.first = "";
    conn.rest = undefined;
    conn.outboxBytes = 0;
    if (conn.slot >= 0 && conn.takenGen !== this.#batchGen) {
      this.#special[conn.slot] = 0;
    }
    if (rest === undefined) return first;
    const last = this.#lastRest;
    if (first === this.#lastFirst && last.length === rest.length) {
      let same = true;
      for (let i = 0; i < rest.length && same; i++) same = rest[i] === last[i];
      if (same) return this.#lastJoined;
    }
    // `rest` is never reused once taken: it can be kept as it is.
    this.#lastFirst = first;
    this.#lastRest = rest;
    return this.#lastJoined = `${first}\n${rest.join("\n")}`;
  }

  #flush = (): void => {
    this.#flushBatch();
    this.#writeAll(this.#dirty);
    this.#flushPending = false;
  };

  #flushPresence = (): void => {
    this.#writeAll(this.#lazy);
    clearTimeout(this.#lazyTimer);
    this.#lazyTimer = undefined;
  };

  /** Writes every listed connection's queue (one already written is skipped). */
  #writeAll(list: ConnList): void {
    // Writes (and drops) below may queue more frames, presence for instance:
    // those land in this same pass, as the loop reads the growing list.
    const items = list.items;
    try {
      for (let i = 0; i < list.size; i++) {
        const conn = items[i];
        items[i] = undefined;
        if (conn !== undefined) this.#write(conn);
      }
    } finally {
      list.size = 0;
    }
    this.#lastFirst = "";
    this.#lastRest = [];
    this.#lastJoined = "";
  }

  /**
   * One tick of the session re-checks: sessions past their expiry close at
   * once; every session not confirmed for `recheckIntervalMs` is asked about
   * again, one auth call per distinct token, spread over the ticks (a crowd
   * that connected together is not re-checked in one burst), so a revoked
   * session closes within about 1.7 intervals.
   */
  async #recheck(): Promise<void> {
    if (this.#closing) return;
    const now = this.#now();
    const interval = this.#limits.recheckIntervalMs;
    if (now - this.#prunedAt >= interval) {
      this.#prunedAt = now;
      this.#forgetIdleUsers(now);
      const keep = this.#limits.handshakeTimeoutMs + ENDED_MEMORY_MS;
      for (const [token, at] of this.#ended) {
        if (now - at > keep) this.#ended.delete(token);
      }
      for (const [hash, at] of this.#endedHashes) {
        if (now - at <= keep) break;
        this.#endedHashes.delete(hash);
      }
    }
    // Oldest confirmation first (a confirmed token moves to the end); at most
    // a share of the tokens per tick, enough to catch up within 2/3 of an
    // interval. Expiry needs no auth call: it is checked on every tick.
    const share = this.#rechecking
      ? 0
      : Math.ceil(this.#tokens.size * 1.5 / RECHECK_TICKS);
    // A session confirmed while the events are watched (and ever since)
    // would have been told of: it waits the longer interval.
    const watchedSince = this.#watchedSince;
    const watched = this.#limits.watchedRecheckIntervalMs;
    const due: string[] = [];
    for (const [token, entry] of this.#tokens) {
      if (entry.expiresAt <= now) {
        this.#endSession(entry, "session expired");
      } else if (
        due.length < share &&
        now - entry.checkedAt >=
          (entry.askedAt >= watchedSince ? watched : interval)
      ) {
        due.push(token);
      }
    }
    if (due.length === 0) return;
    this.#rechecking = true;
    try {
      // Asked for together, they go to the auth server together: one
      // request per `MAX_BATCH_TOKENS` (see `createTokenValidator`).
      await Promise.all(due.map((token) => this.#recheckToken(token)));
    } finally {
      this.#rechecking = false;
    }
  }

  #forgetIdleUsers(now: number): void {
    for (const [key, user] of this.#users) {
      if (
        user.conns.size === 0 && user.pending === 0 && user.lingering === 0 &&
        now - user.lastSeen > this.#limits.dedupWindowMs
      ) {
        this.#users.delete(key);
      }
    }
  }

  async #recheckToken(token: string): Promise<void> {
    let check: TokenCheck | undefined;
    const askedAt = performance.now();
    try {
      check = await this.#validateToken(token, { background: true });
    } catch (err) {
      if (!(err instanceof AuthUnavailableError)) throw err;
    }
    const entry = this.#tokens.get(token);
    if (entry === undefined || this.#closing) return;
    if (check === undefined) {
      // Auth down: keep the connections (rather than dropping everyone) and
      // ask again soon, not a whole interval later.
      const interval = this.#limits.recheckIntervalMs;
      entry.checkedAt = this.#now() - interval +
        Math.min(RECHECK_RETRY_MS, interval);
      return;
    }
    if (!check.valid) {
      this.#endSession(entry, "session ended");
      return;
    }
    entry.expiresAt = check.expiresAt;
    entry.checkedAt = this.#now();
    // A check that joined one in flight was asked for when that one was.
    entry.askedAt = Math.min(askedAt, check.askedAt ?? Infinity);
    this.#tokens.delete(token);
    this.#tokens.set(token, entry);
  }

  /** Closes every connection of a session with 1008. */
  #endSession(entry: TokenEntry, reason: string): void {
    for (const conn of [...entry.conns]) {
      this.#drop(conn, CloseCode.policy, reason);
    }
  }
}

function ignore(): void {}

function pushConn(list: ConnList, conn: Conn): void {
  list.items[list.size++] = conn;
}

function current(conn: Conn): string | undefined {
  let last: string | undefined;
  for (const name of conn.rooms) last = name;
  return last;
}

/** JSON of a room's sorted user names, computed once per change. */
function usersJson(room: Room | undefined): string {
  if (room === undefined) return "[]";
  return room.usersJson ??= JSON.stringify(room.names);
}

/** Where `name` is or would go in the sorted `names` (binary search). */
function sortedIndex(names: string[], name: string): number {
  let lo = 0;
  let hi = names.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (names[mid]! < name) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** UTF-8 length of a string, computed only when it could matter. */
function utf8Length(text: string): number {
  if (text.length * 3 <= MAX_FRAME_BYTES) return text.length;
  if (text.length > MAX_FRAME_BYTES) return text.length;
  return new TextEncoder().encode(text).length;
}
