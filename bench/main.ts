// deno-lint-ignore-file no-console
/**
 * `deno task bench`: the chat system against the runtime's own floor.
 *
 * Starts the real auth and chat servers (and, in turn, the bare baseline
 * broadcast server) as subprocesses on port 0, drives them from separate
 * load processes on 127.0.0.1, reads CPU time and memory from /proc, prints
 * one table and writes `bench/results.json`.
 *
 * ```
 * deno task bench                 full run (several minutes), writes bench/results.json
 * deno task bench --quick         smoke run (about 25 s), timings not judged, writes nothing
 * deno task bench --only fanout,idle
 * deno task bench --load-procs 2  split the clients over two load processes
 * deno task bench --out FILE      write the JSON there instead
 * deno task bench --cpu-prof DIR  servers write V8 CPU profiles into DIR
 *                                 (summarise one with bench/profile_summary.ts)
 * ```
 *
 * @module
 */
import { parseArgs } from "node:util";
import { writeAuthFixtures, writeHistoryFixture } from "./fixtures.ts";
import { killAllChildren, REPO_ROOT } from "./processes.ts";
import { readProcFiles } from "./proc_stats.ts";
import {
  authThroughput,
  type BenchSizes,
  chatServersExist,
  closeSide,
  connectStorm,
  fanoutPair,
  FULL_SIZES,
  idle,
  type JsonValue,
  type Metrics,
  prepareDataDir,
  QUICK_SIZES,
  round,
  saturation,
  type ScenarioContext,
  type Side,
  startBaselineSide,
  startChatSide,
} from "./scenarios.ts";
import {
  evaluateTargets,
  formatTable,
  pairedRatio,
  type ScenarioResult,
} from "./report.ts";

const SCENARIOS = [
  "fanout",
  "fanout_floor",
  "fanout_big_data",
  "saturation",
  "idle",
  "connect_storm",
  "auth",
] as const;
type ScenarioName = typeof SCENARIOS[number];

const USAGE = `Usage: deno task bench [--quick] [--only ${
  SCENARIOS.join(",")
}] [--load-procs N] [--out FILE] [--cpu-prof DIR]`;

