/**
 * The auth server's files, `users.json` and `sessions.json`: the only module
 * that touches them. Loads and validates them, keeps them in memory, and
 * writes them atomically (temp file, fsync, rename, fsync of the directory)
 * with group commit: changes made while a write is running share the next
 * write, and every change is acknowledged only once it is durable. An OS lock
 * on a separate `.lock` file keeps a second server off the same directory.
 *
 * @module
 */
import { basename, dirname, join } from "node:path";
import { tryLockFile } from "../lock_file.ts";
import { USERNAME_RE } from "../username.ts";
import { isPasswordHashForm } from "./password.ts";

/** A user as stored in `users.json`. */
export interface UserRecord {
  /** As registered (case kept). */
  username: string;
  /** PHC string. */
  password_hash: string;
  /** ISO 8601 UTC. */
  created_at: string;
}

/** A session as kept in memory. */
export interface SessionRecord {
  username: string;
  /** ISO 8601 UTC. */
  createdAt: string;
  /** ISO 8601 UTC. */
  expiresAt: string;
  /** `expiresAt` in ms since the epoch. */
  expiresAtMs: number;
}

/** Options of {@linkcode AuthStore.open}. */
export interface AuthStoreOptions {
  /** Clock in ms; default `Date.now`. */
  now?: () => number;
}

/** The store cannot start: a file does not parse, or the directory is locked. */
export class StoreError extends Error {
  override name = "StoreError";
}

/**
 * A data file cannot be written (a full disk, a read-only file system): the
 * change that asked for the write is not saved. Its message names the file
 * and the OS error, on one line.
 */
export class StorageError extends Error {
  override name = "StorageError";
  /** The file that could not be written. */
  readonly path: string;
  /** What the OS said, e.g. `No space left on device (os error 28)`. */
  readonly reason: string;

  /** Wraps `cause`, the failure of writing `path`. */
  constructor(path: string, cause: unknown) {
    const reason = osReason(cause);
    super(`Cannot write ${path}: ${reason}`, { cause });
    this.path = path;
    this.reason = reason;
  }
}

/** Name of the users file inside the data directory. */
export const USERS_FILE = "users.json";
/** Name of the sessions file inside the data directory. */
export const SESSIONS_FILE = "sessions.json";
/** Name of the lock file inside the data directory. */
export const LOCK_FILE = ".lock";

const FILE_VERSION = 1;
const TEMP_RE = /^\.(users|sessions)\.json\.tmp-[0-9a-f]+$/;
const TOKEN_HASH_RE = /^[0-9a-f]{64}$/;
const encoder = new TextEncoder();
const COMMIT_POLL_MS = 5;
const NEWLINE = encoder.encode("\n");
// JSON.stringify escapes every control character but the printed newlines.
const ASCII_RE = /^[\n -\x7f]*$/;
const COMMA_NEWLINE = encoder.encode(",\n");

/** Users and sessions, in memory and on disk. */
export class AuthStore {
  #dataDir: string;
  #lock: Deno.FsFile;
  #now: () => number;
  #users: Map<string, UserRecord>;
  #sessions: Map<string, SessionRecord>;
  #usersWriter: GroupWriter;
  #sessionsWriter: GroupWriter;
  /**
   * Sessions removed in memory whose removal did not reach the file yet, with
   * the number of the sessions write that will first include it.
   */
  #unsavedRemovals = new Map<string, { session: SessionRecord; seq: number }>();
  /** Sessions writes asked for so far (see {@linkcode #commitSessions}). */
  #sessionsSeq = 0;
  /**
   * Told the token hashes of sessions that ended before their time: a
   * removal as soon as it stops validating (a failed write does not bring
   * it back), the oldest of a user's sessions past the cap once that is on
   * disk (a failed write does). Expiry is not told: whoever holds a session
   * knows its end.
   */
  onSessionsEnded: ((tokenHashes: string[]) => void) | undefined;
  #closed: Promise<void> | undefined;
  #droppedOfUnknownUsers = 0;

