/**
 * The `chatroom` workflow (CONTRACT section 5): the menu `1) login
 * 2) register`, the `register` and `login` subcommands, then the chat.
 * Importable without side effects; `cli/main.ts` wires it to the process and
 * turns its result into the exit code.
 *
 * @module
 */
import { loginUser, registerUser, validateToken } from "./api.ts";
import { type CliArgs, parseCliArgs, USAGE } from "./args.ts";
import {
  ChatSession,
  type SessionEnd,
  type SessionState,
  unconfirmedTexts,
} from "./chat_session.ts";
import {
  CliError,
  EXIT_INTERRUPTED,
  EXIT_OK,
  EXIT_USAGE,
} from "./cli_error.ts";
import type { LineReader } from "./line_reader.ts";
import { promptSecret } from "./prompt_secret.ts";
import { VERSION } from "./version.ts";
import { USERNAME_RE } from "../username.ts";

/** What the workflow talks to; `cli/main.ts` passes the real process. */
export interface AppIo {
  /** Reads environment variables (`CHATROOM_AUTH_URL`). */
  env: (name: string) => string | undefined;
  /** The shared line reader, made on first use (so `--help` never reads stdin). */
  lines: () => LineReader;
  /** Writes a line to stdout (above the prompt when chatting). */
  out: (line: string) => void;
  /** Writes a line to stderr. */
  err: (line: string) => void;
  /** Whether the chat view is coloured. */
  color: boolean;
}

/** The message shown when the server no longer accepts the session. */
export const SESSION_EXPIRED = "session expired, please log in again";

/** Runs the client for `args`; resolves to the exit code. */
export async function runApp(args: string[], io: AppIo): Promise<number> {
  let parsed: CliArgs;
  try {
    parsed = parseCliArgs(args, io.env);
  } catch (err) {
    if (!(err instanceof CliError)) throw err;
    io.err(`chatroom: ${err.message}`);
    io.err(USAGE);
    return EXIT_USAGE;
  }
  switch (parsed.command) {
    case "help":
      io.out(USAGE);
      return EXIT_OK;
    case "version":
      io.out(`chatroom ${VERSION}`);
      return EXIT_OK;
    case "register":
      await registerFlow(parsed, io, { fromMenu: false });
      return EXIT_OK;
    case "login": {
      // An expired session goes back to login, as in the menu: the password
      // is asked again (the next stdin line with --password-stdin); input
      // that ends there is a failure, exit 1.
      const unsent: Unsent = { username: "", state: undefined };
      for (;;) {
        const end = await loginFlow(parsed, io, unsent);
        if (end === "quit") return EXIT_OK;
        if (end === "interrupted") return EXIT_INTERRUPTED;
        sessionExpired(io, unsent);
      }
    }
    case "menu":
      return await menuFlow(parsed, io);
  }
}

/**
 * The interactive menu. A failure is shown as one line and the menu comes
 * back. End of input, at the menu or at a username or password prompt it
 * led to, is the user being done: exit 0, whatever was tried before (the
 * contract's rule; scripts that need the outcome as an exit code use the
 * `login` and `register` subcommands).
 */
async function menuFlow(args: CliArgs, io: AppIo): Promise<number> {
  const unsent: Unsent = { username: "", state: undefined };
  for (;;) {
    io.out("1) login");
    io.out("2) register");
    const choice = await io.lines().readLine({ prompt: "Choose 1 or 2: " });
    if (choice === null) return EXIT_OK;
    const picked = choice.trim().toLowerCase();
    try {
      if (picked === "1" || picked === "login") {
        const end = await loginFlow(args, io, unsent);
        if (end === "quit") return EXIT_OK;
        if (end === "interrupted") return EXIT_INTERRUPTED;
        sessionExpired(io, unsent);
      } else if (picked === "2" || picked === "register") {
        await registerFlow(args, io, { fromMenu: true });
      } else if (picked !== "") {
        io.err(`chatroom: unknown choice "${choice.trim()}": type 1 or 2`);
      }
    } catch (err) {
      if (err instanceof EndOfInput) return EXIT_OK;
      if (!(err instanceof CliError) || err.endsProgram) throw err;
      for (const line of err.details) io.err(`chatroom: ${line}`);
      io.err(`chatroom: ${err.message}`);
    }
  }
}

