/**
 * The benchmark's outputs: the table printed at the end, and the issue 5
 * targets checked against the figures.
 *
 * @module
 */
import type { BenchSizes, Metrics } from "./scenarios.ts";

/** One scenario's figures for both sides, and chat / baseline. */
export interface ScenarioResult {
  chat: Metrics;
  baseline: Metrics;
  ratio: Metrics;
  /**
   * Set when a column is not what it says: `baseline` is not the baseline
   * server (fanout_big_data), or `chat` is not the chat server (fanout_floor).
   */
  compared_with?: string;
}

/** One target of issue 5 and whether this run met it (`null`: not judged). */
export interface TargetCheck {
  target: string;
  measured: string;
  met: boolean | null;
}

const ROWS: Record<string, string[]> = {
  fanout: [
    "deliveries_per_s",
    "delivered_pct",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "cpu_us_per_delivery",
    "cpu_sys_us_per_delivery",
    "peak_rss_mb",
    "server_cpu_pct",
    "load_cpu_pct",
    "low_rate_p50_ms",
    "low_rate_p99_ms",
    "lockstep_deliveries_per_s",
    "lockstep_p50_ms",
    "lockstep_p99_ms",
    "lockstep_cpu_us_per_delivery",
    "idle_cpu_ms_per_s",
    "startup_ms",
  ],
  fanout_floor: [
    "deliveries_per_s",
    "delivered_pct",
    "p50_ms",
    "p99_ms",
    "cpu_us_per_delivery",
    "cpu_sys_us_per_delivery",
  ],
  fanout_big_data: [
    "startup_ms",
    "auth_startup_ms",
    "deliveries_per_s",
    "delivered_pct",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "cpu_us_per_delivery",
    "idle_cpu_ms_per_s",
    "peak_rss_mb",
  ],
  saturation: ["max_rate_held", "first_rate_not_held"],
  idle: ["connections", "rss_kb_per_conn", "rss_after_mb"],
  connect_storm: [
    "clients",
    "connects_per_s",
    "p50_welcome_ms",
    "p99_welcome_ms",
    "max_welcome_ms",
    "cpu_us_per_connect",
  ],
  auth: [
    "validate_per_s",
    "validate_p99_ms",
    "cpu_us_per_validate",
    "login_per_s",
  ],
};

/** Scenarios whose columns are not what their names say. */
const LABELS: Record<string, string> = {
  fanout_floor: "fanout_floor (chat = bare, contract frames)",
  fanout_big_data: "fanout_big_data (baseline = chat, empty dir)",
};

/**
 * Student's t for a two-sided 95 % interval, by degrees of freedom (1 to 10;
 * more use 10's, a little wide).
 */
const T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23];

/**
 * The paired runs' ratios (`a[k] / b[k]`: the two sides' runs of one turn,
 * measured one after the other): their mean and a 95 % interval of it, so
 * that a ratio near 1 can be told from noise. `undefined` with fewer than
 * two pairs, or a run that delivered nothing.
 */
export function pairedRatio(
  a: readonly number[],
  b: readonly number[],
): { mean: number; low: number; high: number } | undefined {
  const n = Math.min(a.length, b.length);
  if (n < 2) return undefined;
  const ratios = [];
  for (let k = 0; k < n; k++) {
    if (!(a[k]! > 0 && b[k]! > 0)) return undefined;
    ratios.push(a[k]! / b[k]!);
  }
  const mean = ratios.reduce((x, y) => x + y, 0) / n;
  const variance = ratios.reduce((sum, r) => sum + (r - mean) ** 2, 0) /
    (n - 1);
  const half = T95[Math.min(n - 1, T95.length) - 1]! *
    Math.sqrt(variance / n);
  return { mean, low: mean - half, high: mean + half };
}

