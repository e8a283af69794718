/**
 * The benchmark's scenarios (issue 5). Each runs against one *side*: the
 * real auth + chat servers, or the bare baseline broadcast server, started
 * fresh for the scenario so that peak RSS and CPU belong to it alone.
 *
 * @module
 */
import { type BenchUser, writeAuthFixtures } from "./fixtures.ts";
import { Histogram, type HistogramData } from "./histogram.ts";
import { LoadGroup, type RunOptions, type RunSummary } from "./load_group.ts";
import { cpuDeltaUs, type ProcSample, readProcStats } from "./proc_stats.ts";
import { ServerProcess } from "./processes.ts";

/** A JSON value in results.json. */
export type JsonValue =
  | number
  | string
  | boolean
  | null
  | JsonValue[]
  | { [key: string]: JsonValue };

/** One side's figures for one scenario. */
export type Metrics = { [key: string]: JsonValue };

/** Sizes and durations of a run. */
export interface BenchSizes {
  fanoutClients: number;
  senders: number;
  ratePerSender: number;
  /** Load time per side, per sender timing (spread, lockstep). */
  fanoutMs: number;
  /** Runs `fanoutMs` is split into, the two sides taking turns. */
  fanoutRounds: number;
  /** The low-rate run after fan-out (2 messages/s per sender): the delay coalescing adds. */
  lowRateMs: number;
  /**
   * After the fan-out, the clients connected and silent: the servers' CPU
   * in the background (session re-checks, keep-alive pings) over this long.
   */
  idleCpuMs: number;
  warmupMs: number;
  /**
   * The fan-out's measured runs begin once both servers have run this
   * long: past the start-up's full GC (about 30 s after start) and with the
   * session re-checks (30 s after the connects) under way, so that neither
   * lands whole in one side's run.
   */
  steadyAfterMs: number;
  settleMs: number;
  saturationClients: number;
  saturationStepMs: number;
  /** Messages per second per sender, tried in order. */
  saturationRates: number[];
  idleConnections: number;
  idleUsers: number;
  /** Pause before the "before" and after the "after" RSS readings. */
  idleSettleMs: number;
  stormClients: number;
  httpMs: number;
  validateConcurrency: number;
  loginMs: number;
  loginConcurrency: number;
  bigUsers: number;
  bigMessages: number;
  bigRooms: number;
}

/** The real run: the figures of issue 5. */
export const FULL_SIZES: BenchSizes = {
  fanoutClients: 1000,
  senders: 2,
  ratePerSender: 20,
  fanoutMs: 10_000,
  fanoutRounds: 8,
  lowRateMs: 5000,
  idleCpuMs: 30_000,
  warmupMs: 2000,
  steadyAfterMs: 36_000,
  settleMs: 1000,
  saturationClients: 1000,
  saturationStepMs: 4000,
  saturationRates: [
    10,
    15,
    20,
    25,
    30,
    35,
    40,
    50,
    60,
    70,
    80,
    100,
    120,
    150,
    200,
    250,
    300,
    400,
  ],
  idleConnections: 5000,
  idleUsers: 500,
  idleSettleMs: 2000,
  stormClients: 1000,
  httpMs: 5000,
  validateConcurrency: 64,
  loginMs: 5000,
  loginConcurrency: 4,
  bigUsers: 100_000,
  bigMessages: 1_000_000,
  bigRooms: 100,
};

/** `--quick`: the same code paths in about 25 s; timings are not judged. */
export const QUICK_SIZES: BenchSizes = {
  fanoutClients: 100,
  senders: 2,
  ratePerSender: 20,
  fanoutMs: 600,
  fanoutRounds: 2,
  lowRateMs: 500,
  idleCpuMs: 500,
  warmupMs: 200,
  steadyAfterMs: 0,
  settleMs: 200,
  saturationClients: 100,
  saturationStepMs: 500,
  saturationRates: [20, 100],
  idleConnections: 300,
  idleUsers: 30,
  idleSettleMs: 300,
  stormClients: 100,
  httpMs: 500,
  validateConcurrency: 16,
  loginMs: 500,
  loginConcurrency: 2,
  bigUsers: 2000,
  bigMessages: 20_000,
  bigRooms: 10,
};

