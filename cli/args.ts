/**
 * Command-line parsing of the `chatroom` client (CONTRACT section 5), with
 * `node:util` `parseArgs` in strict mode: `--auth-url` wins over
 * `CHATROOM_AUTH_URL`, then `AUTH_URL` (the contract's shared variable), then
 * the default auth address.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { CliError, EXIT_USAGE } from "./cli_error.ts";

/** Where the client finds the auth server when nothing else is said. */
export const DEFAULT_AUTH_URL = "http://127.0.0.1:8000";

/** The usage text, printed by `--help` and (on stderr) after a usage error. */
export const USAGE = `Usage:
  chatroom [--auth-url URL] [--user NAME]            interactive: menu 1) login 2) register
  chatroom register [--user NAME] [--password-stdin]
  chatroom login    [--user NAME] [--password-stdin]  then chat
  chatroom --help | --version

Options:
  --auth-url URL     the auth server (env CHATROOM_AUTH_URL or AUTH_URL,
                     default ${DEFAULT_AUTH_URL})
  --user NAME        the username (asked for when not given)
  --password-stdin   read the password from one line of stdin, without a prompt
  -h, --help         show this help
  -V, --version      show the version

In chat, type /help for the slash commands.`;

/** What the command line asks for. */
export type CliCommand = "menu" | "login" | "register" | "help" | "version";

/** The parsed command line. */
export interface CliArgs {
  command: CliCommand;
  authUrl: string;
  user: string | undefined;
  passwordStdin: boolean;
}

/**
 * Parses the arguments of `chatroom`. Throws {@linkcode CliError} with exit
 * code 2 for unknown flags, extra arguments or a malformed URL.
 */
export function parseCliArgs(
  args: string[],
  env: (name: string) => string | undefined = () => undefined,
): CliArgs {
  let parsed;
  try {
    parsed = parseArgs({
      // `deno task cli -- --help` hands the `--` on: it separates the task's
      // arguments from deno's, not chatroom's options from positionals.
      args: args[0] === "--" ? args.slice(1) : args,
      strict: true,
      allowPositionals: true,
      options: {
        "auth-url": { type: "string" },
        user: { type: "string" },
        "password-stdin": { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
        version: { type: "boolean", short: "V", default: false },
      },
    });
  } catch (err) {
    // parseArgs appends a long hint about "--" after the first sentence.
    const message = (err instanceof Error ? err.message : String(err))
      .split(". ")[0]!.replace(/\.$/, "");
    throw new CliError(lowerFirst(message), EXIT_USAGE);
  }
  const { values, positionals } = parsed;
  if (positionals.length > 1) {
    throw new CliError(
      `unexpected argument "${positionals[1]}"`,
      EXIT_USAGE,
    );
  }
  const sub = positionals[0];
  if (sub !== undefined && sub !== "login" && sub !== "register") {
    throw new CliError(`unknown command "${sub}"`, EXIT_USAGE);
  }
  const authUrl = values["auth-url"] ?? nonEmpty(env("CHATROOM_AUTH_URL")) ??
    nonEmpty(env("AUTH_URL")) ?? DEFAULT_AUTH_URL;
  checkAuthUrl(authUrl);
  // Trimmed as a typed answer is: a name never holds spaces.
  const user = values.user?.trim();
  if (user === "") throw new CliError("--user needs a name", EXIT_USAGE);
  const command: CliCommand = values.help
    ? "help"
    : values.version
    ? "version"
    : sub ?? "menu";
  return {
    command,
    authUrl: authUrl.replace(/\/+$/, ""),
    user,
    passwordStdin: values["password-stdin"],
  };
}

function lowerFirst(text: string): string {
  return /^[A-Z][a-z]/.test(text)
    ? text[0]!.toLowerCase() + text.slice(1)
    : text;
}

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value === "" ? undefined : value;
}

function checkAuthUrl(text: string): void {
  let url;
  try {
    url = new URL(text);
  } catch {
    throw new CliError(`cannot use auth URL "${text}": not a URL`, EXIT_USAGE);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new CliError(
      `cannot use auth URL "${text}": expected http: or https:`,
      EXIT_USAGE,
    );
  }
}