/** The results as one plain-text table, then the targets. */
export function formatTable(
  results: Record<string, ScenarioResult>,
  targets: TargetCheck[],
): string {
  const rows: string[][] = [[
    "scenario",
    "metric",
    "chat",
    "baseline",
    "ratio",
  ]];
  for (const [name, result] of Object.entries(results)) {
    const label = LABELS[name] ?? name;
    let first = true;
    const cell = () => {
      const text = first ? label : "";
      first = false;
      return text;
    };
    const chatError = typeof result.chat.error === "string";
    const baselineError = typeof result.baseline.error === "string";
    if (chatError || baselineError) {
      rows.push([
        cell(),
        "error (see below)",
        chatError ? "error" : "",
        baselineError ? "error" : "",
        "",
      ]);
    }
    for (const key of ROWS[name] ?? []) {
      const chat = result.chat[key];
      const baseline = result.baseline[key];
      if (chat === undefined && baseline === undefined) continue;
      // A climb that ran out of steps held at least that much.
      const atLeast = (m: Metrics) =>
        key === "max_rate_held" && m.ceiling_of_steps_reached === true
          ? "+"
          : "";
      rows.push([
        cell(),
        key,
        show(chat) + atLeast(result.chat),
        show(baseline) + atLeast(result.baseline),
        show(result.ratio[key]) +
        (atLeast(result.chat) && !atLeast(result.baseline) ? "+" : ""),
      ]);
    }
  }
  const widths = rows[0]!.map((_, c) =>
    Math.max(...rows.map((row) => (row[c] ?? "").length))
  );
  const lines = rows.map((row) =>
    row.map((text, c) =>
      c < 2 ? text.padEnd(widths[c]!) : text.padStart(widths[c]!)
    ).join("  ").trimEnd()
  );
  lines.splice(1, 0, widths.map((w) => "-".repeat(w)).join("  "));
  lines.push("");
  for (const [name, result] of Object.entries(results)) {
    for (const side of ["chat", "baseline"] as const) {
      const error = result[side].error;
      if (typeof error === "string") {
        lines.push(`${name} ${side}: ${error.split("\n")[0]}`);
      }
    }
  }
  for (const t of targets) {
    const verdict = t.met === null ? "not judged" : t.met ? "met" : "MISSED";
    lines.push(`[${verdict}] ${t.target}: ${t.measured}`);
  }
  return lines.join("\n");
}

