// deno-lint-ignore-file no-console
/**
 * Entry point of `deno task chat`: the chat server alone.
 *
 * @module
 */
import {
  ConfigError,
  DEFAULT_AUTH_URL,
  httpAddress,
  ignoredFlagNotice,
  parseServerConfig,
  SERVER_USAGE,
} from "../config.ts";
import { createChatServer } from "./server.ts";

if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
  console.log(`Usage: deno task chat [options]\n\n${SERVER_USAGE}`);
  Deno.exit(0);
}

let config;
try {
  config = parseServerConfig("chat", Deno.args, (n) => Deno.env.get(n));
} catch (err) {
  if (!(err instanceof ConfigError)) throw err;
  console.error(`chat: ${err.message}\n\n${SERVER_USAGE}`);
  Deno.exit(2);
}

for (const flag of config.ignoredFlags) {
  console.error(ignoredFlagNotice("chat", flag));
}

const stop = new AbortController();
// SIGHUP: the terminal it runs in closed.
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  Deno.addSignalListener(signal, () => stop.abort());
}

let server;
try {
  server = await createChatServer({
    hostname: config.chatHost,
    port: config.chatPort,
    dataDir: config.dataDir,
    authUrl: config.authUrl ?? DEFAULT_AUTH_URL,
    allowedOrigins: config.allowedOrigins,
    publicUrl: config.chatPublicUrl,
    rateLimits: config.rateLimits,
    log: (line) => console.error(line),
  });
} catch (err) {
  console.error(
    `chat: cannot start: ${err instanceof Error ? err.message : err}`,
  );
  Deno.exit(1);
}
console.log(`chat: listening on ${httpAddress(server.hostname, server.port)}`);

if (!stop.signal.aborted) {
  await new Promise((resolve) =>
    stop.signal.addEventListener("abort", resolve)
  );
}
console.error("chat: shutting down");
await server.shutdown();
Deno.exit(0);
