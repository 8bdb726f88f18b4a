import { BrokerChild } from '../lib/broker.js';
import { httpLoad } from '../lib/load.js';
import { log } from '../lib/log.js';
import type { ThreadpoolRun } from '../lib/results.js';
import { DEFAULT_ITERATIONS, PRODUCTION_ENV, PRODUCTION_NODE_FLAGS, SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';
import { compare } from './floor-vs-broker.js';

const LIBUV_DEFAULT = '4';
const CONNECTIONS = 16;

/**
 * The Docker image's runtime settings against Node's defaults, for the broker only, one step at
 * a time: libuv's default pool with V8's default GC, the image's pool size with V8's default GC,
 * then the image as it is (its pool size and its ENTRYPOINT node flags). Each broker runs at the
 * default iteration count, is warmed up, and is then compared with the floor at 16 clients, in
 * turn, twice. The floor (this process) keeps the image's settings throughout.
 */
export async function runThreadpool(ctx: BenchContext): Promise<ThreadpoolRun[]> {
  const imageSize = PRODUCTION_ENV.UV_THREADPOOL_SIZE || LIBUV_DEFAULT;
  const arms: Array<{ size: string; nodeFlags: string[] }> = [
    { size: LIBUV_DEFAULT, nodeFlags: [] },
    { size: imageSize, nodeFlags: [] },
    { size: imageSize, nodeFlags: PRODUCTION_NODE_FLAGS },
  ].filter((arm, i, all) => all.findIndex((a) => a.size === arm.size && a.nodeFlags.join(' ') === arm.nodeFlags.join(' ')) === i);
  const brokers: BrokerChild[] = [];
  try {
    for (const arm of arms) {
      brokers.push(await BrokerChild.start({ ...ctx.brokerEnv(DEFAULT_ITERATIONS), UV_THREADPOOL_SIZE: arm.size }, { nodeFlags: arm.nodeFlags }));
    }
    // JIT warm-up; the policy the issuance scenario stored is in the database already.
    for (const b of brokers) await httpLoad({ url: b.url, path: '/credentials', body: '{}', connections: CONNECTIONS, amount: SETTINGS.warmup * 20 || CONNECTIONS, tokens: ctx.tokens, expect: 201 });
    const runs: ThreadpoolRun[] = arms.map((arm) => ({ ...arm, floorRps: 0, brokerRps: 0, ratios: [] }));
    const rounds = SETTINGS.repeats > 1 ? 2 : 1;
    for (let round = 0; round < rounds; round++) {
      // Every other round in reverse, so no arm always runs first or last.
      const order = round % 2 === 0 ? [...brokers.keys()] : [...brokers.keys()].reverse();
      for (const i of order) {
        const { floor, broker } = await compare(ctx, brokers[i], DEFAULT_ITERATIONS, CONNECTIONS);
        const run = runs[i];
        run.ratios.push(broker.run.rps / floor.run.rps);
        run.floorRps += floor.run.rps / rounds;
        run.brokerRps += broker.run.rps / rounds;
        log(`UV_THREADPOOL_SIZE=${run.size} node flags [${run.nodeFlags!.join(' ')}]: floor ${floor.run.rps.toFixed(0)}/s, broker ${broker.run.rps.toFixed(0)}/s, ratio ${run.ratios.at(-1)!.toFixed(2)}`);
      }
    }
    return runs;
  } finally {
    for (const b of brokers) await b.close().catch(() => b.kill());
  }
}