/** Checks the figures against the targets of issue 5. */
export function evaluateTargets(
  results: Record<string, ScenarioResult>,
  options: { judge: boolean; sizes: BenchSizes },
): TargetCheck[] {
  const { judge, sizes } = options;
  const get = (scenario: string, side: keyof ScenarioResult, key: string) => {
    const metrics = results[scenario]?.[side];
    if (typeof metrics !== "object") return undefined;
    const value = metrics[key];
    return typeof value === "number" ? value : undefined;
  };
  const checks: TargetCheck[] = [];
  const check = (
    target: string,
    values: (number | undefined)[],
    measured: (v: number[]) => string,
    /** Omitted: a figure shown beside the targets, never judged. */
    met?: (v: number[]) => boolean,
  ) => {
    if (!values.every((v): v is number => v !== undefined)) {
      checks.push({ target, measured: "not measured", met: null });
      return;
    }
    checks.push({
      target,
      measured: measured(values),
      met: judge && met !== undefined ? met(values) : null,
    });
  };
  const offered = sizes.senders * sizes.ratePerSender * sizes.fanoutClients;
  /** What the paired runs say of a CPU ratio ("" when not measured). */
  const paired = (scenario: string, key: string) => {
    const r = results[scenario]?.ratio?.[`${key}_paired`];
    if (typeof r !== "object" || r === null || Array.isArray(r)) return "";
    const { mean, low_95: low, high_95: high } = r;
    if (![mean, low, high].every((v) => typeof v === "number")) return "";
    return `; the paired runs: mean ${fmt(mean as number)}, 95 % interval ${
      fmt(low as number)
    } to ${fmt(high as number)}`;
  };

  check(
    "5 fan-out CPU per delivery: chat/baseline <= 1.0",
    [
      get("fanout", "chat", "cpu_us_per_delivery"),
      get("fanout", "baseline", "cpu_us_per_delivery"),
    ],
    ([c, b]) =>
      `${c} vs ${b} us (ratio ${fmt(c! / b!)}${
        paired("fanout", "cpu_us_per_delivery")
      })`,
    ([c, b]) => c! <= b!,
  );
  check(
    "5 fan-out p99: chat <= baseline",
    [get("fanout", "chat", "p99_ms"), get("fanout", "baseline", "p99_ms")],
    ([c, b]) => `${c} vs ${b} ms`,
    ([c, b]) => c! <= b!,
  );
  check(
    "5 fan-out, senders in lockstep: CPU per delivery chat/baseline <= 1.0",
    [
      get("fanout", "chat", "lockstep_cpu_us_per_delivery"),
      get("fanout", "baseline", "lockstep_cpu_us_per_delivery"),
    ],
    ([c, b]) =>
      `${c} vs ${b} us (ratio ${fmt(c! / b!)}${
        paired("fanout", "lockstep_cpu_us_per_delivery")
      })`,
    ([c, b]) => c! <= b!,
  );
  check(
    "5 fan-out, senders in lockstep: p99 chat <= baseline",
    [
      get("fanout", "chat", "lockstep_p99_ms"),
      get("fanout", "baseline", "lockstep_p99_ms"),
    ],
    ([c, b]) => `${c} vs ${b} ms`,
    ([c, b]) => c! <= b!,
  );
  check(
    `5 fan-out: all ${offered} deliveries/s delivered`,
    [
      get("fanout", "chat", "delivered_pct"),
      get("fanout", "chat", "deliveries_per_s"),
    ],
    ([pct, rate]) => `${rate}/s, ${pct}% of offered`,
    ([pct]) => pct! >= 99.9,
  );
  check(
    "(context for 5) the contract's frames alone, bare: CPU per delivery floor/baseline",
    [
      get("fanout_floor", "chat", "cpu_us_per_delivery"),
      get("fanout_floor", "baseline", "cpu_us_per_delivery"),
    ],
    ([f, b]) =>
      `${f} vs ${b} us (ratio ${fmt(f! / b!)}${
        paired("fanout_floor", "cpu_us_per_delivery")
      }; not a target)`,
  );
  check(
    "5 delay added at a low rate < 5 ms (p50, chat - baseline)",
    [
      get("fanout", "chat", "low_rate_p50_ms"),
      get("fanout", "baseline", "low_rate_p50_ms"),
    ],
    ([c, b]) => `${c} vs ${b} ms`,
    ([c, b]) => c! - b! < 5,
  );
  check(
    "6 idle RSS per connection: chat/baseline <= 1.25",
    [
      get("idle", "chat", "rss_kb_per_conn"),
      get("idle", "baseline", "rss_kb_per_conn"),
    ],
    ([c, b]) => `${c} vs ${b} KiB (ratio ${fmt(c! / b!)})`,
    ([c, b]) => c! <= 1.25 * b!,
  );
  check(
    "7 saturation rate: chat/baseline >= 1.5",
    [
      get("saturation", "chat", "max_rate_held"),
      get("saturation", "baseline", "max_rate_held"),
    ],
    ([c, b]) =>
      `${c}${
        results.saturation?.chat.ceiling_of_steps_reached === true
          ? "+ (the steps ran out before the chat server did)"
          : ""
      } vs ${b} deliveries/s (ratio ${fmt(c! / b!)})`,
    ([c, b]) => c! >= 1.5 * b!,
  );
  check(
    "8 /validate_token >= 10000 requests/s",
    [get("auth", "chat", "validate_per_s")],
    ([v]) => `${v}/s`,
    ([v]) => v! >= 10_000,
  );
  check(
    `8 connect storm of ${sizes.stormClients}: all connected, p99 welcome < 2000 ms`,
    [
      get("connect_storm", "chat", "p99_welcome_ms"),
      get("connect_storm", "chat", "clients"),
    ],
    ([p99, n]) => `${n} connected, p99 ${p99} ms`,
    ([p99, n]) => p99! < 2000 && n === sizes.stormClients,
  );
  for (const key of ["cpu_us_per_delivery", "p99_ms"]) {
    check(
      `9 big data: fan-out ${key} within 10% of the empty data dir`,
      [
        get("fanout_big_data", "chat", key),
        get("fanout_big_data", "baseline", key),
      ],
      ([big, empty]) =>
        `${big} vs ${empty} (ratio ${fmt(big! / empty!)}${
          key === "cpu_us_per_delivery"
            ? paired("fanout_big_data", "cpu_us_per_delivery")
            : ""
        })`,
      ([big, empty]) => big! <= 1.1 * empty!,
    );
  }
  check(
    "9 big data: fan-out deliveries/s within 10% of the empty data dir",
    [
      get("fanout_big_data", "chat", "deliveries_per_s"),
      get("fanout_big_data", "baseline", "deliveries_per_s"),
    ],
    ([big, empty]) => `${big} vs ${empty} (ratio ${fmt(big! / empty!)})`,
    ([big, empty]) => big! >= 0.9 * empty!,
  );
  check(
    "9 big data: chat start-up < 3000 ms",
    [
      get("fanout_big_data", "chat", "startup_ms"),
      get("fanout_big_data", "chat", "auth_startup_ms"),
    ],
    ([chat, auth]) => `chat ${chat} ms, auth ${auth} ms`,
    ([chat, auth]) => chat! < 3000 && auth! < 3000,
  );
  return checks;
}

function show(value: unknown): string {
  if (value === undefined || value === null) return "-";
  if (typeof value === "number") return fmt(value);
  return String(value);
}

function fmt(value: number): string {
  if (!Number.isFinite(value)) return String(value);
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toFixed(2);
}
