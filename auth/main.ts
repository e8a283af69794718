// deno-lint-ignore-file no-console
/**
 * Entry point of `deno task auth`: the auth server alone.
 *
 * @module
 */
import {
  ConfigError,
  httpAddress,
  ignoredFlagNotice,
  parseServerConfig,
  SERVER_USAGE,
  type ServerConfig,
} from "../config.ts";
import { authOptionsFromConfig, createAuthServer } from "./server.ts";

const USAGE = `Usage: deno task auth [options]\n\n${SERVER_USAGE}`;

if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
  console.log(USAGE);
  Deno.exit(0);
}

let config: ServerConfig;
try {
  config = parseServerConfig("auth", Deno.args, (name) => Deno.env.get(name));
} catch (err) {
  if (!(err instanceof ConfigError)) throw err;
  console.error(`auth: ${err.message}\n\n${USAGE}`);
  Deno.exit(2);
}

for (const flag of config.ignoredFlags) {
  console.error(ignoredFlagNotice("auth", flag));
}

if (config.chatPublicUrl === undefined && config.chatPort === 0) {
  // Only `deno task start` knows the port a chat server picked.
  console.error(
    "auth: CHAT_PORT is 0 and no chat URL is set: /login cannot hand out the chat server's address; set CHAT_PUBLIC_URL or --chat-url",
  );
}

// Before the store loads (a large one takes a while): a signal then ends the
// start cleanly instead of killing the process. SIGHUP: the terminal closed.
const stop = new AbortController();
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  Deno.addSignalListener(signal, () => {
    if (!stop.signal.aborted) stop.abort(signal);
  });
}

let server;
try {
  server = await createAuthServer(
    authOptionsFromConfig(config, { log: (line) => console.error(line) }),
  );
} catch (err) {
  console.error(
    `auth: cannot start: ${err instanceof Error ? err.message : err}`,
  );
  Deno.exit(1);
}

console.log(
  `auth: listening on ${httpAddress(server.hostname, server.port)}`,
);

if (!stop.signal.aborted) {
  await new Promise((resolve) =>
    stop.signal.addEventListener("abort", resolve)
  );
}
console.error(`auth: ${stop.signal.reason} received, shutting down`);
try {
  await server.shutdown();
} catch (err) {
  console.error(
    `auth: cannot shut down cleanly: ${
      err instanceof Error ? err.message : err
    }`,
  );
  Deno.exit(1);
}
Deno.exit(0);
