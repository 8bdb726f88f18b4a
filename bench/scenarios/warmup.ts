import type { BrokerChild } from '../lib/broker.js';
import { cpuMark, spent } from '../lib/cpu.js';
import { floorLoad, httpLoad } from '../lib/load.js';
import { dropIssuedRoles } from '../lib/population.js';
import type { JitWarmup } from '../lib/results.js';
import { SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';

const CONNECTIONS = 16;
const CHUNKS = 6;

/**
 * Brings a freshly started broker to V8's steady state before it is measured: its JIT keeps
 * optimising for several thousand requests (TurboFan compiles on helper threads that take their
 * CPU from the same 2 cores), which a broker that has been serving for a while no longer pays.
 * `SETTINGS.jitWarmup` credentials at 16 clients in chunks, roles dropped after each, with the
 * broker's CPU per request per chunk as the evidence; with `floor`, the floor (this process's
 * pg clients and PBKDF2) gets as many first.
 */
export async function jitWarmup(ctx: BenchContext, broker: BrokerChild, iterations: number, floor = true): Promise<JitWarmup | undefined> {
  const total = SETTINGS.jitWarmup;
  if (!total) return undefined;
  const { pgs, pmPid, tokens } = ctx;
  if (floor) {
    await floorLoad(ctx.floorSpec(iterations), CONNECTIONS, { amount: total });
    await dropIssuedRoles(pgs, 'runs');
  }
  // autocannon needs at least one request per connection.
  const chunk = Math.max(Math.ceil(total / CHUNKS), CONNECTIONS);
  const brokerMsPerRequest: number[] = [];
  for (let done = 0; done < total; done += chunk) {
    const before = cpuMark(broker.pid, pmPid);
    const run = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections: CONNECTIONS, amount: Math.max(Math.min(chunk, total - done), CONNECTIONS), tokens, expect: 201 });
    brokerMsPerRequest.push(spent(before, cpuMark(broker.pid, pmPid)).broker / Math.max(run.ok, 1));
    await dropIssuedRoles(pgs, 'runs');
  }
  return { requests: total, connections: CONNECTIONS, chunk, brokerMsPerRequest };
}
