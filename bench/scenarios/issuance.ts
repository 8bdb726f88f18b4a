import type { BrokerChild } from '../lib/broker.js';
import { floorLoad, httpLoad } from '../lib/load.js';
import { log } from '../lib/log.js';
import type { IssuanceLevel } from '../lib/results.js';
import { strip } from '../lib/runs.js';
import { LEVELS, SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';
import { compare } from './floor-vs-broker.js';
import { jitWarmup } from './warmup.js';
import type { MemoryAt64 } from './memory.js';

/**
 * P1–P3: POST /credentials against the raw-SQL floor at each concurrency level, for one
 * BROKER_SCRAM_ITERATIONS setting (the broker already runs with it); the 64-client runs also
 * feed the memory figures.
 */
export async function runIssuance(ctx: BenchContext, broker: BrokerChild, iterations: number, memory: MemoryAt64): Promise<void> {
  const levels: IssuanceLevel[] = [];
  const warmup = await jitWarmup(ctx, broker, iterations);
  if (warmup) log(`JIT warm-up, ${warmup.requests} credentials: broker CPU per request by chunk ${warmup.brokerMsPerRequest.map((ms) => ms.toFixed(2)).join(', ')} ms`);
  for (const connections of LEVELS) {
    if (SETTINGS.warmup) {
      await floorLoad(ctx.floorSpec(iterations), connections, { amount: SETTINGS.warmup });
      await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount: Math.max(SETTINGS.warmup, connections), tokens: ctx.tokens, expect: 201 });
    }
    // 16 clients is where P1, P1b and P3 are read: more bursts there, as one 3-burst pair varies by
    // several percent on this shared machine.
    const repeats = connections === 16 ? SETTINGS.targetRepeats : SETTINGS.repeats;
    const { floor, broker: b, maxRss } = await compare(ctx, broker, iterations, connections, SETTINGS.burst, repeats);
    if (connections === 64) await memory.record(broker, maxRss);
    const ratio = b.run.rps / floor.run.rps;
    levels.push({ connections, floor: strip(floor.run), broker: strip(b.run), floorCpu: floor.cpu, brokerCpu: b.cpu, ratio, maxRssMb: maxRss });
    log(`iterations ${iterations}, c=${connections}: floor ${floor.run.rps.toFixed(0)}/s p50 ${floor.run.latency.p50.toFixed(2)} ms | broker ${b.run.rps.toFixed(0)}/s p50 ${b.run.latency.p50.toFixed(2)} ms (errors ${b.run.errors}) ratio ${ratio.toFixed(2)}`);
    if (b.run.errors > 0) log(`  broker non-201 answers: ${JSON.stringify(b.run.statusCounts)}`);
    if (floor.run.errors > 0) log(`  floor errors: ${floor.run.errors} (${floor.run.firstError})`);
  }
  ctx.results.issuance.push({ iterations, levels, warmup });
}
