// deno-lint-ignore-file no-console
/**
 * Entry point of `deno task start`: the auth server and the chat server in
 * one process, until SIGINT or SIGTERM.
 *
 * The chat server starts first so that, with port 0, `/login` hands out its
 * real address; it checks tokens with the auth server started here, at that
 * server's real address (`AUTH_URL` is for `deno task chat` and the client,
 * which find the auth server elsewhere).
 *
 * @module
 */
import { createAuthServer } from "./auth/server.ts";
import { type ChatServer, createChatServer } from "./chat/server.ts";
import {
  ConfigError,
  defaultChatUrl,
  httpAddress,
  ignoredFlagNotice,
  parseServerConfig,
  SERVER_USAGE,
} from "./config.ts";

if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
  console.log(`Usage: deno task start [options]\n\n${SERVER_USAGE}`);
  Deno.exit(0);
}

let config;
try {
  config = parseServerConfig("start", Deno.args, (n) => Deno.env.get(n));
} catch (err) {
  if (!(err instanceof ConfigError)) throw err;
  console.error(`start: ${err.message}\n\n${SERVER_USAGE}`);
  Deno.exit(2);
}

for (const flag of config.ignoredFlags) {
  console.error(ignoredFlagNotice("start", flag));
}

const stop = new AbortController();
// SIGHUP: the terminal it runs in closed.
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  Deno.addSignalListener(signal, () => stop.abort());
}

const log = (line: string) => console.error(line);
let chat: ChatServer | undefined;
let auth: Awaited<ReturnType<typeof createAuthServer>> | undefined;
try {
  chat = await createChatServer({
    hostname: config.chatHost,
    port: config.chatPort,
    dataDir: config.dataDir,
    // Until the auth server listens, port 0 refuses: 503 auth_unavailable.
    authUrl: () => auth?.url ?? "http://127.0.0.1:0",
    allowedOrigins: config.allowedOrigins,
    publicUrl: config.chatPublicUrl,
    rateLimits: config.rateLimits,
    log,
    // The auth server below tells it of sessions that end early.
    sessionEvents: "in_process",
  });
  const chatUrl = config.chatPublicUrl ??
    defaultChatUrl(chat.hostname, chat.port);
  try {
    auth = await createAuthServer({
      hostname: config.authHost,
      port: config.authPort,
      dataDir: config.dataDir,
      chatUrl,
      sessionTtlSeconds: config.sessionTtlSeconds,
      rateLimits: config.rateLimits,
      log,
      // One process: a logout closes that session's chat connections at once.
      onSessionsEnded: (hashes) => chat?.endSessions(hashes),
    });
  } catch (err) {
    await chat.shutdown();
    throw err;
  }
} catch (err) {
  console.error(
    `start: cannot start: ${err instanceof Error ? err.message : err}`,
  );
  Deno.exit(1);
}
console.log(`auth: listening on ${httpAddress(auth.hostname, auth.port)}`);
console.log(`chat: listening on ${httpAddress(chat.hostname, chat.port)}`);

if (!stop.signal.aborted) {
  await new Promise((resolve) =>
    stop.signal.addEventListener("abort", resolve)
  );
}
console.error("start: shutting down");
await chat.shutdown();
try {
  await auth.shutdown();
} catch (err) {
  console.error(
    `auth: cannot shut down cleanly: ${
      err instanceof Error ? err.message : err
    }`,
  );
  Deno.exit(1);
}
Deno.exit(0);
