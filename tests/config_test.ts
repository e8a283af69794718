import assert from "node:assert/strict";
import { ConfigError, parseServerConfig } from "../config.ts";

function envOf(vars: Record<string, string>) {
  return (name: string) => vars[name];
}

Deno.test("flags win over environment variables, which win over the defaults", () => {
  const env = envOf({ AUTH_PORT: "9100", CHAT_PORT: "9101", DATA_DIR: "/e" });
  const defaults = parseServerConfig("start", [], envOf({}));
  assert.equal(defaults.authPort, 8000);
  assert.equal(defaults.chatPort, 8001);
  assert.equal(defaults.dataDir, "./data");
  const fromEnv = parseServerConfig("start", [], env);
  assert.deepEqual([fromEnv.authPort, fromEnv.chatPort], [9100, 9101]);
  const fromFlags = parseServerConfig("auth", [
    "--port",
    "9200",
    "--data-dir",
    "/f",
  ], env);
  assert.equal(fromFlags.authPort, 9200);
  assert.equal(fromFlags.dataDir, "/f");
  assert.equal(parseServerConfig("chat", ["--port", "0"], env).chatPort, 0);
});

Deno.test("start takes --port: 0 picks both ports, N puts the chat server on N + 1", async (t) => {
  const env = envOf({ AUTH_PORT: "9100", CHAT_PORT: "9101" });
  await t.step("0", () => {
    const config = parseServerConfig("start", ["--port", "0"], env);
    assert.deepEqual([config.authPort, config.chatPort], [0, 0]);
  });
  await t.step("N", () => {
    const config = parseServerConfig("start", ["--port", "9000"], env);
    assert.deepEqual([config.authPort, config.chatPort], [9000, 9001]);
  });
  await t.step(
    "with --auth-port or --chat-port, or at 65535: a usage error",
    () => {
      for (
        const args of [
          ["--port", "0", "--chat-port", "1"],
          ["--port", "0", "--auth-port", "1"],
          ["--port", "65535"],
          ["--port", "x"],
        ]
      ) {
        assert.throws(() => parseServerConfig("start", args, env), ConfigError);
      }
    },
  );
});

Deno.test("a server does not stop for a variable it does not read (AUTH_URL for auth, SESSION_TTL and AUTH_PORT for chat)", () => {
  const env = envOf({ AUTH_URL: "not a url", SESSION_TTL: "abc" });
  assert.equal(
    parseServerConfig("auth", [], envOf({ AUTH_URL: "xx" })).authUrl,
    undefined,
  );
  assert.equal(
    parseServerConfig("start", [], envOf({ AUTH_URL: "xx" })).authUrl,
    undefined,
  );
  assert.throws(
    () => parseServerConfig("chat", [], env),
    /auth URL "not a url"/,
  );
  assert.equal(
    parseServerConfig("chat", [], envOf({ SESSION_TTL: "abc" }))
      .sessionTtlSeconds,
    86400,
  );
  assert.throws(() => parseServerConfig("auth", [], env), /session TTL "abc"/);
  // Nor for the auth server's port.
  const other = envOf({ AUTH_PORT: "x", AUTH_HOST: "" });
  assert.equal(parseServerConfig("chat", [], other).chatPort, 8001);
  assert.throws(() => parseServerConfig("auth", [], other), ConfigError);
  // The address /login hands out is both servers' (chat serves its path).
  for (const role of ["auth", "chat", "start"] as const) {
    assert.throws(
      () => parseServerConfig(role, [], envOf({ CHAT_PUBLIC_URL: "y" })),
      /chat URL "y"/,
    );
  }
  assert.throws(
    () => parseServerConfig("chat", ["--auth-url", "ftp://x"], envOf({})),
    ConfigError,
  );
});

