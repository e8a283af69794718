// deno-lint-ignore-file no-console
/**
 * Summarises a V8 `.cpuprofile` (as written by `deno run --cpu-prof`, or by
 * `deno task bench --cpu-prof DIR`): where the process spent its sampled
 * time, by function (self time) and by script.
 *
 * Usage: `deno run --allow-read bench/profile_summary.ts FILE.cpuprofile [TOP] [--window FROM_S TO_S]`
 *
 * `--window` keeps the samples taken from FROM_S to TO_S seconds after the
 * profile began; the bench prints each run's `window_s_after_spawn`.
 *
 * @module
 */

/** One row of the summary. */
export interface ProfileRow {
  name: string;
  selfMs: number;
  percent: number;
}

/** Self time by function and by script, biggest first. */
export interface ProfileSummary {
  /** Sampled time not idle (the rows' 100%). */
  totalMs: number;
  idleMs: number;
  functions: ProfileRow[];
  scripts: ProfileRow[];
}

interface Node {
  name: string;
  script: string;
}

/**
 * Summarises a parsed `.cpuprofile` document; with `window` (seconds since
 * the profile started, which is within a few tens of ms of the process
 * spawn), only the samples taken in it.
 */
export function summarizeProfile(
  profile: unknown,
  window?: [number, number],
): ProfileSummary {
  const doc = asRecord(profile);
  const nodes = new Map<number, Node>();
  for (const item of asArray(doc.nodes)) {
    const node = asRecord(item);
    const frame = asRecord(node.callFrame);
    const url = typeof frame.url === "string" ? frame.url : "";
    const fn = typeof frame.functionName === "string" && frame.functionName
      ? frame.functionName
      : "(anonymous)";
    const line = typeof frame.lineNumber === "number"
      ? frame.lineNumber + 1
      : 0;
    const script = url === ""
      ? "(native)"
      : url.replace(/^.*\/work\/main\//, "");
    const name = url === "" ? fn : `${fn} ${script}:${line}`;
    if (typeof node.id === "number") nodes.set(node.id, { name, script });
  }
  const samples = asArray(doc.samples);
  const deltas = asArray(doc.timeDeltas);
  const byFunction = new Map<string, number>();
  const byScript = new Map<string, number>();
  let totalUs = 0;
  let idleUs = 0;
  let elapsedUs = 0;
  for (let i = 0; i < samples.length; i++) {
    const id = samples[i];
    const delta = deltas[i];
    elapsedUs += typeof delta === "number" ? delta : 0;
    if (
      window !== undefined &&
      (elapsedUs < window[0] * 1e6 || elapsedUs > window[1] * 1e6)
    ) continue;
    // timeDeltas[i + 1] is the time until the next sample: this sample's share.
    const next = deltas[i + 1];
    const us = typeof next === "number" ? next : 0;
    const node = typeof id === "number" ? nodes.get(id) : undefined;
    if (node === undefined) continue;
    if (node.name === "(idle)") {
      idleUs += us;
      continue;
    }
    totalUs += us;
    byFunction.set(node.name, (byFunction.get(node.name) ?? 0) + us);
    byScript.set(node.script, (byScript.get(node.script) ?? 0) + us);
  }
  const rows = (map: Map<string, number>) =>
    [...map].sort((a, b) => b[1] - a[1]).map(([name, us]) => ({
      name,
      selfMs: Math.round(us / 100) / 10,
      percent: totalUs === 0 ? 0 : Math.round(1000 * us / totalUs) / 10,
    }));
  return {
    totalMs: Math.round(totalUs / 1000),
    idleMs: Math.round(idleUs / 1000),
    functions: rows(byFunction),
    scripts: rows(byScript),
  };
}

function asRecord(value: unknown): Record<string, unknown> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Error("Cannot read the profile: expected a JSON object");
  }
  return Object.fromEntries(Object.entries(value));
}

function asArray(value: unknown): unknown[] {
  if (!Array.isArray(value)) {
    throw new Error("Cannot read the profile: expected a list");
  }
  return value;
}

if (import.meta.main) {
  const args = [...Deno.args];
  let window: [number, number] | undefined;
  const at = args.indexOf("--window");
  if (at !== -1) {
    window = [Number(args[at + 1]), Number(args[at + 2])];
    args.splice(at, 3);
  }
  const [file, topText = "25"] = args;
  if (file === undefined || (window && !window.every(Number.isFinite))) {
    console.error(
      "Usage: deno run --allow-read bench/profile_summary.ts FILE.cpuprofile [TOP] [--window FROM_S TO_S]",
    );
    Deno.exit(2);
  }
  const top = Number(topText);
  const summary = summarizeProfile(
    JSON.parse(await Deno.readTextFile(file)),
    window,
  );
  console.log(
    `sampled ${summary.totalMs} ms busy (${summary.idleMs} ms idle not shown)`,
  );
  console.log("\nself time by script:");
  for (const row of summary.scripts.slice(0, 12)) {
    console.log(`${row.percent.toFixed(1).padStart(6)}%  ${row.name}`);
  }
  console.log("\nself time by function:");
  for (const row of summary.functions.slice(0, top)) {
    console.log(`${row.percent.toFixed(1).padStart(6)}%  ${row.name}`);
  }
}