/** A server (or two) under test. */
export interface Side {
  kind: "chat" | "baseline";
  /** The WebSocket address clients connect to. */
  wsUrl: string;
  /** Where `/validate_token` and `/login` go (the auth server, or the baseline itself). */
  httpUrl: string;
  /** The WebSocket server: its CPU and memory are the ones compared. */
  server: ServerProcess;
  /** The auth server (chat side only). */
  auth: ServerProcess | undefined;
  /** Session tokens, one per user (empty for the baseline). */
  tokens: string[];
}

/**
 * The runtime settings `deno task chat` and `deno task start` run the chat
 * server with (deno.json): the whole young generation of V8's heap capped
 * at 2 MiB semispaces, and large WebSocket frames written with writev rather
 * than copied into a per-connection buffer that keeps their size. The
 * baseline runs with the same settings, so that the comparison is of code.
 */
export const RUNTIME_FLAGS = [
  "--v8-flags=--max-semi-space-size=2,--optimize-for-size",
];
/** See {@linkcode RUNTIME_FLAGS}. */
export const RUNTIME_ENV = { DENO_USE_WRITEV: "1" };

/** Environment of the real servers: abuse limits off, as CONTRACT section 1 allows. */
const SERVER_ENV = { RATE_LIMITS: "off", ...RUNTIME_ENV };

/** Whether the real servers exist yet. */
export async function chatServersExist(root: string): Promise<boolean> {
  for (const path of ["auth/main.ts", "chat/main.ts"]) {
    try {
      await Deno.stat(`${root}/${path}`);
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return false;
      throw err;
    }
  }
  return true;
}

/**
 * Starts the auth and chat servers on `dataDir` (already holding the
 * fixtures) the way a user would, as two processes on port 0.
 */
export async function startChatSide(
  dataDir: string,
  users: BenchUser[],
  runtimeFlags: string[] = [],
): Promise<Side> {
  const auth = await ServerProcess.start("auth", [
    "run",
    ...runtimeFlags,
    "--allow-net",
    "--allow-read",
    "--allow-write",
    "--allow-env",
    "auth/main.ts",
    "--port",
    "0",
    "--data-dir",
    dataDir,
  ], { env: SERVER_ENV });
  try {
    const chat = await ServerProcess.start("chat", [
      "run",
      ...RUNTIME_FLAGS,
      ...runtimeFlags,
      "--allow-net",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      "chat/main.ts",
      "--port",
      "0",
      "--data-dir",
      dataDir,
      "--auth-url",
      auth.address,
    ], { env: SERVER_ENV });
    return {
      kind: "chat",
      wsUrl: `${chat.address.replace(/^http/, "ws")}/ws`,
      httpUrl: auth.address,
      server: chat,
      auth,
      tokens: users.map((user) => user.token),
    };
  } catch (err) {
    await auth.close();
    throw err;
  }
}

/**
 * Starts the baseline broadcast server (`serverArgs`: `--message-frames`
 * for the floor of the contract's frames).
 */
export async function startBaselineSide(
  runtimeFlags: string[] = [],
  serverArgs: string[] = [],
): Promise<Side> {
  const server = await ServerProcess.start("baseline", [
    "run",
    ...RUNTIME_FLAGS,
    ...runtimeFlags,
    "--allow-net=127.0.0.1",
    "bench/baseline_server.ts",
    "--port",
    "0",
    "--exit-on-eof",
    ...serverArgs,
  ], { pipeStdin: true, env: RUNTIME_ENV });
  return {
    kind: "baseline",
    wsUrl: server.address.replace(/^http/, "ws"),
    httpUrl: server.address,
    server,
    auth: undefined,
    tokens: [],
  };
}

/** Stops a side's servers (chat before auth). */
export async function closeSide(side: Side): Promise<void> {
  await side.server.close();
  await side.auth?.close();
}