Deno.test("ALLOWED_ORIGINS entries are origins as browsers send them; anything else is a usage error", () => {
  const config = parseServerConfig(
    "chat",
    [],
    envOf({
      ALLOWED_ORIGINS:
        " https://Chat.Example.com/ ,http://localhost:5173,*,chrome-extension://abcdef,tauri://localhost",
    }),
  );
  assert.deepEqual(config.allowedOrigins, [
    "https://chat.example.com",
    "http://localhost:5173",
    "*",
    "chrome-extension://abcdef",
    "tauri://localhost",
  ]);
  for (
    const bad of [
      "not an origin",
      "chat.example.com",
      "https://a.com/path",
      "file:///x",
      "null",
      "chrome-extension://abc/page.html",
    ]
  ) {
    assert.throws(
      () => parseServerConfig("start", [], envOf({ ALLOWED_ORIGINS: bad })),
      new RegExp(`ALLOWED_ORIGINS entry "${bad.replace(/[.*/]/g, "\\$&")}"`),
    );
  }
  // The auth server does not read it.
  assert.deepEqual(
    parseServerConfig("auth", [], envOf({ ALLOWED_ORIGINS: "bad" }))
      .allowedOrigins,
    [],
  );
});

Deno.test("each server's own --auth-port / --chat-port is its port; flags it has no use for are listed, not fatal", () => {
  const env = envOf({ AUTH_PORT: "9100", CHAT_PORT: "9101" });
  const auth = parseServerConfig("auth", ["--auth-port", "0"], env);
  assert.equal(auth.authPort, 0);
  assert.deepEqual(auth.ignoredFlags, []);
  // The auth server's --chat-port is that of the chat address it hands out.
  assert.equal(
    parseServerConfig("auth", ["--chat-port", "9300"], env).chatPort,
    9300,
  );
  const chat = parseServerConfig("chat", ["--chat-port", "0"], env);
  assert.equal(chat.chatPort, 0);
  assert.throws(
    () => parseServerConfig("auth", ["--port", "1", "--auth-port", "2"], env),
    ConfigError,
  );
  assert.throws(
    () => parseServerConfig("chat", ["--port", "1", "--chat-port", "2"], env),
    ConfigError,
  );
  assert.deepEqual(
    parseServerConfig("auth", ["--auth-url", "http://a:1", "--port", "0"], env)
      .ignoredFlags,
    ["--auth-url"],
  );
  assert.deepEqual(
    parseServerConfig("chat", [
      "--session-ttl",
      "5",
      "--auth-port",
      "1",
      "--chat-url",
      "ws://x:1/chat",
    ], env).ignoredFlags,
    ["--session-ttl", "--auth-port"],
  );
  assert.deepEqual(
    parseServerConfig("start", ["--auth-url", "http://a:1"], env).ignoredFlags,
    ["--auth-url"],
  );
});

Deno.test("an empty environment variable counts as unset", () => {
  const empty = envOf({
    AUTH_HOST: "",
    AUTH_PORT: "",
    CHAT_HOST: "",
    CHAT_PORT: "",
    CHAT_PUBLIC_URL: "",
    DATA_DIR: "",
    AUTH_URL: "",
    SESSION_TTL: "",
    RATE_LIMITS: "",
    ALLOWED_ORIGINS: "",
  });
  for (const role of ["auth", "chat", "start"] as const) {
    const config = parseServerConfig(role, [], empty);
    assert.deepEqual(
      { ...config, ignoredFlags: [] },
      { ...parseServerConfig(role, [], envOf({})), ignoredFlags: [] },
      role,
    );
    assert.equal(config.dataDir, "./data");
    assert.equal(config.rateLimits, true);
  }
});

Deno.test("the chat server reads CHAT_PUBLIC_URL (its path is served too)", () => {
  const env = envOf({ CHAT_PUBLIC_URL: "wss://chat.example.com/chat" });
  assert.equal(
    parseServerConfig("chat", [], env).chatPublicUrl,
    "wss://chat.example.com/chat",
  );
  assert.equal(
    parseServerConfig("chat", ["--chat-url", "ws://127.0.0.1:1/x"], env)
      .chatPublicUrl,
    "ws://127.0.0.1:1/x",
  );
});