async function main(): Promise<number> {
  let flags;
  try {
    flags = parseArgs({
      args: Deno.args,
      strict: true,
      options: {
        quick: { type: "boolean", default: false },
        only: { type: "string" },
        "load-procs": { type: "string", default: "1" },
        out: { type: "string" },
        "cpu-prof": { type: "string" },
        help: { type: "boolean", default: false },
      },
    }).values;
  } catch (err) {
    console.error(`${err instanceof Error ? err.message : err}\n${USAGE}`);
    return 2;
  }
  if (flags.help) {
    console.log(USAGE);
    return 0;
  }
  // The floor measures the baseline server only (its frames have a test of
  // their own): a smoke run leaves it out unless asked for.
  const only = flags.only?.split(",").map((s) => s.trim()) ??
    SCENARIOS.filter((name) => !(flags.quick && name === "fanout_floor"));
  const selected = SCENARIOS.filter((name) => only.includes(name));
  const unknown = only.filter((name) => !SCENARIOS.some((s) => s === name));
  const loadProcesses = Number(flags["load-procs"]);
  if (
    unknown.length > 0 || !Number.isInteger(loadProcesses) ||
    loadProcesses < 1 || loadProcesses > 8
  ) {
    console.error(USAGE);
    return 2;
  }
  const quick = flags.quick;
  const sizes = quick ? QUICK_SIZES : FULL_SIZES;
  const out = flags.out ??
    (quick ? undefined : `${REPO_ROOT}/bench/results.json`);

  const tmp = await Deno.makeTempDir({ prefix: "chatroom-bench-" });
  const onSignal = () => {
    killAllChildren();
    try {
      Deno.removeSync(tmp, { recursive: true });
    } catch {
      // best effort on the way out
    }
    Deno.exit(130);
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);

  const startedAt = new Date();
  const t0 = performance.now();
  const loadBefore = Deno.loadavg();
  const log = (line: string) => console.error(line);
  const profDir = flags["cpu-prof"];
  const runtimeFlags: string[] = [];
  if (profDir !== undefined) {
    const absolute = profDir.startsWith("/")
      ? profDir
      : `${Deno.cwd()}/${profDir}`;
    await Deno.mkdir(absolute, { recursive: true });
    runtimeFlags.push("--cpu-prof", `--cpu-prof-dir=${absolute}`);
  }
  const ctx: ScenarioContext = { sizes, loadProcesses, runtimeFlags, log };
  const results: Record<string, ScenarioResult> = {};
  log(
    `chatroom bench (${quick ? "quick" : "full"}): ${
      selected.join(", ")
    }; load average ${loadBefore.map((n) => n.toFixed(2)).join(" ")}`,
  );
  try {
    const haveChat = await chatServersExist(REPO_ROOT);
    if (!haveChat) log("auth/main.ts or chat/main.ts missing: baseline only");
    for (const name of selected) {
      log(`== ${name}`);
      const scenarioStart = performance.now();
      try {
        results[name] = await runScenario(name, {
          ctx,
          tmp,
          haveChat,
          results,
        });
      } catch (err) {
        const error = err instanceof Error ? err.message : String(err);
        log(`  failed: ${error}`);
        results[name] = { chat: { error }, baseline: { error }, ratio: {} };
      }
      log(
        `  (${name}: ${
          ((performance.now() - scenarioStart) / 1000).toFixed(1)
        } s)`,
      );
    }
  } finally {
    killAllChildren();
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
  }
  const loadAfter = Deno.loadavg();
  const targets = evaluateTargets(results, { judge: !quick, sizes });
  const report = {
    machine: await machineInfo(),
    run: {
      mode: quick ? "quick" : "full",
      started_at: startedAt.toISOString(),
      duration_s: round((performance.now() - t0) / 1000, 1),
      load_average_before: loadBefore.map((n) => round(n, 2)),
      load_average_after: loadAfter.map((n) => round(n, 2)),
      load_processes: loadProcesses,
      sizes: sizesJson(sizes),
    },
    scenarios: results,
    targets,
  };
  console.log(formatTable(results, targets));
  console.log(
    `load average before ${
      loadBefore.map((n) => n.toFixed(2)).join(" ")
    }, after ${
      loadAfter.map((n) => n.toFixed(2)).join(" ")
    }; ${report.run.duration_s} s`,
  );
  if (out !== undefined) {
    await Deno.writeTextFile(out, JSON.stringify(report, null, 2) + "\n");
    console.log(`wrote ${out}`);
  }
  const failed = Object.entries(results).filter(([, r]) =>
    "error" in r.chat || "error" in r.baseline
  );
  return failed.length > 0 ? 1 : 0;
}

interface RunContext {
  ctx: ScenarioContext;
  tmp: string;
  haveChat: boolean;
  results: Record<string, ScenarioResult>;
}

async function runScenario(
  name: ScenarioName,
  run: RunContext,
): Promise<ScenarioResult> {
  const { ctx } = run;
  if (name === "fanout") return await fanoutScenario(run);
  if (name === "fanout_floor") return await floorScenario(run);
  if (name === "fanout_big_data") return await bigData(run);
  const fn = {
    saturation,
    idle,
    connect_storm: connectStorm,
    auth: authThroughput,
  }[name];
  const baseline = await onSide(
    ctx,
    () => startBaselineSide(ctx.runtimeFlags),
    fn,
  );
  let chat: Metrics;
  if (run.haveChat) {
    chat = await onSide(ctx, () => startChat(run, name), fn);
  } else {
    chat = { error: "auth/main.ts or chat/main.ts does not exist yet" };
  }
  return { chat, baseline, ratio: ratios(chat, baseline) };
}

