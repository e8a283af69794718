/**
 * The version of the `chatroom` terminal client, printed by `--version`.
 *
 * @module
 */

/** The client's version. */
export const VERSION = "0.1.0";
