import assert from "node:assert/strict";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createAuthServer } from "../auth/server.ts";
import {
  connectUntilRefused,
  LineWatcher,
  retryUntil,
  statusWithin,
  stopChild,
  terminatesCleanly,
} from "./_harness.ts";

const MAIN = fileURLToPath(new URL("../auth/main.ts", import.meta.url));
const PASSWORD = "correct horse battery";

interface AuthProcess {
  child: Deno.ChildProcess;
  /** Base URL from the ready line, or `undefined` if the process ended without one. */
  url: string | undefined;
  readyLine: string | undefined;
  /** Resolves when the process has ended and its output has been read. */
  ended: Promise<
    { code: number; signal: string | null; stdout: string; stderr: string }
  >;
}

/** Starts `auth/main.ts` in a subprocess and waits for its ready line (or its end). */
async function spawnAuth(
  args: string[],
  env: Record<string, string> = {},
): Promise<AuthProcess> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-net",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      MAIN,
      ...args,
    ],
    // The glibc setting our tasks use, so freed hash memory goes back to the OS.
    env: { RATE_LIMITS: "off", MALLOC_MMAP_THRESHOLD_: "1048576", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const lines = child.stdout.pipeThrough(new TextDecoderStream())
    .getReader();
  let stdout = "";
  let readyLine: string | undefined;
  while (readyLine === undefined) {
    const { done, value } = await lines.read();
    if (done) break;
    stdout += value;
    readyLine = stdout.split("\n").find((l) => l.includes("listening on"));
  }
  const rest = (async () => {
    while (true) {
      const { done, value } = await lines.read();
      if (done) return;
      stdout += value;
    }
  })();
  const ended = Promise.all([child.status, rest, stderr]).then((
    [status, , err],
  ) => ({ code: status.code, signal: status.signal, stdout, stderr: err }));
  const url = readyLine?.match(/listening on (http:\/\/\S+)/)?.[1];
  return { child, url, readyLine, ended };
}

async function post(
  url: string,
  path: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  const value: unknown = text === "" ? {} : JSON.parse(text);
  assert.ok(typeof value === "object" && value !== null);
  return { status: res.status, body: { ...value } };
}

async function readJsonFile(path: string): Promise<Record<string, unknown>> {
  const value: unknown = JSON.parse(await Deno.readTextFile(path));
  assert.ok(typeof value === "object" && value !== null);
  return { ...value };
}

async function countEntries(path: string, field: string): Promise<number> {
  const file = await readJsonFile(path);
  assert.equal(file.version, 1);
  const entries = file[field];
  assert.ok(typeof entries === "object" && entries !== null);
  return Object.keys(entries).length;
}

/** `VmRSS` and `VmHWM` (peak RSS) of a process, in bytes, read with `cat` (Deno needs --allow-all for /proc). */
async function memoryOf(pid: number): Promise<{ rss: number; peak: number }> {
  const out = await new Deno.Command("cat", {
    args: [`/proc/${pid}/status`],
    stdout: "piped",
  }).output();
  const status = new TextDecoder().decode(out.stdout);
  const kib = (name: string) =>
    Number(
      status.match(new RegExp(`^${name}:\\s+(\\d+) kB$`, "m"))?.[1] ?? NaN,
    ) *
    1024;
  return { rss: kib("VmRSS"), peak: kib("VmHWM") };
}

Deno.test("the entry point prints its ready line and exits 0 on SIGTERM, SIGINT and SIGHUP with its files intact", async (t) => {
  for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"] as const) {
    await t.step(signal, async () => {
      const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
      try {
        const proc = await spawnAuth([
          "--host",
          "127.0.0.1",
          "--port",
          "0",
          "--data-dir",
          dataDir,
        ]);
        assert.ok(proc.url, "ready line");
        assert.match(
          proc.readyLine ?? "",
          /^auth: listening on http:\/\/127\.0\.0\.1:[1-9]\d*$/,
        );
        const health = await fetch(`${proc.url}/health`);
        assert.deepEqual(await health.json(), { status: "ok" });
        const registrations = await Promise.all(
          ["ann", "ben", "cat"].map((username) =>
            post(proc.url ?? "", "/register", { username, password: PASSWORD })
          ),
        );
        assert.deepEqual(registrations.map((r) => r.status), [201, 201, 201]);
        const login = await post(proc.url, "/login", {
          username: "ann",
          password: PASSWORD,
        });
        assert.equal(login.status, 200);
        proc.child.kill(signal);
        const { code, stderr } = await proc.ended;
        assert.equal(code, 0, stderr);
        assert.equal(
          await countEntries(join(dataDir, "users.json"), "users"),
          3,
        );
        assert.equal(
          await countEntries(join(dataDir, "sessions.json"), "sessions"),
          1,
        );
        assert.match(stderr, /auth register ok user=ann addr=127\.0\.0\.1/);
        assert.match(stderr, /auth login ok user=ann addr=127\.0\.0\.1/);
        assert.ok(!stderr.includes(PASSWORD));
        assert.ok(!stderr.includes(String(login.body.token)));
      } finally {
        await Deno.remove(dataDir, { recursive: true });
      }
    });
  }
});