  private constructor(
    dataDir: string,
    lock: Deno.FsFile,
    now: () => number,
    users: Map<string, UserRecord>,
    sessions: Map<string, SessionRecord>,
  ) {
    this.#dataDir = dataDir;
    this.#lock = lock;
    this.#now = now;
    this.#users = users;
    this.#sessions = sessions;
    this.#usersWriter = new GroupWriter(
      join(dataDir, USERS_FILE),
      () => this.#renderUsers(),
    );
    this.#sessionsWriter = new GroupWriter(
      join(dataDir, SESSIONS_FILE),
      () => this.#renderSessions(),
    );
  }

  /**
   * Opens the store in `dataDir` (created if missing): takes the lock, removes
   * temp files a crash left, loads both files (missing = empty). Throws
   * {@linkcode StoreError} naming the file when one does not parse, or when
   * another server holds the lock.
   */
  static async open(
    dataDir: string,
    options: AuthStoreOptions = {},
  ): Promise<AuthStore> {
    const { now = Date.now } = options;
    // The runtime's own errors do not always name the path (not with
    // --allow-read/--allow-write, as the tasks run): say which directory.
    const named = (err: unknown) =>
      err instanceof Error && !(err instanceof StoreError) &&
        !err.message.includes(dataDir)
        ? new StoreError(`Cannot use data directory ${dataDir}: ${err.message}`)
        : err;
    const lockPath = join(dataDir, LOCK_FILE);
    let lock: Deno.FsFile | null;
    try {
      await Deno.mkdir(dataDir, { recursive: true, mode: 0o700 });
      lock = await tryLockFile(lockPath);
    } catch (err) {
      throw named(err);
    }
    if (lock === null) {
      throw new StoreError(
        `Cannot use data directory ${dataDir}: another auth server holds its lock file ${lockPath}`,
      );
    }
    try {
      await removeStaleTempFiles(dataDir);
      const users = await loadFile(join(dataDir, USERS_FILE), parseUsers);
      const sessions = await loadFile(
        join(dataDir, SESSIONS_FILE),
        parseSessions,
      );
      const store = new AuthStore(dataDir, lock, now, users, sessions);
      // A user deleted from users.json (by hand, while stopped) takes their
      // sessions along: they must not validate after the restart.
      store.#droppedOfUnknownUsers = store.#dropSessionsOfUnknownUsers();
      if (
        store.#dropExpiredSessions() + store.#droppedOfUnknownUsers > 0
      ) {
        await store.#sessionsWriter.commit();
      }
      return store;
    } catch (err) {
      lock.close();
      throw named(err);
    }
  }

  /** The data directory. */
  get dataDir(): string {
    return this.#dataDir;
  }

  /**
   * Group commit under load: while `busy()` says more changes are on their
   * way, a write waits for them, at most `maxDelayMs` after its first change.
   */
  setCommitDelay(maxDelayMs: number, busy: () => boolean): void {
    this.#usersWriter.setDelay(maxDelayMs, busy);
    this.#sessionsWriter.setDelay(maxDelayMs, busy);
  }

  /** Completed file writes since opening (both files), for the benchmark. */
  get fileWrites(): number {
    return this.#usersWriter.writes + this.#sessionsWriter.writes;
  }

  /** Number of users. */
  get userCount(): number {
    return this.#users.size;
  }

  /**
   * Sessions dropped when the store opened because `users.json` no longer
   * holds their user (the sessions file was rewritten without them).
   */
  get droppedSessionsOfUnknownUsers(): number {
    return this.#droppedOfUnknownUsers;
  }

  /** Number of sessions in memory (expired ones included until pruned). */
  get sessionCount(): number {
    return this.#sessions.size;
  }

  /** The user named `username`, compared case-insensitively. */
  getUser(username: string): UserRecord | undefined {
    return this.#users.get(username.toLowerCase());
  }

  /**
   * Adds a user and resolves once it is on disk. Returns false (and changes
   * nothing) when the name is taken, compared case-insensitively.
   */
  async addUser(user: UserRecord): Promise<boolean> {
    this.#assertOpen();
    const key = user.username.toLowerCase();
    if (this.#users.has(key)) return false;
    this.#users.set(key, Object.freeze(user));
    try {
      await this.#usersWriter.commit();
    } catch (err) {
      if (this.#users.get(key) === user) this.#users.delete(key);
      throw err;
    }
    return true;
  }

  /** Replaces a user's password hash and resolves once it is on disk. */
  async setPasswordHash(username: string, passwordHash: string): Promise<void> {
    this.#assertOpen();
    const key = username.toLowerCase();
    const user = this.#users.get(key);
    if (user === undefined) return;
    this.#users.set(
      key,
      Object.freeze({ ...user, password_hash: passwordHash }),
    );
    await this.#usersWriter.commit();
  }

  /**
   * The live session whose token hashes to `tokenHash`, or `undefined` if
   * unknown, expired or of a user that does not exist.
   */
  getSession(tokenHash: string): SessionRecord | undefined {
    const session = this.#sessions.get(tokenHash);
    if (session === undefined) return undefined;
    if (!this.#users.has(session.username.toLowerCase())) return undefined;
    if (session.expiresAtMs <= this.#now()) {
      // Dropped from memory now, from the file with the next write.
      this.#sessions.delete(tokenHash);
      return undefined;
    }
    return session;
  }

  /**
   * Adds a session and resolves once it is on disk. When its user would then
   * hold more than `maxPerUser` live sessions, the oldest of them end (in the
   * same write); returns how many ended.
   */
  async addSession(
    tokenHash: string,
    session: SessionRecord,
    maxPerUser = Infinity,
  ): Promise<number> {
    this.#assertOpen();
    const ended: [string, SessionRecord][] = [];
    if (maxPerUser < Infinity) {
      // A scan of all sessions: a login costs a slow password hash anyway,
      // and writes the whole file.
      const key = session.username.toLowerCase();
      const now = this.#now();
      const own: [string, SessionRecord][] = [];
      for (const entry of this.#sessions) {
        const s = entry[1];
        if (s.expiresAtMs > now && s.username.toLowerCase() === key) {
          own.push(entry);
        }
      }
      // Oldest first; the map's order is the order sessions were added.
      own.sort((a, b) => a[1].createdAt.localeCompare(b[1].createdAt));
      for (
        const entry of own.slice(0, Math.max(0, own.length + 1 - maxPerUser))
      ) {
        this.#sessions.delete(entry[0]);
        ended.push(entry);
      }
    }
    this.#sessions.set(tokenHash, Object.freeze(session));
    try {
      await this.#commitSessions();
    } catch (err) {
      if (this.#sessions.get(tokenHash) === session) {
        this.#sessions.delete(tokenHash);
      }
      for (const [hash, s] of ended) this.#sessions.set(hash, s);
      throw err;
    }
    if (ended.length > 0) this.onSessionsEnded?.(ended.map(([hash]) => hash));
    return ended.length;
  }

  /**
   * Removes a session (it stops validating at once) and resolves once the
   * removal is on disk, with the session removed; `undefined` when there was
   * no live session.
   */
  async removeSession(tokenHash: string): Promise<SessionRecord | undefined> {
    this.#assertOpen();
    // A removal whose write failed stays in effect, and is not "done" until
    // it is on disk: asking again writes again rather than answering that
    // there is no such session (a restart would otherwise bring it back).
    const session = this.getSession(tokenHash) ??
      this.#unsavedRemovals.get(tokenHash)?.session;
    if (session === undefined) return undefined;
    this.#sessions.delete(tokenHash);
    this.#unsavedRemovals.set(tokenHash, {
      session,
      seq: this.#sessionsSeq + 1,
    });
    this.onSessionsEnded?.([tokenHash]);
    await this.#commitSessions();
    return session;
  }

  /**
   * Writes the sessions file; once a write succeeds, the removals it
   * includes are saved (whichever change asked for it).
   */
  async #commitSessions(): Promise<void> {
    const seq = ++this.#sessionsSeq;
    await this.#sessionsWriter.commit();
    for (const [hash, removal] of this.#unsavedRemovals) {
      if (removal.seq <= seq) this.#unsavedRemovals.delete(hash);
    }
  }

  /** Drops expired sessions from memory and from the file; returns how many. */
  async pruneSessions(): Promise<number> {
    const dropped = this.#dropExpiredSessions();
    if (dropped > 0 && this.#closed === undefined) {
      await this.#commitSessions();
    }
    return dropped;
  }

  /**
   * Waits for pending writes (and tries once more to save removals whose
   * write failed), then releases the lock. Rejects with a
   * {@linkcode StoreError} naming the sessions file when that last try
   * fails: the revoked sessions it held would be valid again after a
   * restart. Idempotent.
   */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      let failure: unknown;
      try {
        await Promise.allSettled([
          this.#usersWriter.idle(),
          this.#sessionsWriter.idle(),
        ]);
        if (this.#unsavedRemovals.size > 0) {
          await this.#commitSessions().catch((err) => failure = err);
        }
      } finally {
        this.#lock.close();
      }
      if (failure === undefined) return;
      // Those past their end would not validate again anyway.
      const now = this.#now();
      let revoked = 0;
      for (const { session } of this.#unsavedRemovals.values()) {
        if (session.expiresAtMs > now) revoked++;
      }
      if (revoked === 0) return;
      throw new StoreError(
        `Cannot save ${join(this.#dataDir, SESSIONS_FILE)}: ${
          failure instanceof StorageError ? failure.reason : osReason(failure)
        }; ${revoked} revoked session${
          revoked === 1 ? "" : "s"
        } will be valid again after a restart`,
      );
    })();
    return this.#closed;
  }

  #assertOpen(): void {
    if (this.#closed !== undefined) {
      throw new Error("Cannot change the auth store: it is closed");
    }
  }

  #dropExpiredSessions(): number {
    const now = this.#now();
    let dropped = 0;
    for (const [hash, session] of this.#sessions) {
      if (session.expiresAtMs <= now) {
        this.#sessions.delete(hash);
        dropped++;
      }
    }
    return dropped;
  }

  #dropSessionsOfUnknownUsers(): number {
    let dropped = 0;
    for (const [hash, session] of this.#sessions) {
      if (!this.#users.has(session.username.toLowerCase())) {
        this.#sessions.delete(hash);
        dropped++;
      }
    }
    return dropped;
  }

  #renderUsers(): Uint8Array {
    return renderFile("users", this.#users, userJson);
  }

  #renderSessions(): Uint8Array {
    const now = this.#now();
    return renderFile(
      "sessions",
      this.#sessions,
      sessionJson,
      (s) => s.expiresAtMs > now,
    );
  }
}

