import * as proc from './proc.js';
import type { CpuPerOp } from './results.js';

/**
 * CPU accounting from /proc: a mark of the CPU milliseconds used so far by the broker process,
 * all PostgreSQL processes and the bench process, and the difference of two marks per operation.
 */

export interface CpuMark {
  broker: number;
  pg: number;
  client: number;
  /** The machine's idle and total CPU ticks (all cores), for the idle share between two marks. */
  machine: { idle: number; total: number };
  /** The broker's main thread (its event loop): ms on a CPU and ms runnable but waiting for one. */
  loop: { run: number; wait: number };
}

export function cpuMark(brokerPid: number, pmPid: number): CpuMark {
  const self = process.cpuUsage();
  return { broker: proc.processCpuMs(brokerPid), pg: proc.serverCpuMs(pmPid), client: (self.user + self.system) / 1000, machine: proc.machineTicks(), loop: proc.threadSched(brokerPid) };
}

export function cpuPerOp(before: CpuMark, after: CpuMark, ops: number): CpuPerOp {
  const per = (a: number, b: number) => (ops > 0 ? (b - a) / ops : Number.NaN);
  const total = after.machine.total - before.machine.total;
  const idle = total > 0 ? (after.machine.idle - before.machine.idle) / total : Number.NaN;
  return { broker: per(before.broker, after.broker), pg: per(before.pg, after.pg), client: per(before.client, after.client), idle, loopRun: per(before.loop.run, after.loop.run), loopWait: per(before.loop.wait, after.loop.wait) };
}
