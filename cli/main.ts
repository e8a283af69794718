// deno-lint-ignore-file no-console
/**
 * The `chatroom` terminal client: wiring only. It reads `Deno.args` and the
 * environment, builds the shared line reader over stdin, runs the workflow
 * of `cli/app.ts`, and exits with its code. Every failure ends as one line on
 * stderr, never a stack trace, and the terminal always leaves raw mode.
 *
 * @module
 */
import { runApp } from "./app.ts";
import {
  CliError,
  EXIT_ERROR,
  EXIT_INTERRUPTED,
  Interrupted,
} from "./cli_error.ts";
import { LineReader } from "./line_reader.ts";
import { shouldColor } from "./render.ts";

let reader: LineReader | null = null;

function env(name: string): string | undefined {
  try {
    return Deno.env.get(name);
  } catch {
    // Without permission for a variable, it is as if it were unset.
    return undefined;
  }
}

function lines(): LineReader {
  reader ??= new LineReader({
    input: Deno.stdin.readable,
    output: Deno.stdout,
    terminal: Deno.stdin.isTerminal()
      ? {
        setRaw: (on) => Deno.stdin.setRaw(on),
        columns: () => Deno.consoleSize().columns,
        // No cursor movement where it would show as garbage, or where the
        // lines printed (stdout) and the input drawn (stderr) cannot be
        // kept apart: `chatroom | tee log`.
        plain: env("TERM") === "dumb" || !Deno.stdout.isTerminal(),
      }
      : null,
    editorOutput: Deno.stdout.isTerminal() ? Deno.stdout : Deno.stderr,
  });
  return reader;
}

function exit(code: number): never {
  reader?.close();
  Deno.exit(code);
}

function fail(err: unknown): never {
  if (err instanceof Interrupted) exit(EXIT_INTERRUPTED);
  reader?.close();
  if (err instanceof CliError) {
    for (const line of err.details) console.error(`chatroom: ${line}`);
    console.error(`chatroom: ${err.message}`);
    exit(err.exitCode);
  }
  if (err instanceof Deno.errors.BrokenPipe) {
    // Whatever read the output is gone (`chatroom ... | head -1`).
    console.error("chatroom: the output was closed");
    exit(EXIT_ERROR);
  }
  const message = err instanceof Error ? err.message : String(err);
  console.error(`chatroom: unexpected error: ${message.split("\n")[0]}`);
  exit(EXIT_ERROR);
}

globalThis.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  fail(event.reason);
});
globalThis.addEventListener("error", (event) => {
  event.preventDefault();
  fail(event.error);
});
// A signal ends the client as Ctrl+C does: in the chat, the connection is
// closed with 1000, and messages the server has not confirmed are reported
// (exit 1); elsewhere (logging in, the menu) it exits at once. A second
// signal a second or more later does not wait for the first to finish (one
// Ctrl+C on a terminal in line mode under `deno task` arrives twice: from the
// terminal and forwarded by the task runner). Exit codes stay those of the
// contract (0, 1, 2), not the shells' 128 + N.
let signalledAt: number | undefined;
const onSignal = () => {
  if (signalledAt === undefined) {
    signalledAt = Date.now();
    if (reader?.interrupt()) return;
  } else if (Date.now() - signalledAt < 1000) return;
  exit(EXIT_INTERRUPTED);
};
Deno.addSignalListener("SIGINT", onSignal);
if (Deno.build.os !== "windows") {
  Deno.addSignalListener("SIGTERM", onSignal);
  Deno.addSignalListener("SIGHUP", onSignal);
  if (Deno.stdin.isTerminal()) {
    Deno.addSignalListener("SIGWINCH", () => reader?.resized());
  }
}

try {
  const code = await runApp(Deno.args, {
    env,
    lines,
    out: (line) => reader !== null ? reader.print(line) : console.log(line),
    err: (line) => console.error(line),
    color: shouldColor({
      noColor: env("NO_COLOR"),
      term: env("TERM"),
      isTerminal: Deno.stdout.isTerminal(),
    }),
  });
  exit(code);
} catch (err) {
  fail(err);
}
