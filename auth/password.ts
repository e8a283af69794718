/**
 * Password hashing with Argon2id through the runtime's `crypto.subtle`,
 * stored as PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`) so
 * the cost can be raised later and old hashes recognised.
 *
 * @module
 */
import { timingSafeEqual } from "node:crypto";

/** Argon2id cost parameters. */
export interface Argon2Params {
  /** Memory in KiB (`m`). */
  memory: number;
  /** Passes over memory (`t`). */
  passes: number;
  /** Lanes (`p`). */
  parallelism: number;
}

/** The cost every new hash uses (OWASP's first choice for Argon2id). */
export const CURRENT_PARAMS: Readonly<Argon2Params> = Object.freeze({
  memory: 19456,
  passes: 2,
  parallelism: 1,
});

/** Salt length in bytes. */
export const SALT_BYTES = 16;
/** Hash (tag) length in bytes. */
export const HASH_BYTES = 32;

/** A parsed PHC string. */
export interface PasswordHash {
  params: Argon2Params;
  salt: Uint8Array;
  hash: Uint8Array;
}

const encoder = new TextEncoder();
const PHC_RE =
  /^\$argon2id\$v=19\$m=(\d{1,7}),t=(\d{1,3}),p=(\d{1,2})\$([A-Za-z0-9+/]{11,})\$([A-Za-z0-9+/]{22,})$/;

/**
 * Argon2id of `password` with `salt`: the one place that speaks to
 * `crypto.subtle`, whose TypeScript types do not know these parameters.
 */
export async function argon2id(
  password: Uint8Array<ArrayBuffer>,
  salt: Uint8Array<ArrayBuffer>,
  params: Argon2Params,
  hashBytes: number = HASH_BYTES,
): Promise<Uint8Array> {
  const key = await crypto.subtle.importKey(
    "raw",
    password,
    "Argon2id",
    false,
    ["deriveBits"],
  );
  const algorithm: Algorithm & Record<string, unknown> = {
    name: "Argon2id",
    nonce: salt,
    memory: params.memory,
    passes: params.passes,
    parallelism: params.parallelism,
  };
  return new Uint8Array(
    await crypto.subtle.deriveBits(algorithm, key, hashBytes * 8),
  );
}

/** Hashes a password (NFC-normalised first) into a PHC string. */
export async function hashPassword(
  password: string,
  params: Argon2Params = CURRENT_PARAMS,
): Promise<string> {
  const salt = crypto.getRandomValues(new Uint8Array(SALT_BYTES));
  const hash = await argon2id(passwordBytes(password), salt, params);
  return formatPasswordHash({ params, salt, hash });
}

/**
 * Whether `password` matches the PHC string `stored`. A string that does not
 * parse never matches (after costing the same as one that does).
 */
export async function verifyPassword(
  password: string,
  stored: string,
): Promise<boolean> {
  const parsed = parsePasswordHash(stored);
  const target = parsed ?? parsePasswordHash(DUMMY_HASH);
  if (target === undefined) throw new Error("Cannot parse the dummy hash");
  const actual = await argon2id(
    passwordBytes(password),
    new Uint8Array(target.salt),
    target.params,
    target.hash.length,
  );
  return timingSafeEqual(actual, target.hash) && parsed !== undefined;
}

/** Whether a stored hash uses a lower cost than {@linkcode CURRENT_PARAMS}. */
export function needsRehash(stored: string): boolean {
  const parsed = parsePasswordHash(stored);
  if (parsed === undefined) return false;
  const { params, salt, hash } = parsed;
  return params.memory < CURRENT_PARAMS.memory ||
    params.passes < CURRENT_PARAMS.passes ||
    params.parallelism < CURRENT_PARAMS.parallelism ||
    salt.length < SALT_BYTES || hash.length < HASH_BYTES;
}

/**
 * Whether `text` has the form of an Argon2id PHC string we can verify:
 * exactly what {@linkcode parsePasswordHash} accepts, without decoding
 * (cheap enough to check every user at start).
 */
export function isPasswordHashForm(text: string): boolean {
  return phcParts(text) !== undefined;
}

/** Parses a PHC string, or returns `undefined` when it is not one we can verify. */
export function parsePasswordHash(text: string): PasswordHash | undefined {
  const parts = phcParts(text);
  if (parts === undefined) return undefined;
  const salt = decodeBase64(parts.saltText);
  const hash = decodeBase64(parts.hashText);
  if (salt === undefined || hash === undefined) return undefined;
  return { params: parts.params, salt, hash };
}

/**
 * The parameters and the base64 texts of a PHC string, checked so that the
 * texts decode (the pattern's minimum lengths make at least 8 bytes of salt
 * and 16 of hash) and Argon2id accepts the parameters.
 */
function phcParts(
  text: string,
): { params: Argon2Params; saltText: string; hashText: string } | undefined {
  const m = PHC_RE.exec(text);
  if (m === null) return undefined;
  const [, mem, t, p, saltText, hashText] = m;
  if (
    mem === undefined || t === undefined || p === undefined ||
    saltText === undefined || hashText === undefined
  ) return undefined;
  const params = {
    memory: Number(mem),
    passes: Number(t),
    parallelism: Number(p),
  };
  if (
    params.passes < 1 || params.parallelism < 1 ||
    params.memory < 8 * params.parallelism ||
    saltText.length % 4 === 1 || hashText.length % 4 === 1
  ) return undefined;
  return { params, saltText, hashText };
}

/** Formats a PHC string (base64 without padding, as the PHC format says). */
export function formatPasswordHash(
  { params, salt, hash }: PasswordHash,
): string {
  return `$argon2id$v=19$m=${params.memory},t=${params.passes},p=${params.parallelism}$${
    encodeBase64(salt)
  }$${encodeBase64(hash)}`;
}

/**
 * A well-formed hash no password matches (its tag is all zeros): verifying an
 * unknown user against it costs exactly what a known user costs.
 */
export const DUMMY_HASH: string = formatPasswordHash({
  params: CURRENT_PARAMS,
  salt: new Uint8Array(SALT_BYTES).fill(0x5a),
  hash: new Uint8Array(HASH_BYTES),
});

function passwordBytes(password: string): Uint8Array<ArrayBuffer> {
  return encoder.encode(password.normalize("NFC"));
}

function encodeBase64(bytes: Uint8Array): string {
  let binary = "";
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/=+$/, "");
}

function decodeBase64(text: string): Uint8Array | undefined {
  if (text.length % 4 === 1) return undefined;
  let binary: string;
  try {
    binary = atob(text + "=".repeat((4 - text.length % 4) % 4));
  } catch {
    return undefined;
  }
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}