Deno.test("SIGTERM ends the entry point with exit 0 even while a client stalls in the middle of a body", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
  let client: Deno.TcpConn | undefined;
  try {
    const proc = await spawnAuth(["--port", "0", "--data-dir", dataDir]);
    assert.ok(proc.url, "ready line");
    const { hostname, port } = new URL(proc.url);
    client = await Deno.connect({ hostname, port: Number(port) });
    await client.write(
      new TextEncoder().encode(
        'POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"user',
      ),
    );
    // Another request answered: the server is serving, the stalled one open.
    const health = await fetch(`${proc.url}/health`);
    assert.equal(health.status, 200);
    await health.body?.cancel();
    proc.child.kill("SIGTERM");
    // A hang here (before the fix: until the client left) fails the test.
    await statusWithin(proc.child, 15_000).catch((err) => {
      proc.child.kill("SIGKILL");
      throw err;
    });
    const { code, stderr } = await proc.ended;
    assert.equal(code, 0, stderr);
  } finally {
    client?.close();
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("out of file descriptors, the entry point does not crash, and answers again once they are free", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
  const child = new Deno.Command("sh", {
    args: [
      "-c",
      `ulimit -n 64 && exec "${Deno.execPath()}" run --allow-net --allow-read --allow-write --allow-env "${MAIN}" --port 0 --data-dir "${dataDir}"`,
    ],
    env: { RATE_LIMITS: "off" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stdout = new LineWatcher(child.stdout);
  const stderr = new LineWatcher(child.stderr);
  let held: Deno.TcpConn[] = [];
  try {
    const url = (await stdout.waitFor(/^auth: listening on /)).split(" ")
      .pop()!;
    held = await connectUntilRefused(
      Number(new URL(url).port),
      () => stderr.lines.some((l) => l.includes("auth listener stopped")),
    ).catch((err) => {
      // What the server said, for a run where its limit was never reached.
      throw new Error(
        `${err.message}; its stderr:\n${stderr.lines.join("\n")}`,
      );
    });
    await stderr.waitFor(
      /^\S+ auth listener stopped reason=".*Too many open files/,
    );
    for (const conn of held.splice(0)) conn.close();
    // Listening again (asked until it answers; the first retry is 100 ms on).
    const health = await retryUntil(() => fetch(`${url}/health`), 10_000);
    assert.deepEqual(await health.json(), { status: "ok" });
    await stderr.waitFor(/^\S+ auth listener accepting connections again$/);
    await terminatesCleanly(child, stdout, stderr);
  } finally {
    for (const conn of held) conn.close();
    await stopChild(child);
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("kill -9 in the middle of a burst of registrations loses no registration answered 201", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
  try {
    const proc = await spawnAuth(["--port", "0", "--data-dir", dataDir]);
    const url = proc.url;
    assert.ok(url);
    const acknowledged: string[] = [];
    const { promise: enough, resolve: killNow } = Promise.withResolvers<void>();
    const burst = Array.from({ length: 100 }, async (_, i) => {
      const username = `burst${i}`;
      try {
        const answer = await post(url, "/register", {
          username,
          password: PASSWORD,
        });
        if (answer.status === 201) {
          // A 201 read after the kill was still sent before it: it counts.
          acknowledged.push(username);
          if (acknowledged.length === 30) killNow();
        }
      } catch {
        // The connection died with the server: not acknowledged.
      }
    });
    await Promise.race([enough, Promise.all(burst)]);
    proc.child.kill("SIGKILL");
    await Promise.all(burst);
    const { signal } = await proc.ended;
    assert.equal(signal, "SIGKILL");
    assert.ok(acknowledged.length >= 30, `${acknowledged.length} acknowledged`);
    assert.ok(
      acknowledged.length < 100,
      "the kill came before the end of the burst",
    );

    // Both files parse (or were never written), and a new server accepts every acknowledged user.
    for (const name of ["users.json", "sessions.json"]) {
      const path = join(dataDir, name);
      const text = await Deno.readTextFile(path).catch(() => undefined);
      if (text !== undefined) JSON.parse(text);
    }
    const server = await createAuthServer({
      port: 0,
      dataDir,
      chatUrl: "ws://x/ws",
      rateLimits: false,
    });
    try {
      // In batches: more than 68 logins at once would meet the hashing bound.
      const statuses: number[] = [];
      for (let i = 0; i < acknowledged.length; i += 32) {
        const logins = await Promise.all(
          acknowledged.slice(i, i + 32).map((username) =>
            post(server.url, "/login", { username, password: PASSWORD })
          ),
        );
        statuses.push(...logins.map((l) => l.status));
      }
      assert.deepEqual(statuses, acknowledged.map(() => 200));
    } finally {
      await server.shutdown();
    }
    for await (const entry of Deno.readDir(dataDir)) {
      assert.ok(!entry.name.includes(".tmp-"), `left over: ${entry.name}`);
    }
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("a file that does not parse makes the entry point exit 1 with one line naming it, and stays unchanged", async (t) => {
  const utf8 = new TextEncoder();
  // A well-formed file but for two bytes in a username that are not UTF-8
  // (in place of each `@`): read leniently, they would become U+FFFD and be
  // written back that way.
  const notUtf8 = (name: string) =>
    Uint8Array.from(
      (name === "users.json"
        ? '{"version": 1, "users": {"ab@": {"username": "ab@", ' +
          '"password_hash": "x", "created_at": "2026-01-01T00:00:00.000Z"}}}'
        : `{"version": 1, "sessions": {"${"a".repeat(64)}": {"username": ` +
          '"ab@", "created_at": "2026-01-01T00:00:00.000Z", ' +
          '"expires_at": "2099-01-01T00:00:00.000Z"}}}')
        .split("@")
        .flatMap((
          part,
          i,
        ) => [...(i > 0 ? [0xff, 0xfe] : []), ...utf8.encode(part)]),
    );
  const cases: [string, (name: string) => Uint8Array][] = [
    ["truncated", () => utf8.encode('{"version": 1, "oops"')],
    // V8's message quotes the text, newline and all.
    ["garbage and a newline", () => utf8.encode("garbage\n")],
    ["not UTF-8", notUtf8],
  ];
  for (const name of ["users.json", "sessions.json"]) {
    for (const [what, make] of cases) {
      await t.step(`${name}: ${what}`, async () => {
        const content = make(name);
        const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
        try {
          const path = join(dataDir, name);
          await Deno.writeFile(path, content);
          const proc = await spawnAuth(["--port", "0", "--data-dir", dataDir]);
          assert.equal(proc.url, undefined);
          const { code, stderr, stdout } = await proc.ended;
          assert.equal(code, 1);
          assert.equal(stdout, "");
          assert.ok(stderr.includes(path), stderr);
          assert.equal(stderr.trim().split("\n").length, 1, stderr);
          assert.ok(!/\n\s+at /.test(stderr), "no stack trace");
          assert.deepEqual(await Deno.readFile(path), content);
        } finally {
          await Deno.remove(dataDir, { recursive: true });
        }
      });
    }
  }
});

Deno.test("a second entry point on the same data directory refuses to start, and the first keeps serving", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
  try {
    const first = await spawnAuth(["--port", "0", "--data-dir", dataDir]);
    assert.ok(first.url);
    const second = await spawnAuth(["--port", "0", "--data-dir", dataDir]);
    assert.equal(second.url, undefined);
    const { code, stderr } = await second.ended;
    assert.equal(code, 1);
    assert.match(stderr, /another auth server holds its lock/);
    assert.ok(stderr.includes(dataDir));
    const health = await fetch(`${first.url}/health`);
    assert.equal(health.status, 200);
    await health.body?.cancel();
    first.child.kill("SIGTERM");
    assert.equal((await first.ended).code, 0);
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

Deno.test("100 parallel logins keep memory bounded while /validate_token stays responsive; at least 68 are served, the rest get 503 busy", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
  try {
    const proc = await spawnAuth(["--port", "0", "--data-dir", dataDir]);
    const url = proc.url;
    assert.ok(url);
    const pid = proc.child.pid;
    assert.equal(
      (await post(url, "/register", { username: "quinn", password: PASSWORD }))
        .status,
      201,
    );
    const first = await post(url, "/login", {
      username: "quinn",
      password: PASSWORD,
    });
    const token = String(first.body.token);
    const before = await memoryOf(pid);
    let loginsDone = false;
    const logins = Promise.all(
      Array.from(
        { length: 100 },
        () => post(url, "/login", { username: "quinn", password: PASSWORD }),
      ),
    ).finally(() => loginsDone = true);
    const latencies: number[] = [];
    while (!loginsDone) {
      const start = performance.now();
      const check = await post(url, "/validate_token", { token });
      latencies.push(performance.now() - start);
      assert.equal(check.status, 200);
    }
    const answers = await logins;
    const after = await memoryOf(pid);
    proc.child.kill("SIGTERM");
    const { code } = await proc.ended;
    assert.equal(code, 0);

    const statuses = answers.map((a) => a.status);
    assert.ok(
      statuses.every((s) => s === 200 || s === 503),
      statuses.join(),
    );
    // Logins arrive over time and early ones may finish first: at least 68 are served.
    assert.ok(
      statuses.filter((s) => s === 200).length >= 68,
      statuses.join(),
    );
    const slowest = Math.max(...latencies);
    const mib = (n: number) => Math.round(n / 1048576);
    const report = `peak RSS ${mib(before.peak)} -> ${mib(after.peak)} MiB, ${
      mib(after.rss)
    } MiB after; ${latencies.length} validations during the logins, slowest ${
      Math.round(slowest)
    } ms`;
    // Each hash holds 19 MiB and 4 compute at once; 100 unbounded took 2.2 GiB.
    assert.ok(after.peak - before.rss < 300 * 1048576, report);
    assert.ok(latencies.length >= 5, report);
    assert.ok(slowest < 1000, report);
  } finally {
    await Deno.remove(dataDir, { recursive: true });
  }
});

/** Runs a server entry point (`auth/main.ts` unless told) to its end. */
async function runEntry(
  args: string[],
  entry = MAIN,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-env",
      "--allow-read",
      "--allow-write",
      "--allow-net",
      entry,
      ...args,
    ],
    stdin: "null",
  }).output();
  const text = new TextDecoder();
  return {
    code: out.code,
    stdout: text.decode(out.stdout),
    stderr: text.decode(out.stderr),
  };
}

Deno.test("--help prints the usage and exits 0; a bad flag exits 2 with the usage", async () => {
  const help = await runEntry(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /--data-dir DIR/);
  const bad = await runEntry(["--port", "nope"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /port "nope"/);
  assert.match(bad.stderr, /--data-dir DIR/);
});

Deno.test("-h is --help for every server entry point; a flag the server has no use for gets a notice, not a refusal", async (t) => {
  for (const entry of ["../main.ts", "../auth/main.ts", "../chat/main.ts"]) {
    await t.step(entry, async () => {
      const help = await runEntry(
        ["-h"],
        fileURLToPath(new URL(entry, import.meta.url)),
      );
      assert.equal(help.code, 0);
      assert.match(help.stdout, /--data-dir DIR/);
    });
  }
  await t.step("auth --auth-url", async () => {
    const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
    try {
      const proc = await spawnAuth([
        "--auth-port",
        "0",
        "--data-dir",
        dataDir,
        "--auth-url",
        "http://127.0.0.1:9",
      ]);
      assert.ok(proc.url, "it starts, on a free port");
      assert.notEqual(new URL(proc.url).port, "8000");
      proc.child.kill("SIGTERM");
      const { code, stderr } = await proc.ended;
      assert.equal(code, 0);
      assert.match(stderr, /auth: ignoring --auth-url: /);
    } finally {
      await Deno.remove(dataDir, { recursive: true });
    }
  });
});

Deno.test("a revoked session that cannot be saved at SIGTERM makes the entry point say so in one line and exit 1", async () => {
  const dataDir = await Deno.makeTempDir({ prefix: "auth_proc_" });
  let proc: AuthProcess | undefined;
  try {
    proc = await spawnAuth(["--port", "0", "--data-dir", dataDir]);
    const url = proc.url;
    assert.ok(url, "ready line");
    const credentials = { username: "ann", password: PASSWORD };
    assert.equal((await post(url, "/register", credentials)).status, 201);
    const login = await post(url, "/login", credentials);
    assert.equal(login.status, 200);
    const token = String(login.body.token);
    // sessions.json replaced by a non-empty directory: renaming the temp
    // file over it fails, even as root (as a full disk would fail it).
    const sessionsPath = join(dataDir, "sessions.json");
    await Deno.remove(sessionsPath);
    await Deno.mkdir(sessionsPath);
    await Deno.writeTextFile(join(sessionsPath, "keep"), "");
    const logout = await post(url, "/logout", {}, {
      authorization: `Bearer ${token}`,
    });
    assert.equal(logout.status, 503, JSON.stringify(logout));
    const check = await post(url, "/validate_token", { token });
    assert.equal(check.status, 401);
    proc.child.kill("SIGTERM");
    const { code, stderr } = await proc.ended;
    assert.equal(code, 1, stderr);
    const lines = stderr.split("\n").filter((l) =>
      l.includes("will be valid again")
    );
    assert.equal(lines.length, 1, stderr);
    assert.match(
      lines[0] ?? "",
      /^auth: cannot shut down cleanly: Cannot save \S*sessions\.json: .*\(os error \d+\).*; 1 revoked session will be valid again after a restart$/,
    );
    assert.doesNotMatch(stderr, /^\s+at /m);
    assert.deepEqual(
      [...Deno.readDirSync(dataDir)].map((e) => e.name).sort(),
      [".lock", "sessions.json", "users.json"],
    );
  } finally {
    if (proc !== undefined) await stopChild(proc.child);
    await Deno.remove(dataDir, { recursive: true });
  }
});
