/**
 * Room history: the last messages of every room in memory, persisted as one
 * JSON Lines file a room under `DATA_DIR/history/` (`<room>.jsonl`, one
 * message frame a line, ids increasing; a line keeps its sender's
 * `client_id`, so that exactly-once sending holds across a restart, but no
 * message handed out by this module carries it).
 *
 * A message is handed to the OS (appended to its room's file, synchronously)
 * by {@linkcode HistoryStore.append}, before anyone can be sent it, and a
 * message that cannot be (a full disk) is refused, not kept in memory only.
 * So a message that was delivered survives the process being killed
 * (`kill -9`), its `client_id` with it. Reaching the
 * disk itself (`fdatasync`, what survives a power cut) is batched: at most
 * `flushIntervalMs` later, and at close. Files are compacted to the kept
 * tail at start-up and whenever they grow well past it.
 *
 * @module
 */
import { tryLockFile } from "../lock_file.ts";
import {
  DEFAULT_HISTORY_LIMIT,
  MAX_PAGE_BYTES,
  type RoomMessage,
} from "./protocol.ts";

/**
 * A message that could not be stored: its room's file cannot be written
 * (a full disk) or is waiting to be rewritten after such a failure. Nothing
 * of it was kept; the sender may try again.
 */
export class HistoryWriteError extends Error {
  override name = "HistoryWriteError";
  /** Builds the error for `room`, with the file system's reason if known. */
  constructor(room: string, reason: string | undefined) {
    super(
      `The server cannot store messages in #${room} right now${
        reason === undefined ? "" : ` (${reason})`
      }: try again later`,
    );
  }
}

/** Options of {@linkcode HistoryStore.open}. */
export interface HistoryOptions {
  /** Messages kept per room, in memory and on disk. Default 1000. */
  keep?: number;
  /**
   * Most bytes the kept messages of all rooms may hold together (estimated,
   * see {@linkcode messageBytes}): past it, the rooms holding the most lose
   * their oldest messages until all hold at most half of it. Default
   * {@linkcode DEFAULT_MAX_HISTORY_BYTES}.
   */
  maxBytes?: number;
  /**
   * How long a sender's `client_id` is remembered, across a restart too:
   * a message sent with one stays in the file that long, also past `keep`.
   * Default 10 minutes.
   */
  dedupWindowMs?: number;
  /** Longest time a written message waits for `fdatasync`. Default 1000 ms. */
  flushIntervalMs?: number;
  /** Clock in ms. Default `Date.now`. */
  now?: () => number;
  /** Where write failures are reported. */
  log?: (line: string) => void;
}

/** The answer to a history query. */
export interface HistoryPage {
  messages: RoomMessage[];
  /** `messages` as a JSON array (each message serialised once, to size the page too). */
  json: string;
  /** True when `after` reached back past what is still kept. */
  gap: boolean;
}

/** A message sent with a `client_id`: its sender's echo line, as stored. */
interface SentLine {
  from: string;
  clientId: string;
  own: string;
  at: number;
}

interface Room {
  name: string;
  /**
   * Kept messages, oldest first; trimmed to `keep` lazily, at most
   * {@linkcode trimSlack} past it (an eighth: a room's memory is what it
   * keeps, not twice that, and a trim still moves few messages per append).
   */
  messages: RoomMessage[];
  /**
   * Messages trimmed from `messages` that were sent with a `client_id`
   * within the exactly-once window, oldest first: they stay in the file (a
   * restart reads their `client_id`s back) but are no longer history.
   */
  sentTail: SentLine[];
  lastId: number;
  /** JSON lines not yet handed to the OS. */
  pending: string[];
  /** Lines in the file beyond the kept tail; compaction rewrites the file. */
  needsRewrite: boolean;
  /**
   * The file may end in part of a line (a failed write, a crash's torn
   * append): nothing is appended to it until a rewrite replaces it.
   */
  torn: boolean;
  /** A rewrite is under way: lines written meanwhile go to `late` too. */
  rewriting: boolean;
  /** Lines appended to the old file during a rewrite, for the new one. */
  late: string[];
  /** Lines handed to the OS since the last `fdatasync`. */
  unsynced: boolean;
  linesOnDisk: number;
  /** Why the last write of the room failed, until one succeeds (logged once). */
  writeError: string | undefined;
  /** JSON of the newest messages a `welcome` or `joined` carries; dropped on append. */
  recentJson: string | undefined;
  /** Estimated bytes of `messages` (see {@linkcode messageBytes}). */
  bytes: number;
}

/**
 * Default of {@linkcode HistoryOptions.maxBytes}: 512 MiB, about two million
 * messages of everyday length (10,000 rooms of 1000 such messages would hold
 * about 3 GB; 1000 of the longest, 16 MB a room). A flood in a few rooms
 * cannot take the memory of the whole server, nor the history of the rooms
 * that hold less.
 */
export const DEFAULT_MAX_HISTORY_BYTES = 512 * 1024 * 1024;
/**
 * What a kept message costs besides its text: the object, its id and time
 * strings, and the array slot (measured: 147 bytes with a one-character
 * text; rounded up).
 */
const MESSAGE_OVERHEAD_BYTES = 200;

