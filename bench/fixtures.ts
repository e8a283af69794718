/**
 * Data directories written before the servers start, so that the timed part
 * of the benchmark pays no password hash per client: users with placeholder
 * Argon2id hashes, sessions whose tokens only the benchmark knows, and, for
 * the "cost does not grow with data" scenario, a large chat history.
 *
 * Formats are the auth server's (`users.json`, `sessions.json`) and the chat
 * server's (`history/<room>.jsonl`, one wire-format message per line).
 *
 * @module
 */
import { tokenHash } from "../token_hash.ts";

/** A user the benchmark can connect as. */
export interface BenchUser {
  username: string;
  /** A valid session token (only for the first `sessions` users). */
  token: string;
}

/** Options of {@linkcode writeAuthFixtures}. */
export interface AuthFixtureOptions {
  /** Users in `users.json`. */
  users: number;
  /** How many of them (the first ones) get a session. */
  sessions: number;
  /** Session lifetime from now, in seconds. */
  ttlSeconds?: number;
  now?: Date;
}

/** The name of the benchmark's user number `i` (0-based). */
export function benchUsername(i: number): string {
  return `user${String(i + 1).padStart(6, "0")}`;
}

/**
 * Writes `users.json` and `sessions.json` into `dir` (mode 0600) and returns
 * the users that have a session, with their tokens.
 */
export async function writeAuthFixtures(
  dir: string,
  options: AuthFixtureOptions,
): Promise<BenchUser[]> {
  const { users, sessions, ttlSeconds = 7 * 86400, now = new Date() } = options;
  const createdAt = now.toISOString();
  const expiresAt = new Date(now.getTime() + ttlSeconds * 1000).toISOString();
  // Placeholder hashes: random bytes in the real PHC layout. Nobody logs in
  // as these users; one random block is sliced to keep 100k users fast.
  const random = new Uint8Array(48 * Math.min(users, 4096));
  for (let at = 0; at < random.length; at += 65536) {
    crypto.getRandomValues(random.subarray(at, at + 65536)); // its limit per call
  }
  const userEntries: Record<string, unknown> = {};
  for (let i = 0; i < users; i++) {
    const username = benchUsername(i);
    const at = 48 * (i % 4096);
    const salt = base64NoPad(random.subarray(at, at + 16));
    const hash = base64NoPad(random.subarray(at + 16, at + 48));
    userEntries[username.toLowerCase()] = {
      username,
      password_hash: `$argon2id$v=19$m=19456,t=2,p=1$${salt}$${hash}`,
      created_at: createdAt,
    };
  }
  const withSession: BenchUser[] = [];
  const sessionEntries: Record<string, unknown> = {};
  for (let i = 0; i < Math.min(sessions, users); i++) {
    const username = benchUsername(i);
    const token = newToken();
    sessionEntries[tokenHash(token)] = {
      username,
      created_at: createdAt,
      expires_at: expiresAt,
    };
    withSession.push({ username, token });
  }
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(
    `${dir}/users.json`,
    JSON.stringify({ version: 1, users: userEntries }),
    { mode: 0o600 },
  );
  await Deno.writeTextFile(
    `${dir}/sessions.json`,
    JSON.stringify({ version: 1, sessions: sessionEntries }),
    { mode: 0o600 },
  );
  return withSession;
}

/** Options of {@linkcode writeHistoryFixture}. */
export interface HistoryFixtureOptions {
  /** Messages in all, spread evenly over the rooms (the rest go to lobby). */
  messages: number;
  /** Rooms besides `lobby`. */
  rooms: number;
  /** Usernames cycled through as senders. */
  users: number;
  now?: Date;
}

/** Writes `history/<room>.jsonl` files under `dir`; returns the bytes written. */
export async function writeHistoryFixture(
  dir: string,
  options: HistoryFixtureOptions,
): Promise<number> {
  const { messages, rooms, users, now = new Date() } = options;
  const names = [
    "lobby",
    ...Array.from(
      { length: rooms },
      (_, i) => `room${String(i + 1).padStart(3, "0")}`,
    ),
  ];
  const perRoom = Math.floor(messages / names.length);
  await Deno.mkdir(`${dir}/history`, { recursive: true });
  const encoder = new TextEncoder();
  // Messages one second apart, ending a second ago.
  const firstMs = now.getTime() - 1000 * (perRoom + names.length);
  let bytes = 0;
  for (const [r, room] of names.entries()) {
    const count = r === 0 ? messages - perRoom * rooms : perRoom;
    const file = await Deno.open(`${dir}/history/${room}.jsonl`, {
      write: true,
      create: true,
      truncate: true,
      mode: 0o600,
    });
    try {
      let chunk = "";
      for (let i = 1; i <= count; i++) {
        chunk += JSON.stringify({
          type: "message",
          id: String(i),
          room,
          from: benchUsername((i * 7 + r) % users),
          text: `history message ${i} of #${room}: nothing to see here`,
          ts: new Date(firstMs + i * 1000).toISOString(),
        }) + "\n";
        if (chunk.length > 1 << 20 || i === count) {
          const data = encoder.encode(chunk);
          bytes += data.length;
          let written = 0;
          while (written < data.length) {
            written += await file.write(data.subarray(written));
          }
          chunk = "";
        }
      }
    } finally {
      file.close();
    }
  }
  return bytes;
}

function newToken(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return base64NoPad(bytes).replaceAll("+", "-").replaceAll("/", "_");
}

function base64NoPad(bytes: Uint8Array): string {
  let binary = "";
  for (const byte of bytes) binary += String.fromCharCode(byte);
  return btoa(binary).replace(/=+$/, "");
}
