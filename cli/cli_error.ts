/**
 * The one error type of the terminal client: a failure the user can cause or
 * meet, printed as one readable line (never a stack trace) with its exit code.
 *
 * @module
 */

/** Exit code of a normal end. */
export const EXIT_OK = 0;
/** Exit code of a failure (wrong password, server down, session expired...). */
export const EXIT_ERROR = 1;
/** Exit code of a command-line mistake. */
export const EXIT_USAGE = 2;
/**
 * Exit code after Ctrl+C: leaving a chat with Ctrl+C is a normal end, and the
 * contract knows only 0, 1 and 2 (not the shells' 130).
 */
export const EXIT_INTERRUPTED = 0;

// deno-lint-ignore no-control-regex
const LINE_BREAKING = /[\u0000-\u001f\u007f-\u009f\u2028\u2029]+/g;

/**
 * A failure shown to the user as `chatroom: <message>`. The message is kept
 * to one line: it may quote a server's answer or a name from the command
 * line, and neither may break the line or send terminal control sequences.
 */
export class CliError extends Error {
  override name = "CliError";
  /** The process exit code this failure ends with. */
  readonly exitCode: number;
  /**
   * Whether it ends the program even from the menu (the user interrupted:
   * Ctrl+C or a signal), rather than showing the menu again.
   */
  readonly endsProgram: boolean;
  /**
   * Lines shown before the message, each as `chatroom: <line>` (the text of
   * the messages the server never confirmed, so the user can copy them).
   */
  readonly details: readonly string[];
  /** Builds a failure with its exit code (1 unless told). */
  constructor(
    message: string,
    exitCode: number = EXIT_ERROR,
    options: { endsProgram?: boolean; details?: readonly string[] } = {},
  ) {
    super(oneLine(message));
    this.exitCode = exitCode;
    this.endsProgram = options.endsProgram ?? false;
    this.details = (options.details ?? []).map(oneLine);
  }
}

function oneLine(text: string): string {
  return text.replace(LINE_BREAKING, " ").trim();
}

/** The user pressed Ctrl+C while the client was reading a line. */
export class Interrupted extends Error {
  override name = "Interrupted";
  /** Builds the interruption error. */
  constructor() {
    super("Interrupted");
  }
}
