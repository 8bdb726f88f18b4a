import type { BrokerChild } from '../lib/broker.js';
import { cpuMark } from '../lib/cpu.js';
import { floorLoad, httpLoad, type LoadRun } from '../lib/load.js';
import { dropIssuedRoles } from '../lib/population.js';
import * as proc from '../lib/proc.js';
import type { CpuPerOp } from '../lib/results.js';
import { combine } from '../lib/runs.js';
import { SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';

/**
 * Floor and broker, burst after burst in turn (floor first), `repeats` bursts of `burst`
 * credentials each, every burst starting from the same role population; alternating keeps
 * drift on a shared machine from landing on one side only.
 */
export async function compare(ctx: BenchContext, broker: BrokerChild, iterations: number, connections: number, burst = SETTINGS.burst, repeats = SETTINGS.repeats) {
  const { pgs, pmPid, tokens } = ctx;
  const sides = {
    floor: { runs: [] as LoadRun[], cpu: { broker: 0, pg: 0, client: 0 } as CpuPerOp, machine: { idle: 0, total: 0 }, loop: { run: 0, wait: 0 } },
    broker: { runs: [] as LoadRun[], cpu: { broker: 0, pg: 0, client: 0 } as CpuPerOp, machine: { idle: 0, total: 0 }, loop: { run: 0, wait: 0 } },
  };
  let maxRss = 0;
  const amount = Math.max(burst, connections);
  for (let r = 0; r < repeats; r++) {
    for (const side of ['floor', 'broker'] as const) {
      await dropIssuedRoles(pgs, 'runs');
      const sampler = side === 'broker' ? proc.sampleRss(broker.pid) : null;
      const mark = cpuMark(broker.pid, pmPid);
      const run = side === 'floor'
        ? await floorLoad(ctx.floorSpec(iterations), connections, { amount })
        : await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount, tokens, expect: 201 });
      const after = cpuMark(broker.pid, pmPid);
      if (sampler) maxRss = Math.max(maxRss, sampler.stop().maxRss);
      const acc = sides[side];
      acc.cpu = { broker: acc.cpu.broker + after.broker - mark.broker, pg: acc.cpu.pg + after.pg - mark.pg, client: acc.cpu.client + after.client - mark.client };
      acc.machine = { idle: acc.machine.idle + after.machine.idle - mark.machine.idle, total: acc.machine.total + after.machine.total - mark.machine.total };
      acc.loop = { run: acc.loop.run + after.loop.run - mark.loop.run, wait: acc.loop.wait + after.loop.wait - mark.loop.wait };
      acc.runs.push(run);
    }
  }
  await dropIssuedRoles(pgs, 'runs');
  const done = (acc: (typeof sides)['floor']) => {
    const run = combine(acc.runs);
    const idle = acc.machine.total > 0 ? acc.machine.idle / acc.machine.total : Number.NaN;
    // Only the broker side's loop figures mean anything: during the floor's bursts the broker idles.
    const loop = acc === sides.broker ? { loopRun: acc.loop.run / run.ok, loopWait: acc.loop.wait / run.ok } : {};
    return { run, cpu: { broker: acc.cpu.broker / run.ok, pg: acc.cpu.pg / run.ok, client: acc.cpu.client / run.ok, idle, ...loop } };
  };
  return { floor: done(sides.floor), broker: done(sides.broker), maxRss };
}
