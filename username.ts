/**
 * The contract's rule for usernames, shared by the auth server (which
 * enforces it) and the chat server (which trusts no other from its auth
 * server's answers: a name goes into frames and log lines).
 *
 * @module
 */

/** 3 to 32 characters of `[A-Za-z0-9_.-]`. */
export const USERNAME_RE = /^[A-Za-z0-9_.-]{3,32}$/;
