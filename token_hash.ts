/**
 * The one form a session token is kept in, and told in: the SHA-256 of its
 * UTF-8, in hex. The auth server's sessions file and its session events use
 * it; the chat server matches the events against its tokens with it.
 *
 * @module
 */
import { createHash } from "node:crypto";

/** SHA-256 of a token's UTF-8, in hex (synchronous: a few microseconds). */
export function tokenHash(token: string): string {
  return createHash("sha256").update(token, "utf8").digest("hex");
}
