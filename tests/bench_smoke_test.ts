/**
 * The benchmark's own parts, checked cheaply (no timings judged): the
 * latency histogram, the /proc parsers, the fixtures the auth server reads,
 * and one tiny broadcast through a real load process and the baseline server.
 */
import assert from "node:assert/strict";
import { Histogram } from "../bench/histogram.ts";
import { pairedRatio } from "../bench/report.ts";
import {
  cpuDeltaUs,
  parseCpuTicks,
  parseProcText,
  parseStatusKb,
  readProcStats,
} from "../bench/proc_stats.ts";
import { benchUsername, writeAuthFixtures } from "../bench/fixtures.ts";
import { LoadGroup } from "../bench/load_group.ts";
import { ServerProcess } from "../bench/processes.ts";
import {
  closeSide,
  fanoutPair,
  QUICK_SIZES,
  RUNTIME_ENV,
  RUNTIME_FLAGS,
  type Side,
  startBaselineSide,
} from "../bench/scenarios.ts";
import { waitFor } from "./_harness.ts";

function assertEquals(actual: unknown, expected: unknown, what = ""): void {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  if (a !== e) throw new Error(`${what} expected ${e}, got ${a}`);
}

Deno.test("the benchmark runs the chat server with the runtime settings of deno task chat and start", async () => {
  const config = JSON.parse(
    await Deno.readTextFile(new URL("../deno.json", import.meta.url)),
  );
  for (const task of ["chat", "start"]) {
    const command: string = config.tasks[task];
    const words = command.split(" ");
    for (const [name, value] of Object.entries(RUNTIME_ENV)) {
      if (!words.includes(`${name}=${value}`)) {
        throw new Error(`deno task ${task} does not set ${name}=${value}`);
      }
    }
    for (const flag of RUNTIME_FLAGS) {
      if (!words.includes(flag)) {
        throw new Error(`deno task ${task} does not pass ${flag}`);
      }
    }
  }
});

Deno.test("histogram percentiles survive a trip over the wire and a merge", () => {
  const a = new Histogram();
  const b = new Histogram();
  for (let i = 1; i <= 99; i++) a.record(i);
  b.record(5000);
  b.record(-3); // clock skew counts as 0
  const merged = new Histogram();
  merged.merge(a.toData());
  merged.merge(b.toData());
  assertEquals(merged.count, 101, "count");
  assertEquals(merged.maxMs, 5000, "max");
  assertEquals(merged.quantile(0.5), 50.05, "p50"); // 51st of 0, 1..99, 5000
  assertEquals(merged.quantile(1), 5000, "p100");
  assertEquals(new Histogram().quantile(0.99), 0, "empty");
});

Deno.test("paired runs give the mean of their ratios and a 95 % interval of it", () => {
  assertEquals(pairedRatio([2, 2, 2, 2], [1, 1, 1, 1]), {
    mean: 2,
    low: 2,
    high: 2,
  });
  // Two pairs: 1.1 and 0.9, sd 0.141, t(1) = 12.71.
  const two = pairedRatio([1.1, 0.9], [1, 1])!;
  assertEquals(
    [two.mean, two.low, two.high].map((v) => Math.round(v * 1000) / 1000),
    [1, -0.271, 2.271],
  );
  // The eighth session's full run: missed, but 1.0 is (just) inside (0.997).
  const run = pairedRatio(
    [8, 8.4, 8.2, 9, 6.8, 8.8, 7.4, 8.6],
    [6.8, 7.6, 7.2, 8, 7.4, 7.2, 8, 7.8],
  )!;
  assertEquals(
    [run.mean, run.low, run.high].map((v) => Math.round(v * 100) / 100),
    [1.09, 1, 1.18],
  );
  assertEquals(pairedRatio([1], [1]), undefined, "one pair");
  assertEquals(pairedRatio([1, 0], [1, 1]), undefined, "a run with nothing");
});

Deno.test("proc stat parsing counts fields after a command name with spaces", () => {
  const stat =
    "42 (deno (main) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 9 0 1 2 3";
  assertEquals(parseCpuTicks(stat), 281);
  const status = "Name:\tdeno\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n";
  assertEquals(parseStatusKb(status, "VmRSS"), 102400);
  assertEquals(parseStatusKb(status, "VmHWM"), 204800);
});