function userJson(user: UserRecord): unknown {
  return user;
}

function sessionJson(session: SessionRecord): unknown {
  return {
    username: session.username,
    created_at: session.createdAt,
    expires_at: session.expiresAt,
  };
}

/** A member of a file's object, pretty-printed, and its length in UTF-8. */
interface RenderedMember {
  key: string;
  text: string;
  bytes: number;
}

/**
 * Members already printed, by the record they print: records are frozen (a
 * change replaces one), so a text stays right, and goes with its record
 * when that is dropped.
 */
const rendered = new WeakMap<object, RenderedMember>();

/** A record printed as a member of its file's object (see {@linkcode renderFile}). */
function memberOf<T extends object>(
  key: string,
  record: T,
  toJson: (record: T) => unknown,
): RenderedMember {
  let member = rendered.get(record);
  if (member === undefined || member.key !== key) {
    const text = `    ${JSON.stringify(key)}: ${
      JSON.stringify(toJson(record), null, 2).replaceAll("\n", "\n    ")
    }`;
    const bytes = ASCII_RE.test(text)
      ? text.length
      : encoder.encode(text).length;
    member = { key, text, bytes };
    rendered.set(record, member);
  }
  return member;
}

/**
 * `{"version": 1, "<name>": {<key>: <record>, ...}}` as `JSON.stringify(..,
 * null, 2)` prints it (keys in the map's order), encoded. Each record is
 * printed once, at the first write that holds it, and kept: a write of
 * 100,000 users copies their text (about 35 ms) instead of printing them all
 * again (about 130 ms, which every other request waited for). A server that
 * never writes a file never holds its texts: printing them at start cost the
 * read-only case a larger heap and its garbage collection (measured: 0.5 us
 * per delivered message in the big-data fan-out, from the auth server).
 */