/** A chat side on a fresh data directory with enough sessions for any scenario. */
async function startChat(run: RunContext, name: string): Promise<Side> {
  const { ctx, tmp } = run;
  const sizes = ctx.sizes;
  const dir = `${tmp}/${name}`;
  const sessions = Math.max(
    sizes.fanoutClients,
    sizes.saturationClients,
    sizes.idleUsers,
    sizes.stormClients + 10,
  );
  return await startChatSide(
    dir,
    await prepareDataDir(dir, sessions),
    ctx.runtimeFlags,
  );
}

/** Fan-out: the chat system and the baseline, measured in alternation. */
async function fanoutScenario(run: RunContext): Promise<ScenarioResult> {
  const { ctx } = run;
  if (!run.haveChat) {
    const error = "auth/main.ts or chat/main.ts does not exist yet";
    return { chat: { error }, baseline: { error }, ratio: {} };
  }
  const [chat, baseline] = await onSidePair(
    ctx,
    () => startChat(run, "fanout"),
    () => startBaselineSide(ctx.runtimeFlags),
  );
  return { chat, baseline, ratio: ratios(chat, baseline) };
}

/**
 * The fan-out of the contract's frames with nothing else: the baseline
 * server sending chat `message` frames (`--message-frames`), in the chat
 * server's place, against the baseline. What any server that sends the
 * frames CONTRACT section 4 asks for, one per message per recipient, costs
 * at least; the chat server's figures above it are its own work.
 */
async function floorScenario(run: RunContext): Promise<ScenarioResult> {
  const { ctx } = run;
  const [floor, baseline] = await onSidePair(
    ctx,
    () => startBaselineSide(ctx.runtimeFlags, ["--message-frames"]),
    () => startBaselineSide(ctx.runtimeFlags),
  );
  return {
    chat: floor,
    baseline,
    ratio: ratios(floor, baseline),
    compared_with:
      "chat column: the baseline server sending the contract's message frames (bench/baseline_server.ts --message-frames), in the chat server's place",
  };
}

/**
 * Fan-out again with 100k users and 1M history messages on disk, measured
 * in alternation with a chat system on an empty data directory.
 */
async function bigData(run: RunContext): Promise<ScenarioResult> {
  const { ctx, tmp } = run;
  const sizes = ctx.sizes;
  if (!run.haveChat) {
    const error = "auth/main.ts or chat/main.ts does not exist yet";
    return { chat: { error }, baseline: { error }, ratio: {} };
  }
  const dir = `${tmp}/big_data`;
  const t0 = performance.now();
  const users = await writeAuthFixtures(dir, {
    users: sizes.bigUsers,
    sessions: sizes.fanoutClients,
  });
  const bytes = await writeHistoryFixture(dir, {
    messages: sizes.bigMessages,
    rooms: sizes.bigRooms,
    users: sizes.bigUsers,
  });
  ctx.log(
    `  wrote ${sizes.bigUsers} users and ${sizes.bigMessages} messages (${
      (bytes / 1e6).toFixed(0)
    } MB of history) in ${((performance.now() - t0) / 1000).toFixed(1)} s`,
  );
  const [chat, empty] = await onSidePair(
    ctx,
    () => startChatSide(dir, users, ctx.runtimeFlags),
    () => startChat(run, "big_data_empty"),
  );
  chat.users_on_disk = sizes.bigUsers;
  chat.history_messages_on_disk = sizes.bigMessages;
  return {
    chat,
    baseline: empty,
    ratio: ratios(chat, empty),
    compared_with:
      "the chat server with an empty data directory, measured in alternation with it",
  };
}

/**
 * Starts two sides, runs the paired fan-out on them, always stops both;
 * an error becomes `{error}` on both.
 */