Deno.test("CPU time comes from the threads' nanoseconds, and from the ticks when a thread ended", () => {
  const reading = (ticks: number, threads: string) =>
    parseProcText(
      `42 (deno) S 1 42 42 0 -1 4194560 100 0 0 0 ${ticks} 0 0 0 20 0 9 0 1 2 3\n` +
        `Name:\tdeno\nVmHWM:\t 2048 kB\nVmRSS:\t 1024 kB\n--threads--\n${threads}`,
      100,
    );
  const before = reading(10, "42 5000000\n43 1000\n");
  assertEquals(before.threadNs.get(43), 1000);
  assertEquals(before.rssKb, 1024);
  // 1.5 ms more on 42, 0.5 ms on 43, and a new thread 44 with 0.25 ms: the
  // ticks (10 ms each) did not move.
  const after = reading(10, "42 6500000\n43 501000\n44 250000\n");
  assertEquals(cpuDeltaUs(before, after), 2250);
  // Thread 43 ended in between: its time is unknown, the ticks decide.
  const ended = reading(12, "42 6500000\n");
  assertEquals(cpuDeltaUs(before, ended), 20_000);
  // No thread counters at all (another kernel): the ticks.
  assertEquals(cpuDeltaUs(reading(10, ""), reading(11, "")), 10_000);
});

Deno.test("a real process's CPU time is read to the nanosecond from its threads", async () => {
  const before = await readProcStats(Deno.pid);
  assert(before.threadNs.has(Deno.pid), "the main thread is listed");
  const until = performance.now() + 30;
  while (performance.now() < until) {
    // Spend 30 ms of CPU.
  }
  const spent = cpuDeltaUs(before, await readProcStats(Deno.pid));
  assert(spent >= 25_000 && spent < 2_000_000, `spent ${spent} us`);
});

Deno.test("fixtures write the auth server's files with mode 0600 and valid sessions", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const users = await writeAuthFixtures(dir, { users: 5, sessions: 2 });
    assertEquals(users.map((u) => u.username), [
      benchUsername(0),
      benchUsername(1),
    ]);
    const token = users[0]!.token;
    assertEquals(/^[A-Za-z0-9_-]{43}$/.test(token), true, "token shape");
    const usersDoc: unknown = JSON.parse(
      await Deno.readTextFile(`${dir}/users.json`),
    );
    const hash = typeof usersDoc === "object" && usersDoc !== null &&
        "users" in usersDoc && typeof usersDoc.users === "object" &&
        usersDoc.users !== null && "user000001" in usersDoc.users
      ? JSON.stringify(usersDoc.users.user000001)
      : "";
    assertEquals(
      /\$argon2id\$v=19\$m=19456,t=2,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}"/
        .test(hash),
      true,
      "PHC string",
    );
    const mode = (await Deno.stat(`${dir}/sessions.json`)).mode;
    assertEquals((mode ?? 0) & 0o777, 0o600, "mode");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a load process counts every delivery of the baseline server", async () => {
  const server = await ServerProcess.start("baseline", [
    "run",
    "--allow-net=127.0.0.1",
    "bench/baseline_server.ts",
    "--port",
    "0",
    "--exit-on-eof",
  ], { pipeStdin: true });
  const group = new LoadGroup(1);
  try {
    const url = server.address.replace(/^http/, "ws");
    const connected = await group.connect(url, 10, {
      tokens: [],
      concurrency: 10,
      expectWelcome: false,
    });
    assertEquals(connected.ok, 10, "connected");
    const run = await group.run({
      senders: 2,
      ratePerSender: 20,
      durationMs: 300,
      drainMs: 2000,
    });
    assertEquals(run.sent, 12, "sent");
    assertEquals(run.received, 120, "received");
    assertEquals(run.expected, 120, "expected");
    assertEquals(run.hist.count, 120, "latencies");
  } finally {
    await group.close();
    await server.close();
  }
});

Deno.test("the floor server sends every client the contract's message frame for each one received", async () => {
  const side = await startBaselineSide([], ["--message-frames"]);
  const sockets: WebSocket[] = [];
  const closed: Promise<unknown>[] = [];
  try {
    const frames: string[][] = [[], []];
    for (let i = 0; i < 2; i++) {
      const ws = new WebSocket(side.wsUrl);
      sockets.push(ws);
      closed.push(new Promise((resolve) => ws.onclose = resolve));
      ws.onmessage = (event) => frames[i]!.push(event.data);
    }
    await Promise.all(sockets.map((ws) =>
      new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = reject;
      })
    ));
    // The server adds a client in its own open handler: a frame reaching
    // both says both are in.
    for (let i = 0; frames.some((f) => f.length === 0); i++) {
      if (i === 100) throw new Error("the floor server never reached both");
      sockets[0]!.send("warm-up");
      await waitFor(() => frames.every((f) => f.length > 0), 100).catch(
        () => {},
      );
    }
    // The server handles one client's frames in order, and sends each to
    // every client: any warm-up still under way arrives before these.
    sockets[0]!.send(JSON.stringify({ type: "message", text: "hi there" }));
    sockets[0]!.send("not json");
    await waitFor(
      () => frames.every((f) => f.some((line) => line.includes('"not json"'))),
      10_000,
      "both frames at both clients",
    );
    // A warm-up may have reached the first client before the server took
    // in the second: compare what followed.
    const [mine, theirs] = frames.map((f) =>
      f.map((line) => JSON.parse(line)).filter((m) => m.text !== "warm-up")
    );
    assertEquals(mine, theirs, "both clients, the same frames");
    const [first, second] = mine!;
    assertEquals(
      Object.keys(first),
      ["type", "id", "room", "from", "text", "ts"],
      "fields",
    );
    assertEquals(
      [first.type, first.room, first.text],
      ["message", "lobby", "hi there"],
      "first",
    );
    assertEquals(
      [Number(second.id) - Number(first.id), second.text],
      [1, "not json"],
      "second",
    );
    assertEquals(new Date(first.ts).toISOString(), first.ts, "ts");
  } finally {
    for (const ws of sockets) ws.close();
    await Promise.all(closed);
    await closeSide(side);
  }
});