/** Writes a data directory with `sessions` users holding a session. */
export async function prepareDataDir(
  dir: string,
  sessions: number,
): Promise<BenchUser[]> {
  return await writeAuthFixtures(dir, { users: sessions, sessions });
}

/** Options shared by the scenario functions. */
export interface ScenarioContext {
  sizes: BenchSizes;
  loadProcesses: number;
  /** Extra `deno run` flags for every server (e.g. `--cpu-prof`). */
  runtimeFlags: string[];
  log: (line: string) => void;
}

/**
 * Fan-out, two sides measured in alternation: `fanoutClients` clients in one
 * room on each, `senders` of them sending at `ratePerSender`. Each side gets
 * `fanoutMs` of load in `fanoutRounds` runs, the sides taking turns (ABBA...)
 * so that a slow spell of the machine lands on both alike, first with the
 * senders spread evenly over a period (no two messages meet in one
 * event-loop turn), then in lockstep (they do, and the chat server may write
 * them as one frame). Returns the figures of `a` and of `b`.
 */
export async function fanoutPair(
  a: Side,
  b: Side,
  ctx: ScenarioContext,
): Promise<[Metrics, Metrics]> {
  const { sizes } = ctx;
  const sides = [a, b];
  const groups = sides.map(() => new LoadGroup(ctx.loadProcesses));
  try {
    // Together, so that work that follows the connects by a fixed time (the
    // session re-checks, 30 s later) falls alike on two chat servers.
    await Promise.all(
      sides.map((side, i) =>
        connectAll(side, groups[i]!, sizes.fanoutClients, 50)
      ),
    );
    await delay(sizes.settleMs);
    const load = {
      senders: sizes.senders,
      ratePerSender: sizes.ratePerSender,
    };
    for (const group of groups) {
      await group.run({ ...load, durationMs: sizes.warmupMs, drainMs: 1000 });
    }
    const ranMs = Math.min(
      ...sides.map((side) => performance.now() - side.server.spawnedAt),
    );
    await delay(Math.max(0, sizes.steadyAfterMs - ranMs));
    const measured: RunMetrics[][] = [[], []];
    for (const lockstep of [false, true]) {
      const totals: RunTotals[][] = [[], []];
      for (let round = 0; round < sizes.fanoutRounds; round++) {
        for (const i of round % 2 === 0 ? [0, 1] : [1, 0]) {
          await delay(sizes.settleMs / 4);
          totals[i]!.push(
            await measureTotals(sides[i]!, groups[i]!, {
              ...load,
              durationMs: sizes.fanoutMs / sizes.fanoutRounds,
              drainMs: 3000,
              lockstep,
            }),
          );
        }
      }
      for (let i = 0; i < 2; i++) {
        measured[i]!.push(
          runMetrics(totals[i]!, sides[i]!, load, groups[i]!.openClients),
        );
      }
    }
    const out: Metrics[] = [];
    for (let i = 0; i < 2; i++) {
      const [spread, lockstep] = measured[i] as [RunMetrics, RunMetrics];
      const stats = await readProcStats(sides[i]!.server.pid);
      const low = await groups[i]!.run({
        senders: sizes.senders,
        ratePerSender: 2,
        durationMs: sizes.lowRateMs,
        drainMs: 1000,
      });
      out.push({
        clients: groups[i]!.openClients,
        ...spread,
        lockstep_deliveries_per_s: lockstep.deliveries_per_s,
        lockstep_delivered_pct: lockstep.delivered_pct,
        lockstep_p50_ms: lockstep.p50_ms,
        lockstep_p99_ms: lockstep.p99_ms,
        lockstep_cpu_us_per_delivery: lockstep.cpu_us_per_delivery,
        lockstep_cpu_us_per_delivery_by_round: lockstep
          .cpu_us_per_delivery_by_round,
        peak_rss_mb: round(stats.peakRssKb / 1024, 1),
        low_rate_p50_ms: round(low.hist.quantile(0.5), 2),
        low_rate_p99_ms: round(low.hist.quantile(0.99), 2),
      });
    }
    // Both sides at once, past the chat servers' first round of session
    // re-checks (30 s after the connects): the background cost, which the
    // measured runs above include only in part.
    const background = await Promise.all(sides.map(serverSamples));
    await delay(sizes.idleCpuMs);
    for (const [i, side] of sides.entries()) {
      const now = await serverSamples(side);
      const us = now.reduce(
        (sum, s, k) => sum + cpuDeltaUs(background[i]![k]!, s),
        0,
      );
      out[i]!.idle_cpu_ms_per_s = round(us / sizes.idleCpuMs, 2);
    }
    return [out[0]!, out[1]!];
  } finally {
    await Promise.all(groups.map((group) => group.close()));
  }
}

