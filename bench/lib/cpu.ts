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
}

export function cpuMark(brokerPid: number, pmPid: number): CpuMark {
  const self = process.cpuUsage();
  return { broker: proc.processCpuMs(brokerPid), pg: proc.serverCpuMs(pmPid), client: (self.user + self.system) / 1000 };
}

export function cpuPerOp(before: CpuMark, after: CpuMark, ops: number): CpuPerOp {
  const per = (a: number, b: number) => (ops > 0 ? (b - a) / ops : Number.NaN);
  return { broker: per(before.broker, after.broker), pg: per(before.pg, after.pg), client: per(before.client, after.client) };
}
