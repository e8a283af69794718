// deno-lint-ignore-file no-console
/**
 * Auth benchmark (issue 2): `/validate_token` requests per second against an
 * auth server subprocess, and file writes per 100 concurrent registrations
 * (group commit at work) against an in-process server.
 *
 * ```
 * deno run --allow-net --allow-read --allow-write --allow-run --allow-env bench/auth_bench.ts [--seconds 5] [--clients 64] [--json FILE]
 * ```
 *
 * Targets: at least 10,000 validations/s; 100 registrations in at most 10 writes.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { createAuthServer } from "../auth/server.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    seconds: { type: "string", default: "5" },
    clients: { type: "string", default: "64" },
    rounds: { type: "string", default: "3" },
    json: { type: "string" },
  },
});
const seconds = Number(values.seconds);
const clients = Number(values.clients);
const rounds = Number(values.rounds);
const PASSWORD = "correct horse battery";

async function post(
  url: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<number> {
  const res = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
  await res.arrayBuffer();
  return res.status;
}

/** Registrations: 100 at once, `rounds` times, each on a fresh data dir. */
async function registrationWrites(): Promise<
  { writes: number[]; ms: number[]; ok: number[] }
> {
  const writes: number[] = [];
  const ms: number[] = [];
  const ok: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const dataDir = await Deno.makeTempDir({ prefix: "auth_bench_" });
    const server = await createAuthServer({
      port: 0,
      dataDir,
      chatUrl: "ws://127.0.0.1:1/ws",
      rateLimits: false,
      // 100 at once is past the default hashing line (4 + 64): let them all wait.
      limits: { maxHashWaiting: 96 },
    });
    try {
      const before = server.store.fileWrites;
      const start = performance.now();
      const statuses = await Promise.all(
        Array.from(
          { length: 100 },
          (_, i) =>
            post(`${server.url}/register`, {
              username: `bench${i}`,
              password: PASSWORD,
            }),
        ),
      );
      ms.push(performance.now() - start);
      writes.push(server.store.fileWrites - before);
      ok.push(statuses.filter((s) => s === 201).length);
    } finally {
      await server.shutdown();
      await Deno.remove(dataDir, { recursive: true });
    }
  }
  return { writes, ms, ok };
}

/** `/validate_token` from `clients` concurrent keep-alive loops against a subprocess server. */
async function validateThroughput(): Promise<
  { perSecond: number; requests: number; errors: number }
> {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_bench_" });
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-net",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      fileURLToPath(new URL("../auth/main.ts", import.meta.url)),
      "--port",
      "0",
      "--data-dir",
      dataDir,
    ],
    env: { RATE_LIMITS: "off", MALLOC_MMAP_THRESHOLD_: "1048576" },
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream())
    .getReader();
  let out = "";
  let url: string | undefined;
  while (url === undefined) {
    const { done, value } = await reader.read();
    if (done) throw new Error("The auth server ended before its ready line");
    out += value;
    url = out.match(/listening on (http:\/\/\S+)/)?.[1];
  }
  try {
    await post(`${url}/register`, { username: "bencher", password: PASSWORD });
    const res = await fetch(`${url}/login`, {
      method: "POST",
      body: JSON.stringify({ username: "bencher", password: PASSWORD }),
    });
    const session: unknown = await res.json();
    const token = typeof session === "object" && session !== null &&
        "token" in session && typeof session.token === "string"
      ? session.token
      : "";
    const target = `${url}/validate_token`;
    const headers = { authorization: `Bearer ${token}` };
    // Warm up connections and JIT.
    const warmEnd = performance.now() + 500;
    await Promise.all(
      Array.from({ length: clients }, async () => {
        while (performance.now() < warmEnd) await post(target, {}, headers);
      }),
    );
    let requests = 0;
    let errors = 0;
    const start = performance.now();
    const end = start + seconds * 1000;
    await Promise.all(
      Array.from({ length: clients }, async () => {
        while (performance.now() < end) {
          const status = await post(target, {}, headers);
          requests++;
          if (status !== 200) errors++;
        }
      }),
    );
    const elapsed = (performance.now() - start) / 1000;
    return { perSecond: requests / elapsed, requests, errors };
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await reader.cancel();
    await Deno.remove(dataDir, { recursive: true });
  }
}

const registrations = await registrationWrites();
const validate = await validateThroughput();
const maxWrites = Math.max(...registrations.writes);
const rows = [
  [
    "/validate_token req/s",
    Math.round(validate.perSecond).toString(),
    ">= 10000",
    validate.perSecond >= 10_000 && validate.errors === 0 ? "ok" : "MISSED",
  ],
  [
    "writes per 100 concurrent registrations",
    registrations.writes.join(", "),
    "<= 10",
    maxWrites <= 10 && registrations.ok.every((n) => n === 100)
      ? "ok"
      : "MISSED",
  ],
  [
    "100 registrations wall time (ms)",
    registrations.ms.map((m) => Math.round(m)).join(", "),
    "",
    "",
  ],
];
const widths = [0, 1, 2, 3].map((i) =>
  Math.max(...rows.map((r) => r[i]?.length ?? 0), 6)
);
for (const row of [["metric", "value", "target", "result"], ...rows]) {
  console.log(row.map((cell, i) => cell.padEnd(widths[i] ?? 0)).join("  "));
}
const result = {
  validate_token_per_second: Math.round(validate.perSecond),
  validate_token_requests: validate.requests,
  validate_token_errors: validate.errors,
  validate_token_clients: clients,
  registration_writes: registrations.writes,
  registration_ok: registrations.ok,
  registration_ms: registrations.ms.map((m) => Math.round(m)),
};
if (values.json !== undefined) {
  await Deno.writeTextFile(values.json, JSON.stringify(result, null, 2) + "\n");
}
