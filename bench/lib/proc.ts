import fs from 'node:fs';

/**
 * CPU and memory of processes from /proc (Linux only): the bench attributes CPU time per
 * issuance to the broker process, to PostgreSQL (postmaster and every backend) and to itself.
 */

interface Stat {
  ppid: number;
}

function readStat(pid: number): Stat | null {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // The command name (field 2) may contain spaces and parentheses; fields after the last ')' do not.
  const rest = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return { ppid: Number(rest[1]) };
}

export function available(): boolean {
  return fs.existsSync('/proc/self/stat');
}

export function parentPid(pid: number): number {
  return readStat(pid)?.ppid ?? 0;
}

/**
 * CPU time of one process in milliseconds, summed over its threads from the scheduler's own
 * accounting (/proc/<pid>/task/<tid>/schedstat, in ns). /proc/<pid>/stat's utime and stime are
 * tick-sampled and smoothed, and on this machine lagged a busy process by whole bursts.
 */
export function processRunMs(pid: number): number {
  let tasks: string[];
  try {
    tasks = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return Number.NaN;
  }
  let ms = 0;
  for (const tid of tasks) {
    const t = threadSched(pid, Number(tid));
    if (Number.isFinite(t.run)) ms += t.run;
  }
  return ms;
}

/**
 * The CPU milliseconds so far of each live PostgreSQL process (the postmaster and its children:
 * backends, walwriter, checkpointer...), by pid. Two snapshots are compared by serverDeltaMs.
 */
export function serverRunMs(postmasterPid: number): Map<number, number> {
  const byPid = new Map<number, number>();
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid !== postmasterPid && readStat(pid)?.ppid !== postmasterPid) continue;
    const ms = processRunMs(pid);
    if (Number.isFinite(ms)) byPid.set(pid, ms);
  }
  return byPid;
}

/**
 * PostgreSQL's CPU between two snapshots: what each process alive at the end used since the
 * first (all of it, for one started in between). A process that exits in between loses its last
 * stretch; the bench keeps the connections it measures open across both snapshots.
 */
export function serverDeltaMs(before: Map<number, number>, after: Map<number, number>): number {
  let ms = 0;
  for (const [pid, run] of after) ms += run - (before.get(pid) ?? 0);
  return ms;
}

/**
 * A thread's scheduler statistics (/proc/<pid>/task/<tid>/schedstat) in milliseconds: time on a
 * CPU and time runnable but waiting for one. For a process's main thread, tid = pid.
 */
export function threadSched(pid: number, tid = pid): { run: number; wait: number } {
  try {
    const [run, wait] = fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').trim().split(/\s+/).map(Number);
    return { run: run / 1e6, wait: wait / 1e6 };
  } catch {
    return { run: Number.NaN, wait: Number.NaN };
  }
}

/** The whole machine's CPU time so far from /proc/stat, in ticks: idle (idle + iowait) and total. */
export function machineTicks(): { idle: number; total: number } {
  try {
    const f = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
    return { idle: f[3] + (f[4] ?? 0), total: f.reduce((a, b) => a + b, 0) };
  } catch {
    return { idle: Number.NaN, total: Number.NaN };
  }
}

/** Current and peak resident set size in MB (VmRSS, VmHWM). */
export function memoryMb(pid: number): { rss: number; hwm: number } {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? Number.NaN);
    return { rss: kb('VmRSS') / 1024, hwm: kb('VmHWM') / 1024 };
  } catch {
    return { rss: Number.NaN, hwm: Number.NaN };
  }
}

/** Samples RSS of `pid` every `everyMs` until stopped; returns the maximum seen. */
export function sampleRss(pid: number, everyMs = 100): { stop(): { maxRss: number; hwm: number } } {
  let maxRss = 0;
  const tick = () => {
    const { rss } = memoryMb(pid);
    if (Number.isFinite(rss)) maxRss = Math.max(maxRss, rss);
  };
  tick();
  const timer = setInterval(tick, everyMs);
  return {
    stop() {
      clearInterval(timer);
      tick();
      return { maxRss, hwm: memoryMb(pid).hwm };
    },
  };
}
