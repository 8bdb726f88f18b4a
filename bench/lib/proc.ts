import { execFileSync } from 'node:child_process';
import fs from 'node:fs';

/**
 * CPU and memory of processes from /proc (Linux only): the bench attributes CPU time per
 * issuance to the broker process, to PostgreSQL (postmaster and every backend) and to itself.
 */

let clkTck = 0;
function ticksPerSecond(): number {
  if (!clkTck) {
    try {
      clkTck = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clkTck = 100;
    }
  }
  return clkTck;
}

interface Stat {
  ppid: number;
  utime: number;
  stime: number;
  cutime: number;
  cstime: number;
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
  return { ppid: Number(rest[1]), utime: Number(rest[11]), stime: Number(rest[12]), cutime: Number(rest[13]), cstime: Number(rest[14]) };
}

export function available(): boolean {
  return fs.existsSync('/proc/self/stat');
}

/** User + system CPU of one process, in milliseconds. */
export function processCpuMs(pid: number): number {
  const s = readStat(pid);
  return s ? ((s.utime + s.stime) * 1000) / ticksPerSecond() : Number.NaN;
}

export function parentPid(pid: number): number {
  return readStat(pid)?.ppid ?? 0;
}

/**
 * CPU of a PostgreSQL server in milliseconds: the postmaster, its reaped children (cutime/cstime:
 * backends that already exited) and its live children (backends, walwriter, checkpointer...).
 */
export function serverCpuMs(postmasterPid: number): number {
  const pm = readStat(postmasterPid);
  if (!pm) return Number.NaN;
  let ticks = pm.utime + pm.stime + pm.cutime + pm.cstime;
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const s = readStat(Number(entry));
    if (s && s.ppid === postmasterPid) ticks += s.utime + s.stime;
  }
  return (ticks * 1000) / ticksPerSecond();
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