/** Why the auth server refuses a name to register (its invalid_username). */
const USERNAME_RULE =
  "a username is 3 to 32 characters of A-Z, a-z, 0-9, _ . -";

async function registerFlow(
  args: CliArgs,
  io: AppIo,
  { fromMenu }: { fromMenu: boolean },
): Promise<void> {
  // A name that breaks the rules is refused before the password is asked,
  // in the server's words. Not in the menu driven by a script: the password
  // line it wrote would be read as the next menu choice (the server refuses
  // the name after it, with the same line).
  const early = !fromMenu || io.lines().interactive;
  const credentials = await askCredentials(args, io, (username) => {
    if (early && !USERNAME_RE.test(username)) {
      throw new CliError(
        `cannot register "${username}": ${USERNAME_RULE} (invalid_username)`,
      );
    }
  });
  const username = await registerUser(args.authUrl, credentials);
  io.out(`registered ${username}; you can now log in`);
}

/** Where a session that expired left off, for the next login of its user. */
interface Unsent {
  username: string;
  state: SessionState | undefined;
}

async function loginFlow(
  args: CliArgs,
  io: AppIo,
  unsent: Unsent,
): Promise<SessionEnd> {
  const credentials = await askCredentials(args, io);
  const login = await loginUser(args.authUrl, credentials);
  io.out(`logged in as ${login.username}`);
  // The same user again after an expiry takes up where the session left
  // off: its rooms, what they missed, and its unconfirmed messages (sent
  // with their client_id: the server stores each once).
  const same = unsent.username.toLowerCase() === login.username.toLowerCase();
  const pending = unsent.state?.pending.length ?? 0;
  if (!same && pending > 0) {
    io.err(
      `chatroom: ${pending} unsent message(s) of ${unsent.username} dropped`,
    );
  }
  const session = new ChatSession({
    ...(same && unsent.state !== undefined && { resume: unsent.state }),
    chatUrl: login.chatUrl,
    token: login.token,
    username: login.username,
    lines: io.lines(),
    color: io.color,
    // Short: the answer decides how soon the next reconnect is tried.
    checkSession: () =>
      validateToken(args.authUrl, login.token, { timeoutMs: 5_000 }),
  });
  const end = await session.run();
  unsent.username = login.username;
  unsent.state = end === "expired" ? session.state : undefined;
  return end;
}

function sessionExpired(io: AppIo, unsent: Unsent): void {
  io.err(`chatroom: ${SESSION_EXPIRED}`);
  // Their text too, in the order typed: the user may not log in again.
  const state = unsent.state;
  if (state !== undefined) {
    for (const line of unconfirmedTexts(state.outbox, new Map(state.pending))) {
      io.err(`chatroom: not sent yet: ${line}`);
    }
  }
  const pending = unsent.state?.pending.length ?? 0;
  if (pending > 0) {
    io.err(
      `chatroom: ${pending} message(s) not sent yet: they go out when you log in again as ${unsent.username}`,
    );
  }
}

async function askCredentials(
  args: CliArgs,
  io: AppIo,
  checkUsername: (username: string) => void = () => {},
): Promise<{ username: string; password: string }> {
  const lines = io.lines();
  let username = args.user;
  // An empty answer on a terminal asks again; a script's lines are taken
  // as they come, so that its password is not read as a menu choice.
  while (username === undefined || (username === "" && lines.interactive)) {
    const answer = await lines.readLine({ prompt: "Username: " });
    if (answer === null) throw new EndOfInput("no username given");
    username = answer.trim();
  }
  checkUsername(username);
  const password = await promptSecret(lines, "Password: ", {
    fromStdin: args.passwordStdin,
  });
  if (password === null) throw new EndOfInput("no password given");
  // A trailing carriage return from a Windows pipe is not part of it.
  return { username, password: password.replace(/\r$/, "") };
}

/** Input ended while a username or password was awaited. */
class EndOfInput extends CliError {
  constructor(what: string) {
    super(`${what}: the input ended`);
  }
}