function renderFile<T extends object>(
  name: string,
  records: Map<string, T>,
  toJson: (record: T) => unknown,
  keep: (record: T) => boolean = () => true,
): Uint8Array {
  const head = `{\n  "version": ${FILE_VERSION},\n  ${JSON.stringify(name)}: {`;
  const members: RenderedMember[] = [];
  let total = 0;
  for (const [key, record] of records) {
    if (!keep(record)) continue;
    const member = memberOf(key, record, toJson);
    members.push(member);
    total += member.bytes + 2;
  }
  const tail = members.length === 0 ? "}\n}\n" : "\n  }\n}\n";
  const out = new Uint8Array(head.length + total + tail.length + 1);
  let at = encoder.encodeInto(head, out).written;
  for (const [i, member] of members.entries()) {
    out.set(i === 0 ? NEWLINE : COMMA_NEWLINE, at);
    at += i === 0 ? 1 : 2;
    at += encoder.encodeInto(member.text, out.subarray(at)).written;
  }
  at += encoder.encodeInto(tail, out.subarray(at)).written;
  return out.subarray(0, at);
}

/**
 * Serialises writes of one file and groups them: every `commit()` made
 * while a write runs is satisfied by the single write that follows it.
 */
class GroupWriter {
  #path: string;
  #render: () => Uint8Array;
  #next: Deferred | undefined;
  #running: Promise<void> | undefined;
  #maxDelayMs = 0;
  #busy: () => boolean = () => false;
  writes = 0;

