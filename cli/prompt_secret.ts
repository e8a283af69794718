/**
 * Reading a password: without echo on a terminal (the shared
 * {@linkcode LineReader} switches raw mode on for the read and restores it in
 * `finally`, Ctrl+C included), from one line of stdin otherwise.
 *
 * @module
 */
import type { LineReader } from "./line_reader.ts";

/** Options of {@linkcode promptSecret}. */
export interface PromptSecretOptions {
  /** Read one line without showing a prompt (`--password-stdin`). */
  fromStdin?: boolean;
  /** Ends the wait early. */
  signal?: AbortSignal;
}

/**
 * Reads a secret line through `reader`; `null` at end of input. Rejects with
 * `Interrupted` when Ctrl+C is pressed.
 */
export function promptSecret(
  reader: LineReader,
  message: string = "Password: ",
  options: PromptSecretOptions = {},
): Promise<string | null> {
  const { fromStdin = false, signal } = options;
  return reader.readLine({
    prompt: fromStdin ? "" : message,
    echo: false,
    ...(signal !== undefined && { signal }),
  });
}