/** Readings of a side's server processes (chat, then auth). */
function serverSamples(side: Side): Promise<ProcSample[]> {
  const pids = [side.server.pid, ...(side.auth ? [side.auth.pid] : [])];
  return Promise.all(pids.map(readProcStats));
}

/**
 * Saturation: the fan-out load, stepped up until p99 passes 250 ms or fewer
 * than 99% of the deliveries arrive in time; the highest offered rate held.
 */
export async function saturation(
  side: Side,
  ctx: ScenarioContext,
): Promise<Metrics> {
  const { sizes } = ctx;
  const group = new LoadGroup(ctx.loadProcesses);
  try {
    const clients = await connectAll(side, group, sizes.saturationClients, 50);
    await delay(sizes.settleMs);
    const lowest = sizes.saturationRates[0] ?? sizes.ratePerSender;
    await group.run({
      senders: sizes.senders,
      ratePerSender: lowest,
      durationMs: sizes.warmupMs,
      drainMs: 1000,
    });
    await delay(sizes.settleMs / 2);
    const steps: Metrics[] = [];
    let held = 0;
    let failedAt: number | null = null;
    for (const rate of sizes.saturationRates) {
      const offered = sizes.senders * rate * clients;
      let ok = false;
      // A step that misses is tried once more after a pause, so one stray
      // pause (GC, another process) does not end the climb; a step whose
      // clients were dropped is not retried.
      for (let attempt = 1; attempt <= 2 && !ok; attempt++) {
        if (attempt === 2) await delay(2000);
        const m = await measureRun(side, group, {
          senders: sizes.senders,
          ratePerSender: rate,
          durationMs: sizes.saturationStepMs,
          drainMs: 1000,
        });
        ok = m.delivered_pct >= 99 && m.p99_ms <= 250 &&
          m.closed_clients === 0;
        steps.push({
          offered_deliveries_per_s: offered,
          attempt,
          deliveries_per_s: m.deliveries_per_s,
          delivered_pct: m.delivered_pct,
          p99_ms: m.p99_ms,
          server_cpu_pct: m.server_cpu_pct,
          load_cpu_pct: m.load_cpu_pct,
          closed_clients: m.closed_clients,
          held: ok,
        });
        ctx.log(
          `  ${side.kind} saturation ${offered}/s: ${
            ok ? "held" : "not held"
          } (p99 ${m.p99_ms} ms, ${m.delivered_pct}% delivered, server ${m.server_cpu_pct}% CPU, load ${m.load_cpu_pct}% CPU${
            m.load_cpu_pct >= 90 ? ": load generator near a full core" : ""
          })`,
        );
        if (m.closed_clients > 0) break;
      }
      if (!ok) {
        failedAt = offered;
        break;
      }
      held = offered;
      await delay(500);
    }
    return {
      clients,
      max_rate_held: held,
      first_rate_not_held: failedAt,
      ceiling_of_steps_reached: failedAt === null,
      steps,
    };
  } finally {
    await group.close();
  }
}

/**
 * Idle: RSS per connection of `idleConnections` authenticated idle clients
 * (over `idleUsers` users), after a warm-up of 20 connections.
 */