/** Estimated bytes a kept message holds in memory (its text as UTF-16, the worst case). */
function messageBytes(message: RoomMessage): number {
  return 2 * message.text.length + MESSAGE_OVERHEAD_BYTES;
}

const FILE_SUFFIX = ".jsonl";
/**
 * Written at open (holding the run's id base), removed at a clean close:
 * finding it at open means the last run did not close (a crash, `kill -9`).
 */
const RUNNING_MARK = ".running";
/**
 * After a run that did not close, ids go on this far above the last one on
 * disk: the messages of its last unwritten second got ids that clients may
 * have seen, and an id is never handed out twice. Far more than a second of
 * messages; the hole shows as `gap` to a client that asks across it.
 */
const CRASH_ID_JUMP = 1_000_000;
/**
 * Written when a run starts after a crash, and kept: where each room's ids
 * went on from, and the base of rooms with no file. Later runs, clean ones
 * included, never go below it: a room nobody wrote to since the crash has on
 * disk only what it had before, under ids the crashed run handed out again.
 */
const FLOORS_FILE = ".id_floors.json";
/**
 * Held (an OS lock) while a server uses the directory: a second chat server
 * on the same data would take the first one's running mark for a crash's
 * and rewrite files the first is appending to.
 */
const LOCK_FILE = ".lock";
const TAIL_CHUNK = 64 * 1024;
/**
 * Most bytes read back for the exactly-once window at start, per room: ten
 * minutes of the longest messages at 10 a second (an abuse limit, not a
 * size one messages get near).
 */
const MAX_WINDOW_BYTES = 256 * 1024 * 1024;
/** Most messages of the exactly-once window kept past `keep`, per room. */
const MAX_SENT_TAIL = 200_000;
/**
 * Room files open at once (read at start, written at a flush): thousands of
 * rooms must not run the process out of file descriptors (`ulimit -n` is
 * 256 on some systems).
 */
const FILE_CONCURRENCY = 16;

/** The history of every room, with batched persistence. */
export class HistoryStore {
  #dir: string;
  #keep: number;
  #maxBytes: number;
  /** Estimated bytes of every room's kept messages. */
  #bytes = 0;
  /** Set when a shed could not get under its target: when to try again. */
  #shedStuckAt = 0;
  #dedupWindowMs: number;
  #flushIntervalMs: number;
  #now: () => number;
  #log: (line: string) => void;
  #rooms = new Map<string, Room>();
  /** The sender's `client_id` of the messages that had one. */
  #clientIds = new WeakMap<RoomMessage, string>();
  /**
   * Where a room with nothing on disk starts its ids: 0, or since a crash
   * the base of the run that recovered from it.
   */
  #idBase = 0;
  /** Per room, the ids the room's ids go on above (see `FLOORS_FILE`). */
  #floors = new Map<string, number>();
  #dirty = new Set<Room>();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #flushing: Promise<void> = Promise.resolve();
  #closed = false;
  #lock: Deno.FsFile | undefined;

  private constructor(dir: string, options: HistoryOptions) {
    this.#dir = dir;
    this.#keep = options.keep ?? 1000;
    this.#maxBytes = options.maxBytes ?? DEFAULT_MAX_HISTORY_BYTES;
    this.#dedupWindowMs = options.dedupWindowMs ?? 10 * 60_000;
    this.#flushIntervalMs = options.flushIntervalMs ?? 1000;
    this.#now = options.now ?? Date.now;
    this.#log = options.log ?? (() => {});
  }

