import type { BrokerChild } from '../lib/broker.js';
import { addSpent, cpuMark, NOTHING_SPENT, perOp, spent, type CpuMark } from '../lib/cpu.js';
import { floorLoad, httpLoad, type LoadRun } from '../lib/load.js';
import { dropIssuedRoles } from '../lib/population.js';
import * as proc from '../lib/proc.js';
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
    floor: { runs: [] as LoadRun[], spent: NOTHING_SPENT },
    broker: { runs: [] as LoadRun[], spent: NOTHING_SPENT },
  };
  let maxRss = 0;
  const amount = Math.max(burst, connections);
  for (let r = 0; r < repeats; r++) {
    for (const side of ['floor', 'broker'] as const) {
      await dropIssuedRoles(pgs, 'runs');
      const sampler = side === 'broker' ? proc.sampleRss(broker.pid) : null;
      let mark = cpuMark(broker.pid, pmPid);
      let end: CpuMark | undefined;
      // The floor's marks leave out its logins: autocannon's connections cost no authentication.
      const around = { start: () => (mark = cpuMark(broker.pid, pmPid)), end: () => (end = cpuMark(broker.pid, pmPid)) };
      const run = side === 'floor'
        ? await floorLoad(ctx.floorSpec(iterations), connections, { amount }, around)
        : await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount, tokens, expect: 201 });
      const after = end ?? cpuMark(broker.pid, pmPid);
      if (sampler) maxRss = Math.max(maxRss, sampler.stop().maxRss);
      const acc = sides[side];
      acc.spent = addSpent(acc.spent, spent(mark, after));
      acc.runs.push(run);
    }
  }
  await dropIssuedRoles(pgs, 'runs');
  const done = (acc: (typeof sides)['floor']) => {
    const run = combine(acc.runs);
    return { run, cpu: perOp(acc.spent, run.ok, acc === sides.broker) };
  };
  return { floor: done(sides.floor), broker: done(sides.broker), maxRss };
}