export async function idle(side: Side, ctx: ScenarioContext): Promise<Metrics> {
  const { sizes } = ctx;
  const group = new LoadGroup(ctx.loadProcesses);
  try {
    await connectAll(side, group, 20, 20);
    await group.closeClients();
    await delay(sizes.idleSettleMs);
    const before = await readProcStats(side.server.pid);
    const connected = await group.connect(
      side.wsUrl,
      sizes.idleConnections,
      {
        tokens: side.tokens.slice(0, sizes.idleUsers),
        concurrency: 100,
        expectWelcome: side.kind === "chat",
      },
    );
    await delay(sizes.idleSettleMs);
    const samples: number[] = [];
    for (let i = 0; i < 3; i++) {
      if (i > 0) await delay(sizes.idleSettleMs / 4);
      samples.push((await readProcStats(side.server.pid)).rssKb);
    }
    const after = median(samples);
    const peak = (await readProcStats(side.server.pid)).peakRssKb;
    return {
      connections: connected.ok,
      failed: connected.failed,
      rss_before_mb: round(before.rssKb / 1024, 1),
      rss_after_mb: round(after / 1024, 1),
      rss_kb_per_conn: connected.ok === 0
        ? null
        : round((after - before.rssKb) / connected.ok, 1),
      peak_rss_mb: round(peak / 1024, 1),
    };
  } finally {
    await group.close();
  }
}

/**
 * Connect storm: `stormClients` clients with distinct tokens connect at
 * once; connections/s and time to `welcome` (baseline: to open).
 */
export async function connectStorm(
  side: Side,
  ctx: ScenarioContext,
): Promise<Metrics> {
  const { sizes } = ctx;
  const group = new LoadGroup(ctx.loadProcesses);
  try {
    // Warm-up with other users, so the storm does not time first-use setup.
    if (side.kind === "chat") {
      await group.connect(side.wsUrl, 10, {
        tokens: side.tokens.slice(sizes.stormClients, sizes.stormClients + 10),
        concurrency: 10,
        expectWelcome: true,
      });
    } else {
      await connectAll(side, group, 10, 10);
    }
    await group.closeClients();
    await delay(500);
    const before = await readProcStats(side.server.pid);
    const authBefore = side.auth ? await readProcStats(side.auth.pid) : null;
    const storm = await group.connect(side.wsUrl, sizes.stormClients, {
      tokens: side.tokens.slice(0, sizes.stormClients),
      concurrency: sizes.stormClients,
      expectWelcome: side.kind === "chat",
      timeoutMs: 30_000,
    });
    const after = await readProcStats(side.server.pid);
    const authAfter = side.auth ? await readProcStats(side.auth.pid) : null;
    const metrics: Metrics = {
      clients: storm.ok,
      failed: storm.failed,
      connects_per_s: storm.elapsedMs > 0
        ? round(storm.ok / (storm.elapsedMs / 1000), 0)
        : null,
      p50_welcome_ms: round(storm.hist.quantile(0.5), 1),
      p99_welcome_ms: round(storm.hist.quantile(0.99), 1),
      max_welcome_ms: round(storm.hist.maxMs, 1),
      cpu_us_per_connect: storm.ok === 0
        ? null
        : round(cpuDeltaUs(before, after) / storm.ok, 0),
    };
    if (authBefore && authAfter) {
      metrics.auth_cpu_us_per_connect = storm.ok === 0
        ? null
        : round(cpuDeltaUs(authBefore, authAfter) / storm.ok, 0);
    }
    if (storm.failed > 0) metrics.failures = storm.failures;
    return metrics;
  } finally {
    await group.close();
  }
}

/**
 * Auth: `/validate_token` requests/s with many keep-alive requests in
 * flight, and (chat side) `/login` requests/s for one real user.
 */
