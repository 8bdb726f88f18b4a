import * as proc from './proc.js';
import type { CpuPerOp } from './results.js';

/**
 * CPU accounting from /proc: marks of the CPU time used so far by the broker process, every
 * PostgreSQL process and the bench process (all from the scheduler's schedstat), of the machine's
 * idle time and of the broker's event loop; the difference of two marks; and that per operation.
 */

export interface CpuMark {
  broker: number;
  /** By pid: see proc.serverRunMs. */
  pg: Map<number, number>;
  client: number;
  /** The machine's idle and total CPU ticks (all cores), for the idle share between two marks. */
  machine: { idle: number; total: number };
  /** The broker's main thread (its event loop): ms on a CPU and ms runnable but waiting for one. */
  loop: { run: number; wait: number };
}

/** What was used between two marks, in ms (machine: ticks). */
export interface CpuSpent {
  broker: number;
  pg: number;
  client: number;
  machine: { idle: number; total: number };
  loop: { run: number; wait: number };
}

export const NOTHING_SPENT: CpuSpent = { broker: 0, pg: 0, client: 0, machine: { idle: 0, total: 0 }, loop: { run: 0, wait: 0 } };

export function cpuMark(brokerPid: number, pmPid: number): CpuMark {
  return {
    broker: proc.processRunMs(brokerPid),
    pg: proc.serverRunMs(pmPid),
    client: proc.processRunMs(process.pid),
    machine: proc.machineTicks(),
    loop: proc.threadSched(brokerPid),
  };
}

export function spent(before: CpuMark, after: CpuMark): CpuSpent {
  return {
    broker: after.broker - before.broker,
    pg: proc.serverDeltaMs(before.pg, after.pg),
    client: after.client - before.client,
    machine: { idle: after.machine.idle - before.machine.idle, total: after.machine.total - before.machine.total },
    loop: { run: after.loop.run - before.loop.run, wait: after.loop.wait - before.loop.wait },
  };
}

export function addSpent(a: CpuSpent, b: CpuSpent): CpuSpent {
  return {
    broker: a.broker + b.broker,
    pg: a.pg + b.pg,
    client: a.client + b.client,
    machine: { idle: a.machine.idle + b.machine.idle, total: a.machine.total + b.machine.total },
    loop: { run: a.loop.run + b.loop.run, wait: a.loop.wait + b.loop.wait },
  };
}

/** Per operation; `withLoop` only when the broker was the side under load (else its loop idled). */
export function perOp(s: CpuSpent, ops: number, withLoop = true): CpuPerOp {
  const per = (v: number) => (ops > 0 ? v / ops : Number.NaN);
  const idle = s.machine.total > 0 ? s.machine.idle / s.machine.total : Number.NaN;
  return { broker: per(s.broker), pg: per(s.pg), client: per(s.client), idle, ...(withLoop ? { loopRun: per(s.loop.run), loopWait: per(s.loop.wait) } : {}) };
}

export function cpuPerOp(before: CpuMark, after: CpuMark, ops: number): CpuPerOp {
  return perOp(spent(before, after), ops);
}
