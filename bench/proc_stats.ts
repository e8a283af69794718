/**
 * CPU time and memory of a process, from the kernel's own accounting in
 * `/proc/PID/stat` and `/proc/PID/status` (Linux only).
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

/**
 * Reads the CPU time and memory of process `pid`.
 *
 * Deno refuses `Deno.readTextFile` under `/proc` without `--allow-all`, so
 * the files are read through `cat` (one short process per sample).
 */
export async function readProcStats(pid: number): Promise<ProcSample> {
  const ticks = await clockTicksPerSecond();
  const text = await readProcFiles([
    `/proc/${pid}/stat`,
    `/proc/${pid}/status`,
  ]);
  const newline = text.indexOf("\n");
  const stat = text.slice(0, newline);
  const status = text.slice(newline + 1);
  const { user, system } = parseCpuSplit(stat);
  return {
    cpuUs: (user + system) * 1_000_000 / ticks,
    userUs: user * 1_000_000 / ticks,
    sysUs: system * 1_000_000 / ticks,
    rssKb: parseStatusKb(status, "VmRSS"),
    peakRssKb: parseStatusKb(status, "VmHWM"),
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