export async function authThroughput(
  side: Side,
  ctx: ScenarioContext,
): Promise<Metrics> {
  const { sizes } = ctx;
  const group = new LoadGroup(1);
  const url = `${side.httpUrl}/validate_token`;
  const tokens = side.tokens.length > 0 ? side.tokens : ["baseline"];
  try {
    await group.http({
      url,
      kind: "validate",
      tokens,
      concurrency: sizes.validateConcurrency,
      durationMs: Math.min(1000, sizes.httpMs),
    });
    const server = side.auth ?? side.server;
    const before = await readProcStats(server.pid);
    const validate = await group.http({
      url,
      kind: "validate",
      tokens,
      concurrency: sizes.validateConcurrency,
      durationMs: sizes.httpMs,
    });
    const after = await readProcStats(server.pid);
    const metrics: Metrics = {
      validate_per_s: round(validate.ok / (validate.elapsedMs / 1000), 0),
      validate_p99_ms: round(quantileOf(validate.hist, 0.99), 2),
      cpu_us_per_validate: validate.ok === 0
        ? null
        : round(cpuDeltaUs(before, after) / validate.ok, 1),
      validate_statuses: validate.statuses,
      login_per_s: null,
    };
    if (side.kind === "chat") {
      const username = "bench_login";
      const password = "correct horse battery staple";
      const res = await fetch(`${side.httpUrl}/register`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ username, password }),
      });
      await res.body?.cancel();
      if (res.status !== 201 && res.status !== 409) {
        throw new Error(`Cannot register the login user: HTTP ${res.status}`);
      }
      const login = await group.http({
        url: `${side.httpUrl}/login`,
        kind: "login",
        username,
        password,
        concurrency: sizes.loginConcurrency,
        durationMs: sizes.loginMs,
      });
      metrics.login_per_s = round(login.ok / (login.elapsedMs / 1000), 1);
      metrics.login_statuses = login.statuses;
    }
    return metrics;
  } finally {
    await group.close();
  }
}

/** Figures of one or more measured broadcast runs of one side. */
interface RunMetrics {
  offered_deliveries_per_s: number;
  deliveries_per_s: number;
  delivered_pct: number;
  p50_ms: number;
  p99_ms: number;
  max_ms: number;
  /** Server CPU (the chat server plus the auth server) per delivery. */
  cpu_us_per_delivery: number | null;
  /** The kernel's share of cpu_us_per_delivery. */
  cpu_sys_us_per_delivery: number | null;
  /** The auth server's share of cpu_us_per_delivery (chat side only). */
  auth_cpu_us_per_delivery?: number | null;
  /** cpu_us_per_delivery of each run, in order. */
  cpu_us_per_delivery_by_round: number[];
  server_cpu_pct: number;
  load_cpu_pct: number;
  send_lag_max_ms: number;
  error_frames: number;
  closed_clients: number;
  [key: string]: JsonValue | undefined;
}

/** Raw counts of one measured run, to be added up over runs. */
interface RunTotals {
  durationMs: number;
  run: RunSummary;
  /** The WebSocket server's and the auth server's CPU time, and the kernel's part. */
  serverCpuUs: number;
  serverSysUs: number;
  authCpuUs: number;
  loadCpuUs: number;
  wallUs: number;
  /** Seconds after the server's spawn: for reading a --cpu-prof profile. */
  window: [number, number];
}

async function measureTotals(
  side: Side,
  group: LoadGroup,
  options: RunOptions,
): Promise<RunTotals> {
  const pids = [side.server.pid, ...group.processes.map((p) => p.pid)];
  if (side.auth) pids.push(side.auth.pid);
  const before = await Promise.all(pids.map(readProcStats));
  const t0 = performance.now();
  const run = await group.run(options);
  const t1 = performance.now();
  const after = await Promise.all(pids.map(readProcStats));
  const cpu = pids.map((_, i) => cpuDeltaUs(before[i]!, after[i]!));
  const sys = pids.map((_, i) => after[i]!.sysUs - before[i]!.sysUs);
  const authCpuUs = side.auth ? cpu[cpu.length - 1]! : 0;
  const authSysUs = side.auth ? sys[sys.length - 1]! : 0;
  return {
    durationMs: options.durationMs,
    run,
    serverCpuUs: cpu[0]! + authCpuUs,
    serverSysUs: sys[0]! + authSysUs,
    authCpuUs,
    loadCpuUs: cpu.slice(1, 1 + group.processes.length)
      .reduce((x, y) => x + y, 0),
    wallUs: (t1 - t0) * 1000,
    window: [
      round((t0 - side.server.spawnedAt) / 1000, 1),
      round((t1 - side.server.spawnedAt) / 1000, 1),
    ],
  };
}