  /** Loads the kept tail of every room's file under `dir` (created if missing). */
  static async open(
    dir: string,
    options: HistoryOptions = {},
  ): Promise<HistoryStore> {
    const store = new HistoryStore(dir, options);
    await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
    const lockPath = `${dir}/${LOCK_FILE}`;
    const lock = await tryLockFile(lockPath);
    if (lock === null) {
      throw new Error(
        `Cannot use history directory ${dir}: another chat server holds its lock file ${lockPath}`,
      );
    }
    try {
      store.#lock = lock;
      await store.#openLocked();
    } catch (err) {
      store.#closed = true;
      clearTimeout(store.#timer);
      store.#lock = undefined;
      lock.close();
      throw err;
    }
    return store;
  }

  /** The rest of {@linkcode HistoryStore.open}, with the directory locked. */
  async #openLocked(): Promise<void> {
    const dir = this.#dir;
    const mark = `${dir}/${RUNNING_MARK}`;
    const floorsPath = `${dir}/${FLOORS_FILE}`;
    const floors = await readFloors(floorsPath);
    this.#idBase = floors.base;
    this.#floors = floors.rooms;
    let crashed = false;
    try {
      // The crashed run's own base counts too: after two crashes in a row,
      // the second run's ids (base + disk) must not come round again.
      const previous = Number((await Deno.readTextFile(mark)).trim());
      crashed = true;
      this.#idBase = Math.max(
        Number.isSafeInteger(previous) && previous > 0 ? previous : 0,
        floors.base,
      ) + CRASH_ID_JUMP;
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
    const removals: Promise<void>[] = [];
    const names: string[] = [];
    for await (const entry of Deno.readDir(dir)) {
      if (entry.isFile && entry.name.endsWith(".tmp")) {
        // Left by a crash in the middle of a compaction; the real file is intact.
        removals.push(Deno.remove(`${dir}/${entry.name}`).catch(() => {}));
        continue;
      }
      if (!entry.isFile || !entry.name.endsWith(FILE_SUFFIX)) continue;
      const name = entry.name.slice(0, -FILE_SUFFIX.length);
      if (!/^[a-z0-9_-]{1,32}$/.test(name)) continue;
      names.push(name);
    }
    await Promise.all([
      ...removals,
      inPool(names, FILE_CONCURRENCY, (name) => this.#load(name)),
    ]);
    if (crashed) {
      this.#log(
        `history: the last run did not shut down cleanly (${mark} was left behind): ids go on ${CRASH_ID_JUMP} higher, and clients asking for what they missed are told that some may be missing`,
      );
      for (const r of this.#rooms.values()) r.lastId += this.#idBase;
      // Before any id is handed out: a clean run after this one must not go
      // back to what is on disk for the rooms nobody writes to meanwhile.
      this.#floors = new Map(
        [...this.#rooms.values()].map((r) => [r.name, r.lastId]),
      );
      await writeAtomic(
        floorsPath,
        `${
          JSON.stringify(
            {
              version: 1,
              base: this.#idBase,
              rooms: Object.fromEntries(this.#floors),
            },
            null,
            2,
          )
        }\n`,
      );
    } else {
      for (const r of this.#rooms.values()) {
        r.lastId = Math.max(r.lastId, this.#floor(r.name));
      }
    }
    this.#shed();
    // A file that ends in part of a line takes no append until rewritten:
    // rewritten now, so that every message of this run is in its file
    // before it is sent.
    const torn = [...this.#rooms.values()].filter((r) => r.torn);
    // In the flush chain: a flush the shed above asked for waits for it.
    this.#flushing = this.#flushing.then(() =>
      inPool(torn, FILE_CONCURRENCY, (r) => this.#writeRoom(r))
    );
    await this.#flushing;
    for (const r of torn) {
      if (!r.torn && !r.needsRewrite && !r.unsynced) this.#dirty.delete(r);
    }
    await Deno.writeTextFile(mark, String(this.#idBase), { mode: 0o600 });
    await syncDir(dir);
    // Compactions found at load happen in the background, off the start-up path.
    if (this.#dirty.size > 0) this.#schedule();
  }

  /** Whether the room has any kept history. */
  has(room: string): boolean {
    return (this.#rooms.get(room)?.messages.length ?? 0) > 0;
  }

  /** Estimated bytes the kept messages of all rooms hold (see {@linkcode HistoryOptions.maxBytes}). */
  get bytes(): number {
    return this.#bytes;
  }

  /** How many rooms have history. */
  roomCount(): number {
    let count = 0;
    for (const r of this.#rooms.values()) if (r.messages.length > 0) count++;
    return count;
  }

  /** Names of the rooms with history. */
  roomNames(): IterableIterator<string> {
    return this.#rooms.keys();
  }

  /**
   * Stores a new message; returns it with its id and timestamp, and its JSON
   * (serialised once: the same line goes to the file and to every recipient).
   */
  append(
    room: string,
    from: string,
    text: string,
    clientId?: string,
  ): { message: RoomMessage; line: string; own: string } {
    let r = this.#rooms.get(room);
    if (r === undefined) {
      r = newRoom(room, this.#floor(room));
      this.#rooms.set(room, r);
    }
    // A file that ends in part of a line (a write failed) takes no append
    // until it is rewritten from memory: a message accepted meanwhile would
    // be in memory only, and lost if the process were killed.
    if (r.torn) throw new HistoryWriteError(room, r.writeError);
    const message: RoomMessage = {
      type: "message",
      id: String(r.lastId + 1),
      room,
      from,
      text,
      ts: new Date(this.#now()).toISOString(),
    };
    const line = JSON.stringify(message);
    const own = clientId === undefined ? line : withClientId(line, clientId);
    // In the file before anyone is sent it (and before it is history): a
    // message that was delivered survives the process being killed.
    r.pending.push(own);
    if (!this.#appendNow(r)) {
      // Part of it may be in the file: the rewrite from memory, which does
      // not hold it, takes that out again (and a rewrite under way must not
      // put it in).
      if (r.rewriting) {
        const at = r.late.lastIndexOf(own);
        if (at !== -1) r.late.splice(at, 1);
      }
      throw new HistoryWriteError(room, r.writeError);
    }
    r.lastId++;
    r.messages.push(message);
    this.#grow(r, messageBytes(message));
    if (r.messages.length > this.#keep + trimSlack(this.#keep)) this.#trim(r);
    if (this.#bytes > this.#maxBytes) this.#shed();
    else this.#shedStuckAt = 0;
    if (clientId !== undefined) this.#clientIds.set(message, clientId);
    r.recentJson = undefined;
    // On disk (fdatasync) at the next flush.
    this.#dirty.add(r);
    this.#schedule();
    return { message, line, own };
  }

  /**
   * The kept messages sent with a `client_id` from `since` (ms) on, oldest
   * first, each with its sender's echo line: what the exactly-once check of
   * a restarted server starts from.
   */
  sentSince(
    since: number,
  ): { from: string; clientId: string; own: string; at: number }[] {
    const sent = [];
    for (const r of this.#rooms.values()) {
      for (const line of r.sentTail) if (line.at >= since) sent.push(line);
      for (const message of r.messages) {
        const clientId = this.#clientIds.get(message);
        const at = Date.parse(message.ts);
        if (clientId === undefined || !(at >= since)) continue;
        sent.push({
          from: message.from,
          clientId,
          own: this.#storedLine(message),
          at,
        });
      }
    }
    return sent.sort((a, b) => a.at - b.at);
  }

  /**
   * The newest `limit` messages of a room, oldest first (fewer when they
   * pass {@linkcode MAX_PAGE_BYTES}).
   */
  recent(room: string, limit: number): HistoryPage {
    const messages = this.#kept(room);
    return pageBefore(messages, messages.length, limit);
  }

  /**
   * JSON of the newest {@linkcode DEFAULT_HISTORY_LIMIT} messages, as every
   * `welcome` and `joined` carries: serialised once per change of the room,
   * not once per connection.
   */
  recentJson(room: string): string {
    const r = this.#rooms.get(room);
    if (r === undefined) return "[]";
    return r.recentJson ??= this.recent(room, DEFAULT_HISTORY_LIMIT).json;
  }

  /**
   * The newest `limit` messages with an id below `before`, oldest first
   * (fewer when they pass {@linkcode MAX_PAGE_BYTES}).
   */
  before(room: string, before: string, limit: number): HistoryPage {
    const messages = this.#kept(room);
    return pageBefore(
      messages,
      firstIndexAbove(messages, Number(before) - 1),
      limit,
    );
  }

  /**
   * The oldest `limit` messages with an id above `after` (fewer when they
   * pass {@linkcode MAX_PAGE_BYTES}), and whether some are gone.
   */
  after(room: string, after: string, limit: number): HistoryPage {
    const messages = this.#kept(room);
    const afterId = Number(after);
    const start = firstIndexAbove(messages, afterId);
    const next = messages[start];
    // Ids are consecutive, except where they jumped at the last crash's
    // recovery: the crashed run may have handed out some of the skipped
    // ids and lost them. A client that had seen nothing of a room that had
    // nothing on disk then (a room new since) has lost nothing there.
    // (The page says so once it reaches the jump.)
    const page = pageAfter(messages, start, limit);
    const end = start + page.messages.length;
    const jump = this.#jump(room);
    const acrossJump = afterId < jump.to &&
      !(afterId === 0 && jump.from === 0) &&
      (end === messages.length ||
        Number(page.messages.at(-1)!.id) > jump.from);
    const seen = afterId >= jump.from && afterId < jump.to ? jump.to : afterId;
    const lastId = this.#rooms.get(room)?.lastId ?? jump.to;
    // Otherwise a hole right after what was seen is history no longer kept.
    const gap = acrossJump ||
      (next !== undefined ? Number(next.id) > seen + 1 : lastId > seen);
    return { ...page, gap };
  }

  /** Writes every queued message now, and waits until it is on disk. */
  flush(): Promise<void> {
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
    this.#flushing = this.#flushing.then(() => this.#writeDirty());
    return this.#flushing;
  }

  /**
   * Flushes and stops the timer; appends after this are kept in memory only.
   * When every message is on disk, marks the directory as closed cleanly.
   */
  async close(): Promise<void> {
    if (this.#closed) return this.#flushing;
    this.#closed = true;
    try {
      await this.flush();
      if (this.#dirty.size > 0) {
        this.#log(
          `history: ${this.#dirty.size} room(s) could not be written at shutdown; their last messages are lost, and the next start takes this run for a crash`,
        );
        return;
      }
      try {
        await Deno.remove(`${this.#dir}/${RUNNING_MARK}`);
        await syncDir(this.#dir);
      } catch (err) {
        this.#log(
          `history: cannot mark ${this.#dir} as closed cleanly: ${
            err instanceof Error ? err.message : err
          }`,
        );
      }
    } finally {
      this.#lock?.close();
      this.#lock = undefined;
    }
  }

  /** The id a room's ids go on above when it has none of its own. */
  #floor(room: string): number {
    return this.#jump(room).to;
  }

  /**
   * The ids a room skipped at the last crash's recovery: from its last id on
   * disk then (0 for a room with no file) to the one its ids went on above.
   */
  #jump(room: string): { from: number; to: number } {
    const floor = this.#floors.get(room);
    if (floor === undefined || floor < this.#idBase) {
      return { from: 0, to: this.#idBase };
    }
    return { from: floor - this.#idBase, to: floor };
  }

  /** A message as its file keeps it: the sender's echo, with its client_id. */
  #storedLine(message: RoomMessage): string {
    const line = JSON.stringify(message);
    const clientId = this.#clientIds.get(message);
    return clientId === undefined ? line : withClientId(line, clientId);
  }

  #kept(room: string): RoomMessage[] {
    const r = this.#rooms.get(room);
    if (r === undefined) return [];
    if (r.messages.length > this.#keep) this.#trim(r);
    return r.messages;
  }

  /** Adds to (or takes from) a room's and the store's byte counts. */
  #grow(r: Room, bytes: number): void {
    r.bytes += bytes;
    this.#bytes += bytes;
  }

  /**
   * Over the byte budget: cuts the rooms holding the most down to one level,
   * oldest messages first, so that all rooms together hold at most half the
   * budget (the level is found in one pass over the rooms sorted by what
   * they can lose, however many there are). Down to half, so that a flood
   * sheds in large steps: a shed room's file is rewritten to its new tail,
   * which writes at most about what the flood sent. Every room keeps its
   * newest message; when that is all that is left to cut, it waits for
   * another eighth of the budget (or to be back under it) before it tries
   * again.
   */
  #shed(): void {
    if (this.#bytes <= Math.max(this.#maxBytes, this.#shedStuckAt)) return;
    const target = this.#maxBytes / 2;
    const excess = this.#bytes - target;
    // What each room can lose: all but its newest message.
    const cuttable = (r: Room) => r.bytes - messageBytes(r.messages.at(-1)!);
    const rooms = [...this.#rooms.values()]
      .filter((r) => r.messages.length > 1)
      .map((room) => ({ room, can: cuttable(room) }))
      .sort((a, b) => b.can - a.can);
    // Cutting what the first k rooms can lose down to what the next one
    // can frees their sum less k times that: the first k for which that is
    // enough gives the level (0 if no k is: all of them to their newest).
    let level = 0;
    let cut = rooms.length;
    let sum = 0;
    for (let k = 1; k <= rooms.length; k++) {
      sum += rooms[k - 1]!.can;
      if (sum - k * (rooms[k]?.can ?? 0) >= excess) {
        level = (sum - excess) / k;
        cut = k;
        break;
      }
    }
    const before = this.#bytes;
    // Largest first; a room loses whole messages, so the first ones may free
    // more than the level asked of them, and the last ones need not lose any.
    for (const { room: r, can } of rooms.slice(0, cut)) {
      if (this.#bytes <= target) break;
      const goal = can - level;
      let freed = 0;
      let n = 0;
      while (n < r.messages.length - 1 && freed < goal) {
        freed += messageBytes(r.messages[n++]!);
      }
      if (n === 0) continue;
      this.#trim(r, r.messages.length - n);
      r.recentJson = undefined;
      r.needsRewrite = true;
      this.#dirty.add(r);
    }
    this.#shedStuckAt = this.#bytes > target
      ? this.#bytes + this.#maxBytes / 8
      : 0;
    if (this.#bytes === before) return;
    this.#schedule();
    this.#log(
      `history: over its memory budget of ${this.#maxBytes} bytes: the rooms holding the most lost their oldest messages, ${this.#bytes} bytes kept`,
    );
  }

  /**
   * Trims a room's messages to the newest `keep`; those of them sent with a
   * `client_id` within the exactly-once window move to `sentTail`.
   */
  #trim(r: Room, keep = this.#keep): void {
    const cutoff = this.#now() - this.#dedupWindowMs;
    const trimmed = r.messages.splice(0, r.messages.length - keep);
    for (const message of trimmed) {
      this.#grow(r, -messageBytes(message));
      const clientId = this.#clientIds.get(message);
      const at = Date.parse(message.ts);
      if (clientId !== undefined && at > cutoff) {
        r.sentTail.push({
          from: message.from,
          clientId,
          own: this.#storedLine(message),
          at,
        });
      }
    }
    this.#pruneSentTail(r, cutoff);
  }

  /** Drops what left the window from `sentTail` (and bounds it). */
  #pruneSentTail(r: Room, cutoff: number): void {
    let n = 0;
    // A clock stepped back may leave a later entry first: the bound holds.
    while (
      n < r.sentTail.length &&
      (!(r.sentTail[n]!.at > cutoff) || r.sentTail.length - n > MAX_SENT_TAIL)
    ) n++;
    if (n > 0) r.sentTail.splice(0, n);
  }

  #schedule(): void {
    if (this.#timer !== undefined || this.#closed) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.flush().catch(() => {});
    }, this.#flushIntervalMs);
  }

  async #writeDirty(): Promise<void> {
    const rooms = [...this.#dirty];
    this.#dirty.clear();
    await inPool(rooms, FILE_CONCURRENCY, (r) => this.#writeRoom(r));
  }

  async #writeRoom(r: Room): Promise<void> {
    const path = this.#path(r);
    if (r.rewriting) {
      // Never two rewrites of one file at once: the next flush.
      this.#dirty.add(r);
      this.#schedule();
      return;
    }
    try {
      if (
        r.needsRewrite ||
        r.linesOnDisk + r.pending.length > (this.#keep + r.sentTail.length) * 4
      ) {
        // What is queued goes to the file first: the temporary file is no
        // file until its rename, and its frames may be sent before that.
        this.#appendNow(r);
        const kept = this.#kept(r.name);
        this.#pruneSentTail(r, this.#now() - this.#dedupWindowMs);
        const text = [
          ...r.sentTail.map((s) => s.own),
          ...kept.map((m) => this.#storedLine(m)),
        ];
        // What is queued is in the text; cleared before the write: a shed
        // while it is under way asks for another (a failure sets it again).
        r.pending = [];
        r.needsRewrite = false;
        r.rewriting = true;
        r.late = [];
        try {
          // The lines that came during the write go in just before the
          // rename, in the same synchronous step, and the room takes the new
          // file in that step too: none is missing from either file
          // whenever the process is killed.
          await writeAtomic(path, text, {
            late: () => {
              const lines = [...r.late, ...r.pending];
              r.late = [];
              r.pending = [];
              return lines;
            },
            renamed: (late) => {
              r.rewriting = false;
              r.torn = false;
              // Written whole, whatever failed before in this flush (unless
              // a shed asked for another rewrite meanwhile).
              if (!r.needsRewrite) this.#dirty.delete(r);
              r.linesOnDisk = text.length + late;
              // The late lines went in after the new file's sync.
              if (late > 0) r.unsynced = true;
            },
          });
        } finally {
          r.rewriting = false;
          r.late = [];
        }
      } else if (!this.#appendNow(r)) {
        return; // Told, and rewritten from memory at the next flush.
      }
      if (r.unsynced) {
        r.unsynced = false;
        const file = await Deno.open(path, { write: true });
        try {
          await file.syncData();
        } finally {
          file.close();
        }
      }
      // Unless an append failed meanwhile (it said so).
      if (r.writeError !== undefined && !r.torn) {
        r.writeError = undefined;
        this.#log(`history: writing ${path} again`);
      }
    } catch (err) {
      this.#writeFailed(r, path, err);
    }
  }

  #path(r: Room): string {
    return `${this.#dir}/${r.name}${FILE_SUFFIX}`;
  }

  /**
   * Appends a room's queued lines to its file, synchronously; false (the
   * room then waits for a rewrite from memory) when the write failed.
   */
  #appendNow(r: Room): boolean {
    if (r.pending.length === 0 || this.#lock === undefined) return true;
    // After part of a line, an append would join two lines into damage.
    if (r.torn) {
      if (r.rewriting) r.late.push(...r.pending.splice(0));
      return true;
    }
    const lines = r.pending;
    r.pending = [];
    try {
      const file = Deno.openSync(this.#path(r), {
        append: true,
        create: true,
        mode: 0o600,
      });
      try {
        writeAllSync(file, encoder.encode(lines.join("\n") + "\n"));
      } finally {
        file.close();
      }
    } catch (err) {
      // Part of the lines may be in the file already: it is rewritten from
      // memory (what is kept holds them), not appended to.
      r.torn = true;
      if (r.rewriting) r.late.push(...lines);
      else this.#writeFailed(r, this.#path(r), err);
      return false;
    }
    if (r.rewriting) r.late.push(...lines);
    else {
      r.linesOnDisk += lines.length;
      r.unsynced = true;
    }
    return true;
  }

  /** A write of the room failed: rewritten from memory at the next flush. */
  #writeFailed(r: Room, path: string, err: unknown): void {
    r.needsRewrite = true;
    r.torn = true;
    this.#dirty.add(r);
    const why = err instanceof Error ? err.message : String(err);
    // Once per room and reason (not the file named after it, which may be
    // a temporary one), not once a second while the disk is full.
    const reason = why.split(": ")[0];
    if (reason !== r.writeError) {
      r.writeError = reason;
      this.#log(
        `history: cannot write ${path}: ${why} (kept in memory, tried again every ${this.#flushIntervalMs} ms)`,
      );
    }
    if (!this.#closed) this.#schedule();
  }

  async #load(name: string): Promise<void> {
    const path = `${this.#dir}/${name}${FILE_SUFFIX}`;
    const since = this.#now() - this.#dedupWindowMs;
    const { lines, complete, clean } = await readTailLines(
      path,
      this.#keep,
      since,
    );
    const r = newRoom(name);
    let dropped = 0;
    for (const [index, line] of lines.entries()) {
      const stored = parseStoredMessage(line, name);
      // A torn last line is a crash's (and repaired); a complete line that is
      // not a message, or out of order, is damage: stop rather than drop it.
      if (stored === undefined || Number(stored.message.id) <= r.lastId) {
        throw new Error(
          `Cannot read the history file ${path}: line ${
            lines.length - index
          } from the end is not a message of #${name} with an id above the one before; fix or move the file`,
        );
      }
      const { message, clientId } = stored;
      r.lastId = Number(message.id);
      if (lines.length - index > this.#keep) {
        // Before the kept tail: read for the exactly-once window only.
        const at = Date.parse(message.ts);
        if (clientId !== undefined && at > since) {
          r.sentTail.push({ from: message.from, clientId, own: line, at });
        } else dropped++;
        continue;
      }
      r.messages.push(message);
      this.#grow(r, messageBytes(message));
      if (clientId !== undefined) this.#clientIds.set(message, clientId);
    }
    r.linesOnDisk = lines.length;
    // A torn end (part of a line) is not appended to before the rewrite,
    // which the opening does at once; a longer file is compacted later.
    r.torn = !clean;
    if (!complete || !clean || dropped > 0) r.needsRewrite = true;
    if (r.needsRewrite) this.#dirty.add(r);
    this.#rooms.set(name, r);
  }
}

/** How far a room's messages may grow past `keep` before they are trimmed. */
function trimSlack(keep: number): number {
  return Math.max(16, Math.ceil(keep / 8));
}

function newRoom(name: string, lastId = 0): Room {
  return {
    name,
    messages: [],
    lastId,
    sentTail: [],
    pending: [],
    needsRewrite: false,
    torn: false,
    rewriting: false,
    late: [],
    unsynced: false,
    linesOnDisk: 0,
    writeError: undefined,
    recentJson: undefined,
    bytes: 0,
  };
}

const encoder = new TextEncoder();
/** Room for the JSON of any message the protocol allows: 4000 code points of at most 6 bytes each (`\u0001`), and the rest. */
const scratch = new Uint8Array(64 * 1024);

/** UTF-8 bytes of a string. */
function utf8Bytes(text: string): number {
  const { read, written } = encoder.encodeInto(text, scratch);
  return read === text.length ? written : encoder.encode(text).length;
}

/**
 * The page of at most `limit` messages ending before `end`, no larger than
 * {@linkcode MAX_PAGE_BYTES} allows. A page is cut only once it holds half
 * of that: a shorter page under half is the end of what there is, which is
 * how a client tells (only a message longer than the protocol allows, from
 * a file written by other means, can make a page pass the limit).
 */
function pageBefore(
  messages: RoomMessage[],
  end: number,
  limit: number,
): HistoryPage {
  const floor = Math.max(0, end - limit);
  const lines: string[] = [];
  let start = end;
  let bytes = 0;
  while (start > floor) {
    const line = JSON.stringify(messages[start - 1]!);
    const size = utf8Bytes(line);
    if (cuts(bytes, size)) break;
    lines.push(line);
    bytes += size;
    start--;
  }
  return {
    messages: messages.slice(start, end),
    json: `[${lines.reverse().join(",")}]`,
    gap: false,
  };
}

/** The page starting at `start`: the counterpart of {@linkcode pageBefore}. */
function pageAfter(
  messages: RoomMessage[],
  start: number,
  limit: number,
): HistoryPage {
  const ceiling = Math.min(messages.length, start + limit);
  const lines: string[] = [];
  let end = start;
  let bytes = 0;
  while (end < ceiling) {
    const line = JSON.stringify(messages[end]!);
    const size = utf8Bytes(line);
    if (cuts(bytes, size)) break;
    lines.push(line);
    bytes += size;
    end++;
  }
  return {
    messages: messages.slice(start, end),
    json: `[${lines.join(",")}]`,
    gap: false,
  };
}

/** Whether a page of `bytes` ends before a message of `size`. */
function cuts(bytes: number, size: number): boolean {
  return bytes + size > MAX_PAGE_BYTES && bytes >= MAX_PAGE_BYTES / 2;
}

/** Index of the first message whose id is above `id` (messages sorted by id). */
function firstIndexAbove(messages: RoomMessage[], id: number): number {
  let lo = 0;
  let hi = messages.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (Number(messages[mid]!.id) <= id) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function withClientId(line: string, clientId: string): string {
  // The line is a JSON object: the client_id goes in before its last brace.
  return `${line.slice(0, -1)},"client_id":${JSON.stringify(clientId)}}`;
}

function parseStoredMessage(
  line: string,
  room: string,
): { message: RoomMessage; clientId: string | undefined } | undefined {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch {
    return undefined;
  }
  if (typeof value !== "object" || value === null) return undefined;
  const v: Record<string, unknown> = { ...value };
  if (
    typeof v.id !== "string" || !/^\d{1,16}$/.test(v.id) ||
    typeof v.from !== "string" || typeof v.text !== "string" ||
    typeof v.ts !== "string"
  ) {
    return undefined;
  }
  const message: RoomMessage = {
    type: "message",
    id: v.id,
    room,
    from: v.from,
    text: v.text,
    ts: v.ts,
  };
  const clientId = typeof v.client_id === "string" ? v.client_id : undefined;
  return { message, clientId };
}

/**
 * Reads the last `count` complete lines of a file without reading all of it,
 * and before them those of messages sent after `since` (ms), within
 * {@linkcode MAX_WINDOW_BYTES}. `complete` is false when older lines were
 * left unread; `clean` is false when the file does not end with a newline (a
 * torn append).
 */
async function readTailLines(
  path: string,
  count: number,
  since: number,
): Promise<{ lines: string[]; complete: boolean; clean: boolean }> {
  const file = await Deno.open(path, { read: true });
  try {
    const { size } = await file.stat();
    const chunks: Uint8Array[] = [];
    let pos = size;
    let newlines = 0;
    const decoder = new TextDecoder();
    // The first whole line read so far is of the window: read on (a line
    // whose time cannot be read ends the window).
    const firstInWindow = () => {
      const text = decoder.decode(chunks[0]);
      const start = text.indexOf("\n") + 1;
      const end = text.indexOf("\n", start);
      if (start === 0 || end === -1) return true;
      return sentAt(text.slice(start, end)) > since;
    };
    while (
      pos > 0 &&
      (newlines <= count ||
        size - pos < MAX_WINDOW_BYTES && firstInWindow())
    ) {
      const len = Math.min(TAIL_CHUNK, pos);
      pos -= len;
      const buf = new Uint8Array(len);
      await file.seek(pos, Deno.SeekMode.Start);
      let read = 0;
      while (read < len) {
        const n = await file.read(buf.subarray(read));
        if (n === null) break;
        read += n;
      }
      for (const b of buf) if (b === 10) newlines++;
      chunks.unshift(buf);
    }
    const bytes = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
    let offset = 0;
    for (const c of chunks) {
      bytes.set(c, offset);
      offset += c.length;
    }
    const text = decoder.decode(bytes);
    const clean = text === "" || text.endsWith("\n");
    const all = text.split("\n");
    // After the last newline: empty, a whole line whose newline a crash (or
    // an editor) left out, or a line a crash cut short.
    const tail = all.pop()!.replace(/\0+$/, "");
    if (parseStoredMessage(tail, "") !== undefined) all.push(tail);
    else if (!isTornLine(tail)) {
      throw new Error(
        `Cannot read the history file ${path}: it does not end with a newline, and its last line is neither a message nor the start of one; fix or move the file`,
      );
    }
    if (pos > 0) all.shift(); // the first line may start before what was read
    let from = Math.max(0, all.length - count);
    while (from > 0 && sentAt(all[from - 1]!) > since) from--;
    return { lines: all.slice(from), complete: pos === 0 && from === 0, clean };
  } finally {
    file.close();
  }
}

/** How every stored line starts (see {@linkcode HistoryStore.append}). */
const LINE_START = '{"type":"message","id":"';

/**
 * Whether what follows a file's last newline (without the zeros some file
 * systems leave in a block a crash did not write) can be a crash's: the
 * start of a line cut short, or nothing. Anything else (a whole JSON value
 * included) is not ours to drop.
 */
function isTornLine(cut: string): boolean {
  if (cut.length <= LINE_START.length) return LINE_START.startsWith(cut);
  if (!cut.startsWith(LINE_START)) return false;
  try {
    JSON.parse(cut);
    return false; // whole, but not a message: damage
  } catch {
    return true;
  }
}

/** A stored line's `ts` in ms (NaN if none is found). */
function sentAt(line: string): number {
  // Inside a JSON string every quote is escaped: this is the key.
  const match = /"ts":"([^"]{1,40})"/.exec(line);
  return match === null ? NaN : Date.parse(match[1]!);
}

/** Reads `FLOORS_FILE` (none: base 0); a damaged one stops the start. */
async function readFloors(
  path: string,
): Promise<{ base: number; rooms: Map<string, number> }> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      return { base: 0, rooms: new Map() };
    }
    throw err;
  }
  const damaged = new Error(
    `Cannot read the history file ${path}: it is not the ids' floors this server writes after a crash; fix it rather than remove it (ids could come round again)`,
  );
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    throw damaged;
  }
  if (typeof value !== "object" || value === null) throw damaged;
  const { version, base, rooms }: Record<string, unknown> = { ...value };
  if (
    version !== 1 || !isId(base) || typeof rooms !== "object" ||
    rooms === null || Array.isArray(rooms)
  ) {
    throw damaged;
  }
  const floors = new Map<string, number>();
  for (const [room, id] of Object.entries(rooms)) {
    if (!isId(id)) throw damaged;
    floors.set(room, id);
  }
  return { base, rooms: floors };
}

function isId(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

async function writeAll(file: Deno.FsFile, data: Uint8Array): Promise<void> {
  let written = 0;
  while (written < data.length) {
    written += await file.write(data.subarray(written));
  }
}

function writeAllSync(file: Deno.FsFile, data: Uint8Array): void {
  let written = 0;
  while (written < data.length) {
    written += file.writeSync(data.subarray(written));
  }
}

async function syncDir(path: string): Promise<void> {
  const dir = await Deno.open(path);
  try {
    await dir.sync();
  } finally {
    dir.close();
  }
}

/**
 * Replaces a file atomically with `text`, or with `lines` each followed by a
 * newline (written in pieces: no one string of a whole busy room).
 */
async function writeAtomic(
  path: string,
  content: string | string[],
  steps: {
    /** Lines to add after the content, asked for just before the rename. */
    late?: () => string[];
    /** Told, in the same synchronous step as the rename, how many were added. */
    renamed?: (late: number) => void;
  } = {},
): Promise<void> {
  const tmp = `${path}.${crypto.randomUUID()}.tmp`;
  const encoder = new TextEncoder();
  try {
    const file = await Deno.open(tmp, {
      write: true,
      create: true,
      truncate: true,
      mode: 0o600,
    });
    let late = 0;
    try {
      if (typeof content === "string") {
        await writeAll(file, encoder.encode(content));
      } else {
        let piece = "";
        for (const line of content) {
          piece += `${line}\n`;
          if (piece.length >= 1 << 20) {
            await writeAll(file, encoder.encode(piece));
            piece = "";
          }
        }
        await writeAll(file, encoder.encode(piece));
      }
      await file.sync();
      // From here to the rename, and the caller's step after it, nothing
      // else runs.
      const lines = steps.late?.() ?? [];
      if (lines.length > 0) {
        writeAllSync(file, encoder.encode(lines.join("\n") + "\n"));
      }
      late = lines.length;
    } finally {
      file.close();
    }
    Deno.renameSync(tmp, path);
    steps.renamed?.(late);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw err;
  }
  await syncDir(path.slice(0, path.lastIndexOf("/")) || ".");
}

/** Runs `fn` on every item, at most `limit` at once; settles when all have. */
async function inPool<T>(
  items: T[],
  limit: number,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, worker),
  );
}
