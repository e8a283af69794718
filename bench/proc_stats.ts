/**
 * CPU time and memory of a process, from the kernel's own accounting in
 * `/proc/PID/stat`, `/proc/PID/status` and each thread's
 * `/proc/PID/task/TID/schedstat` (Linux only).
 *
 * `/proc/PID/stat` gives CPU time in clock ticks (10 ms here): over a 1.25 s
 * run of 50,000 deliveries that is 0.2 us per delivery, a few percent of the
 * figure being compared. Each thread's `schedstat` gives its time on a CPU in
 * nanoseconds; {@linkcode cpuDeltaUs} adds those up over the threads, and
 * falls back to the ticks only when a thread ended between two readings (its
 * time would be lost).
 *
 * @module
 */

/** One reading of a process's counters. */
export interface ProcSample {
  /** User plus system CPU time of all its threads so far, in microseconds. */
  cpuUs: number;
  /** The user-mode part of {@linkcode cpuUs}. */
  userUs: number;
  /** The kernel part of {@linkcode cpuUs} (system calls: socket writes, ...). */
  sysUs: number;
  /** Resident set size now, in KiB (`VmRSS`). */
  rssKb: number;
  /** Peak resident set size over the process's life, in KiB (`VmHWM`). */
  peakRssKb: number;
  /**
   * Each thread's time on a CPU so far, in nanoseconds (`schedstat`), by
   * thread id; empty where the kernel does not give it.
   */
  threadNs: Map<number, number>;
}

/**
 * CPU time between two readings of one process, in microseconds: from the
 * threads' nanosecond counters when every thread of the first reading is in
 * the second (a thread that starts in between counts from zero), else from
 * the clock ticks of `/proc/PID/stat`.
 */
export function cpuDeltaUs(before: ProcSample, after: ProcSample): number {
  if (before.threadNs.size === 0 || after.threadNs.size === 0) {
    return after.cpuUs - before.cpuUs;
  }
  let ns = 0;
  for (const [tid, start] of before.threadNs) {
    const end = after.threadNs.get(tid);
    if (end === undefined || end < start) return after.cpuUs - before.cpuUs;
    ns += end - start;
  }
  for (const [tid, end] of after.threadNs) {
    if (!before.threadNs.has(tid)) ns += end;
  }
  return ns / 1000;
}

let clockTicks: number | undefined;

/**
 * Clock ticks per second of `/proc/PID/stat` (`getconf CLK_TCK`); 100 when
 * `getconf` cannot be run.
 */
export async function clockTicksPerSecond(): Promise<number> {
  if (clockTicks !== undefined) return clockTicks;
  clockTicks = 100;
  try {
    const out = await new Deno.Command("getconf", {
      args: ["CLK_TCK"],
      stdout: "piped",
      stderr: "null",
    }).output();
    const value = Number(new TextDecoder().decode(out.stdout).trim());
    if (out.success && Number.isInteger(value) && value > 0) {
      clockTicks = value;
    }
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
  return clockTicks;
}

/** Marks where the thread counters begin in {@linkcode READ_SCRIPT}'s output. */
const THREADS_MARK = "--threads--";

/**
 * Prints `/proc/PID/stat` and `/proc/PID/status`, then one `TID NS` line per
 * thread (a thread that ends meanwhile is left out); fails if the process is
 * gone.
 */
const READ_SCRIPT = `cat "/proc/$1/stat" "/proc/$1/status" || exit 1
echo "${THREADS_MARK}"
for t in /proc/"$1"/task/*; do
  read ns rest 2>/dev/null < "$t/schedstat" && echo "\${t##*/} $ns"
done
exit 0`;

/**
 * Reads the CPU time and memory of process `pid`.
 *
 * Deno refuses `Deno.readTextFile` under `/proc` without `--allow-all`, so
 * the files are read through `sh` and `cat` (short processes per sample).
 */
export async function readProcStats(pid: number): Promise<ProcSample> {
  const ticks = await clockTicksPerSecond();
  const out = await new Deno.Command("sh", {
    args: ["-c", READ_SCRIPT, "sh", String(pid)],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(
      `Cannot read /proc/${pid}: ${
        new TextDecoder().decode(out.stderr).trim()
      }`,
    );
  }
  return parseProcText(new TextDecoder().decode(out.stdout), ticks);
}

/** A {@linkcode ProcSample} from what {@linkcode READ_SCRIPT} printed. */
export function parseProcText(text: string, ticks: number): ProcSample {
  const newline = text.indexOf("\n");
  const stat = text.slice(0, newline);
  const mark = text.indexOf(`\n${THREADS_MARK}\n`);
  const status = text.slice(newline + 1, mark === -1 ? undefined : mark);
  const { user, system } = parseCpuSplit(stat);
  const threadNs = new Map<number, number>();
  if (mark !== -1) {
    const lines = text.slice(mark + THREADS_MARK.length + 2).split("\n");
    for (const line of lines) {
      const [tid, ns] = line.split(" ").map(Number);
      if (Number.isSafeInteger(tid) && Number.isSafeInteger(ns)) {
        threadNs.set(tid!, ns!);
      }
    }
  }
  return {
    cpuUs: (user + system) * 1_000_000 / ticks,
    userUs: user * 1_000_000 / ticks,
    sysUs: system * 1_000_000 / ticks,
    rssKb: parseStatusKb(status, "VmRSS"),
    peakRssKb: parseStatusKb(status, "VmHWM"),
    threadNs,
  };
}

/** The concatenated text of some files under `/proc`, through `cat`. */
export async function readProcFiles(paths: string[]): Promise<string> {
  const out = await new Deno.Command("cat", {
    args: paths,
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(
      `Cannot read ${paths.join(", ")}: ${
        new TextDecoder().decode(out.stderr).trim()
      }`,
    );
  }
  return new TextDecoder().decode(out.stdout);
}

/**
 * utime + stime, in clock ticks, from the text of `/proc/PID/stat`. The
 * command name (field 2) may contain spaces and parentheses, so fields are
 * counted from its closing parenthesis.
 */
export function parseCpuTicks(stat: string): number {
  const { user, system } = parseCpuSplit(stat);
  return user + system;
}

/** utime and stime, in clock ticks, from the text of `/proc/PID/stat`. */
export function parseCpuSplit(stat: string): { user: number; system: number } {
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // rest[0] is field 3 (state); utime is field 14 and stime field 15.
  const user = Number(rest[11]);
  const system = Number(rest[12]);
  if (!Number.isFinite(user) || !Number.isFinite(system)) {
    throw new Error(`Cannot read CPU time: unexpected /proc stat "${stat}"`);
  }
  return { user, system };
}

/** A `Name:   1234 kB` line of `/proc/PID/status`, in KiB. */
export function parseStatusKb(status: string, name: string): number {
  const match = status.match(new RegExp(`^${name}:\\s+(\\d+) kB`, "m"));
  if (match === null || match[1] === undefined) {
    throw new Error(`Cannot read ${name}: not in /proc status`);
  }
  return Number(match[1]);
}