Deno.test("the paired fan-out measures two servers in turns and adds up each one's runs", async () => {
  const sides: Side[] = [];
  try {
    sides.push(await startBaselineSide(), await startBaselineSide());
    const sizes = {
      ...QUICK_SIZES,
      fanoutClients: 10,
      fanoutMs: 400,
      fanoutRounds: 2,
      warmupMs: 100,
      settleMs: 100,
      lowRateMs: 200,
    };
    const [a, b] = await fanoutPair(sides[0]!, sides[1]!, {
      sizes,
      loadProcesses: 1,
      runtimeFlags: [],
      log: () => {},
    });
    for (const m of [a, b]) {
      assertEquals(m.clients, 10, "clients");
      // 2 senders x 20/s x 0.2 s x 10 clients per run, two runs per timing.
      assertEquals(m.delivered_pct, 100, "delivered");
      assertEquals(m.deliveries_per_s, 400, "deliveries/s");
      assertEquals(m.lockstep_delivered_pct, 100, "lockstep delivered");
      const rounds = m.cpu_us_per_delivery_by_round;
      assertEquals(Array.isArray(rounds) && rounds.length, 2, "rounds");
      assertEquals(
        Array.isArray(m.lockstep_cpu_us_per_delivery_by_round) &&
          m.lockstep_cpu_us_per_delivery_by_round.length,
        2,
        "lockstep rounds",
      );
    }
  } finally {
    for (const side of sides) await closeSide(side);
  }
});

Deno.test("bench --quick drives the real servers and the baseline end to end and writes the results shape", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const out = `${dir}/results.json`;
    const run = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-net",
        "--allow-read",
        "--allow-write",
        "--allow-run",
        "--allow-env",
        "--allow-sys",
        "bench/main.ts",
        "--quick",
        "--only",
        "fanout,idle",
        "--out",
        out,
      ],
      cwd: new URL("..", import.meta.url).pathname,
      env: { NO_COLOR: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stdout = new TextDecoder().decode(run.stdout);
    if (!run.success) {
      throw new Error(
        `bench exited ${run.code}:\n${stdout}\n${
          new TextDecoder().decode(run.stderr)
        }`,
      );
    }
    assertEquals(
      /^scenario +metric +chat +baseline +ratio$/m.test(stdout),
      true,
    );
    const results = JSON.parse(await Deno.readTextFile(out));
    assertEquals(results.machine.cores, navigator.hardwareConcurrency, "cores");
    assertEquals(results.machine.deno, Deno.version.deno, "deno");
    assertEquals(typeof results.machine.cpu, "string", "cpu");
    const fanout = results.scenarios.fanout;
    for (const side of ["chat", "baseline"]) {
      const m = fanout[side];
      assertEquals(m.delivered_pct, 100, `${side} delivered`);
      for (
        const key of [
          "deliveries_per_s",
          "p50_ms",
          "p99_ms",
          "max_ms",
          "cpu_us_per_delivery",
          "peak_rss_mb",
        ]
      ) {
        assertEquals(typeof m[key], "number", `${side} ${key}`);
      }
      const idle = results.scenarios.idle[side];
      assertEquals(idle.failed, 0, `${side} idle failures`);
      assertEquals(typeof idle.rss_kb_per_conn, "number", `${side} idle`);
    }
    assertEquals(typeof fanout.ratio.cpu_us_per_delivery, "number", "ratio");
    // Two paired runs a timing in a quick run: the mean of their ratios is
    // there, unless a run was too short to be charged any CPU (10 ms ticks).
    const rounds = [fanout.chat, fanout.baseline].map((m) =>
      m.cpu_us_per_delivery_by_round as number[]
    );
    const charged = rounds.every((r) => r.every((v) => v > 0));
    const paired = fanout.ratio.cpu_us_per_delivery_paired;
    assertEquals(
      Object.keys(paired ?? {}),
      charged ? ["mean", "low_95", "high_95"] : [],
      "paired runs",
    );
    if (charged) {
      const [a, b] = rounds as [number[], number[]];
      const mean = (a[0]! / b[0]! + a[1]! / b[1]!) / 2;
      assertEquals(paired.mean, Math.round(mean * 1000) / 1000, "paired mean");
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