/** The figures of runs of one side, added up. */
function runMetrics(
  runs: RunTotals[],
  side: Side,
  load: { senders: number; ratePerSender: number },
  clients: number,
): RunMetrics {
  const hist = new Histogram();
  let received = 0, expected = 0, durationMs = 0, serverCpu = 0;
  let serverSys = 0, authCpu = 0, loadCpu = 0, wallUs = 0, lag = 0;
  let errors = 0, closed = 0;
  for (const r of runs) {
    hist.merge(r.run.hist.toData());
    received += r.run.received;
    expected += r.run.expected;
    durationMs += r.durationMs;
    serverCpu += r.serverCpuUs;
    serverSys += r.serverSysUs;
    authCpu += r.authCpuUs;
    loadCpu += r.loadCpuUs;
    wallUs += r.wallUs;
    lag = Math.max(lag, r.run.maxSendLagMs);
    errors += r.run.errors;
    closed = Math.max(closed, r.run.closed);
  }
  const perDelivery = (us: number, digits = 2) =>
    received === 0 ? null : round(us / received, digits);
  const metrics: RunMetrics = {
    offered_deliveries_per_s: load.senders * load.ratePerSender * clients,
    deliveries_per_s: round(received / (durationMs / 1000), 0),
    delivered_pct: expected === 0 ? 0 : round(100 * received / expected, 2),
    p50_ms: round(hist.quantile(0.5), 2),
    p99_ms: round(hist.quantile(0.99), 2),
    max_ms: round(hist.maxMs, 2),
    cpu_us_per_delivery: perDelivery(serverCpu),
    cpu_sys_us_per_delivery: perDelivery(serverSys),
    cpu_us_per_delivery_by_round: runs.map((r) =>
      r.run.received === 0 ? 0 : round(r.serverCpuUs / r.run.received, 2)
    ),
    server_cpu_pct: round(100 * serverCpu / wallUs, 0),
    load_cpu_pct: round(100 * loadCpu / wallUs, 0),
    send_lag_max_ms: round(lag, 1),
    error_frames: errors,
    closed_clients: closed,
    window_s_after_spawn: runs.length === 0
      ? []
      : [runs[0]!.window[0], runs[runs.length - 1]!.window[1]],
  };
  if (side.auth) metrics.auth_cpu_us_per_delivery = perDelivery(authCpu, 3);
  return metrics;
}

async function measureRun(
  side: Side,
  group: LoadGroup,
  options: RunOptions,
): Promise<RunMetrics> {
  return runMetrics(
    [await measureTotals(side, group, options)],
    side,
    options,
    group.openClients,
  );
}

/** Connects `count` clients with distinct users; throws unless all made it. */
async function connectAll(
  side: Side,
  group: LoadGroup,
  count: number,
  concurrency: number,
): Promise<number> {
  if (side.kind === "chat" && side.tokens.length < count) {
    throw new Error(
      `Cannot connect ${count} clients: only ${side.tokens.length} tokens`,
    );
  }
  const result = await group.connect(side.wsUrl, count, {
    tokens: side.tokens.slice(0, count),
    concurrency,
    expectWelcome: side.kind === "chat",
  });
  if (result.ok < count) {
    throw new Error(
      `Cannot connect ${count} clients to ${side.kind}: ${result.failed} failed (${
        JSON.stringify(result.failures)
      })`,
    );
  }
  return result.ok;
}

function quantileOf(data: HistogramData, q: number): number {
  const hist = new Histogram();
  hist.merge(data);
  return hist.quantile(q);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)] ?? 0;
}

/** Rounds to `digits` decimals. */
export function round(value: number, digits: number): number {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

/** Waits `ms` milliseconds. */
export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