  constructor(path: string, render: () => Uint8Array) {
    this.#path = path;
    this.#render = render;
  }

  /** Resolves once a write that started after this call has completed. */
  commit(): Promise<void> {
    const batch = this.#next ??= deferred();
    this.#running ??= this.#drain();
    return batch.promise;
  }

  setDelay(maxDelayMs: number, busy: () => boolean): void {
    this.#maxDelayMs = maxDelayMs;
    this.#busy = busy;
  }

  /** Resolves when no write is running or pending. */
  async idle(): Promise<void> {
    while (this.#running !== undefined) await this.#running;
  }

  async #drain(): Promise<void> {
    try {
      let batch;
      while ((batch = this.#next) !== undefined) {
        while (
          this.#busy() && performance.now() - batch.openedAt < this.#maxDelayMs
        ) {
          await new Promise((resolve) => setTimeout(resolve, COMMIT_POLL_MS));
        }
        this.#next = undefined;
        try {
          // Rendered now: changes made from here on belong to the next batch.
          const bytes = this.#render();
          try {
            await writeFileAtomic(this.#path, bytes);
          } catch (err) {
            throw new StorageError(this.#path, err);
          }
          this.writes++;
          batch.resolve();
        } catch (err) {
          batch.reject(err);
        }
      }
    } finally {
      this.#running = undefined;
    }
  }
}

interface Deferred {
  openedAt: number;
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: unknown) => void;
}

function deferred(): Deferred {
  const { promise, resolve, reject } = Promise.withResolvers<void>();
  // A batch nobody awaits (a background prune) must not be an unhandled rejection.
  promise.catch(() => {});
  return { openedAt: performance.now(), promise, resolve, reject };
}

/**
 * Writes `bytes` to `path` so that a crash leaves the old or the new file,
 * never a torn one, and no temp file behind it on success or failure.
 */
async function writeFileAtomic(path: string, bytes: Uint8Array): Promise<void> {
  const dir = dirname(path);
  const random = crypto.getRandomValues(new Uint8Array(8));
  const suffix = Array.from(random, (b) => b.toString(16).padStart(2, "0"))
    .join("");
  const temp = join(dir, `.${basename(path)}.tmp-${suffix}`);
  try {
    const file = await Deno.open(temp, {
      write: true,
      createNew: true,
      mode: 0o600,
    });
    try {
      let written = 0;
      while (written < bytes.length) {
        written += await file.write(bytes.subarray(written));
      }
      await file.sync();
    } finally {
      file.close();
    }
    await Deno.rename(temp, path);
  } catch (err) {
    await Deno.remove(temp).catch(() => {});
    throw err;
  }
  const dirHandle = await Deno.open(dir, { read: true });
  try {
    await dirHandle.sync();
  } finally {
    dirHandle.close();
  }
}

async function removeStaleTempFiles(dataDir: string): Promise<void> {
  for await (const entry of Deno.readDir(dataDir)) {
    if (entry.isFile && TEMP_RE.test(entry.name)) {
      await Deno.remove(join(dataDir, entry.name));
    }
  }
}

async function loadFile<T>(
  path: string,
  parse: (data: unknown) => T,
): Promise<T> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return parse(undefined);
    throw new StoreError(
      `Cannot read ${path}: ${err instanceof Error ? err.message : err}`,
    );
  }
  let data: unknown;
  try {
    // Strict: bytes that are not UTF-8 would be read as U+FFFD and written
    // back that way, changing the file (a BOM is kept, and refused by JSON).
    data = JSON.parse(STRICT_UTF8.decode(bytes));
  } catch (err) {
    const reason = err instanceof TypeError
      ? "it is not UTF-8 text"
      : err instanceof Error
      ? err.message
      : String(err);
    throw new StoreError(
      `Cannot parse ${path}: ${
        oneLine(reason)
      } (the file is left as it is; fix or move it)`,
    );
  }
  try {
    return parse(data);
  } catch (err) {
    if (!(err instanceof FormatError)) throw err;
    throw new StoreError(
      `Cannot parse ${path}: ${err.message} (the file is left as it is; fix or move it)`,
    );
  }
}

