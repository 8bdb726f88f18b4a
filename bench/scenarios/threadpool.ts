import { BrokerChild } from '../lib/broker.js';
import { log } from '../lib/log.js';
import type { ThreadpoolRun } from '../lib/results.js';
import { DEFAULT_ITERATIONS, PRODUCTION_ENV, SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';
import { compare } from './floor-vs-broker.js';
import { jitWarmup } from './warmup.js';

const LIBUV_DEFAULT = '4';
const CONNECTIONS = 16;

/**
 * The Docker image's UV_THREADPOOL_SIZE against libuv's default, for the broker only: two brokers
 * at the default iteration count, each warmed up and then compared with the floor at 16 clients,
 * in turn, twice. The floor (this process) keeps the image's size throughout.
 */
export async function runThreadpool(ctx: BenchContext): Promise<ThreadpoolRun[]> {
  const sizes = [LIBUV_DEFAULT, PRODUCTION_ENV.UV_THREADPOOL_SIZE || LIBUV_DEFAULT];
  const brokers: BrokerChild[] = [];
  try {
    for (const size of sizes) brokers.push(await BrokerChild.start({ ...ctx.brokerEnv(DEFAULT_ITERATIONS), UV_THREADPOOL_SIZE: size }));
    // The policy the issuance scenario stored is in the database already; the floor is warm from it.
    for (const b of brokers) await jitWarmup(ctx, b, DEFAULT_ITERATIONS, false);
    const runs: ThreadpoolRun[] = sizes.map((size) => ({ size, floorRps: 0, brokerRps: 0, ratios: [] }));
    const rounds = SETTINGS.repeats > 1 ? 2 : 1;
    for (let round = 0; round < rounds; round++) {
      for (const [i, b] of brokers.entries()) {
        const { floor, broker } = await compare(ctx, b, DEFAULT_ITERATIONS, CONNECTIONS);
        const run = runs[i];
        run.ratios.push(broker.run.rps / floor.run.rps);
        run.floorRps += floor.run.rps / rounds;
        run.brokerRps += broker.run.rps / rounds;
        log(`UV_THREADPOOL_SIZE=${run.size}: floor ${floor.run.rps.toFixed(0)}/s, broker ${broker.run.rps.toFixed(0)}/s, ratio ${run.ratios.at(-1)!.toFixed(2)}`);
      }
    }
    return runs;
  } finally {
    for (const b of brokers) await b.close().catch(() => b.kill());
  }
}