async function onSidePair(
  ctx: ScenarioContext,
  startA: () => Promise<Side>,
  startB: () => Promise<Side>,
): Promise<[Metrics, Metrics]> {
  const sides: Side[] = [];
  try {
    sides.push(await startA());
    sides.push(await startB());
    const [a, b] = sides as [Side, Side];
    const pair = await fanoutPair(a, b, ctx);
    for (let i = 0; i < 2; i++) {
      const side = sides[i]!;
      const metrics = pair[i]!;
      metrics.startup_ms = round(side.server.startupMs, 0);
      if (side.auth) metrics.auth_startup_ms = round(side.auth.startupMs, 0);
      ctx.log(`  ${side.kind}: ${summary(metrics)}`);
      if (side.kind === "chat" && !side.server.alive) {
        metrics.error = `chat server died\n${side.server.recentOutput()}`;
      }
    }
    return pair;
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    ctx.log(`  fan-out failed: ${message}`);
    for (const side of sides) ctx.log(side.server.recentOutput(10));
    return [{ error: message }, { error: message }];
  } finally {
    for (const side of sides) await closeSide(side);
  }
}

/** Starts a side, runs one scenario on it, always stops it; errors become `{error}`. */
async function onSide(
  ctx: ScenarioContext,
  start: () => Promise<Side>,
  fn: (side: Side, ctx: ScenarioContext) => Promise<Metrics>,
): Promise<Metrics> {
  let side: Side | undefined;
  try {
    side = await start();
    const metrics = await fn(side, ctx);
    ctx.log(`  ${side.kind}: ${summary(metrics)}`);
    if (side.kind === "chat" && !side.server.alive) {
      metrics.error = `chat server died\n${side.server.recentOutput()}`;
    }
    return metrics;
  } catch (err) {
    const message = err instanceof Error ? err.message : String(err);
    ctx.log(`  ${side?.kind ?? "side"} failed: ${message}`);
    if (side) ctx.log(side.server.recentOutput(10));
    return { error: message };
  } finally {
    if (side) await closeSide(side);
  }
}

function summary(metrics: Metrics): string {
  return Object.entries(metrics)
    .filter(([, v]) =>
      typeof v === "number" ||
      (Array.isArray(v) && v.every((n) => typeof n === "number"))
    )
    .map(([k, v]) => `${k}=${Array.isArray(v) ? JSON.stringify(v) : v}`)
    .join(" ");
}

/**
 * chat / baseline for every figure both have; for the figures of paired
 * runs (`*_by_round`), the mean of the runs' ratios and its 95 % interval
 * (`*_paired`).
 */
function ratios(chat: Metrics, baseline: Metrics): Metrics {
  const out: Metrics = {};
  for (const [key, value] of Object.entries(chat)) {
    const other = baseline[key];
    if (typeof value === "number" && typeof other === "number" && other !== 0) {
      out[key] = round(value / other, 2);
    }
    const numbers = (v: JsonValue | undefined) =>
      Array.isArray(v) && v.every((x) => typeof x === "number")
        ? v as number[]
        : undefined;
    const a = numbers(value);
    const b = numbers(other);
    const r = key.endsWith("_by_round") && a && b
      ? pairedRatio(a, b)
      : undefined;
    if (r !== undefined) {
      out[key.replace(/_by_round$/, "_paired")] = {
        mean: round(r.mean, 3),
        low_95: round(r.low, 3),
        high_95: round(r.high, 3),
      };
    }
  }
  return out;
}

async function machineInfo(): Promise<Metrics> {
  let cpu = "unknown";
  try {
    const info = await readProcFiles(["/proc/cpuinfo"]);
    cpu = info.match(/^model name\s*:\s*(.+)$/m)?.[1]?.trim() ?? cpu;
  } catch {
    // not Linux: the model stays unknown
  }
  return {
    cpu,
    cores: navigator.hardwareConcurrency,
    deno: Deno.version.deno,
    v8: Deno.version.v8,
    memory_mb: Math.round(Deno.systemMemoryInfo().total / 1024 / 1024),
    os: `${Deno.build.os} ${Deno.osRelease()}`,
  };
}

function sizesJson(sizes: BenchSizes): Metrics {
  const out: Metrics = {};
  for (const [key, value] of Object.entries(sizes)) {
    const v: JsonValue = Array.isArray(value) ? value : Number(value);
    out[key] = v;
  }
  return out;
}

if (import.meta.main) Deno.exit(await main());