const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** `text` with its control characters escaped, so a message stays one line. */
function oneLine(text: string): string {
  return text.replace(
    // deno-lint-ignore no-control-regex
    /[\u0000-\u001f\u007f]/g,
    (c) => JSON.stringify(c).slice(1, -1),
  );
}

/**
 * The OS's words in a failed file operation, on one line: the runtime's
 * message up to its `(os error N)`, without the paths it appends.
 */
function osReason(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return oneLine(/^.*?\(os error \d+\)/s.exec(message)?.[0] ?? message);
}

class FormatError extends Error {}

function parseUsers(data: unknown): Map<string, UserRecord> {
  const users = new Map<string, UserRecord>();
  if (data === undefined) return users;
  const entries = readVersioned(data, "users");
  for (const [key, value] of Object.entries(entries)) {
    if (
      !isRecord(value) || typeof value.username !== "string" ||
      typeof value.password_hash !== "string" ||
      typeof value.created_at !== "string"
    ) {
      throw new FormatError(
        `user "${key}" needs string username, password_hash and created_at`,
      );
    }
    // What the server itself writes, so that a hand edit gone wrong stops
    // the start rather than being rewritten, or locking its user out, in
    // silence.
    const lower = value.username.toLowerCase();
    const name = JSON.stringify(value.username.slice(0, 80));
    if (!USERNAME_RE.test(value.username)) {
      throw new FormatError(`user ${name} breaks the username rules`);
    }
    if (key !== lower) {
      throw new FormatError(
        `user ${name} is filed under "${
          key.slice(0, 80)
        }", not its lower-case name`,
      );
    }
    // (Keys are unique, so with each its name's lower case, names are too.)
    if (!isPasswordHashForm(value.password_hash)) {
      throw new FormatError(
        `user ${name} has a password_hash that is not an Argon2id PHC string`,
      );
    }
    if (Number.isNaN(Date.parse(value.created_at))) {
      throw new FormatError(`user ${name} has an unreadable created_at`);
    }
    users.set(
      lower,
      Object.freeze({
        username: value.username,
        password_hash: value.password_hash,
        created_at: value.created_at,
      }),
    );
  }
  return users;
}

function parseSessions(data: unknown): Map<string, SessionRecord> {
  const sessions = new Map<string, SessionRecord>();
  if (data === undefined) return sessions;
  const entries = readVersioned(data, "sessions");
  for (const [key, value] of Object.entries(entries)) {
    if (!TOKEN_HASH_RE.test(key)) {
      throw new FormatError(
        `session key "${key.slice(0, 80)}" is not a hex SHA-256`,
      );
    }
    if (
      !isRecord(value) || typeof value.username !== "string" ||
      typeof value.created_at !== "string" ||
      typeof value.expires_at !== "string"
    ) {
      throw new FormatError(
        `session "${key}" needs string username, created_at and expires_at`,
      );
    }
    const expiresAtMs = Date.parse(value.expires_at);
    if (Number.isNaN(expiresAtMs)) {
      throw new FormatError(`session "${key}" has an unreadable expires_at`);
    }
    sessions.set(
      key,
      Object.freeze({
        username: value.username,
        createdAt: value.created_at,
        expiresAt: value.expires_at,
        expiresAtMs,
      }),
    );
  }
  return sessions;
}

function readVersioned(
  data: unknown,
  field: string,
): Record<string, unknown> {
  if (!isRecord(data)) throw new FormatError("expected a JSON object");
  if (data.version !== FILE_VERSION) {
    throw new FormatError(
      `expected "version": ${FILE_VERSION}, found ${
        JSON.stringify(data.version)
      }`,
    );
  }
  const entries = data[field];
  if (!isRecord(entries)) {
    throw new FormatError(`expected "${field}" to be a JSON object`);
  }
  return entries;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
