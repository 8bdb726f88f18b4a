import { BrokerChild } from '../lib/broker.js';
import { log } from '../lib/log.js';
import type { ThreadpoolRun } from '../lib/results.js';
import { DEFAULT_ITERATIONS, PRODUCTION_ENV, SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';
import { compare } from './floor-vs-broker.js';
import { jitWarmup } from './warmup.js';

const LIBUV_DEFAULT = '4';
const CONNECTIONS = 16;
// The broker's own default (BROKER_DB_POOL_SIZE, src/config.ts), and a smaller and a larger pool.
const DB_POOL_DEFAULT = 10;
const DB_POOL_OTHERS = [5, 16];
// V8's own young-generation size, against the image's smaller one (memory against CPU).
const V8_SEMI_SPACE_MB = 16;

/** The image's NODE_OPTIONS with V8's default semi-space instead of its own, or null if it sets none. */
export function withSemiSpace(nodeOptions: string, mb: number): string | null {
  const flags = nodeOptions.split(/\s+/).filter(Boolean);
  const at = flags.findIndex((f) => /^--max-semi-space-size=/.test(f));
  if (at < 0) return null;
  flags[at] = `--max-semi-space-size=${mb}`;
  return flags.join(' ');
}

/**
 * The broker's runtime settings, one change at a time, for the broker only: libuv's default pool
 * of 4 threads against the Docker image's UV_THREADPOOL_SIZE, then, with the image's size, other
 * BROKER_DB_POOL_SIZE values against the default, then V8's default young generation against
 * the image's --max-semi-space-size. One broker at a time (side by side, some arms
 * read lower; a broker idle for 30 s closes its pooled connections, and its next burst pays
 * for new logins and cold backends): started at the
 * default iteration count, warmed up, compared with the floor at 16 clients twice, closed. The
 * floor (this process) keeps the image's libuv pool size throughout.
 */
export async function runThreadpool(ctx: BenchContext): Promise<ThreadpoolRun[]> {
  const image = PRODUCTION_ENV.UV_THREADPOOL_SIZE || LIBUV_DEFAULT;
  const arms = [
    { size: LIBUV_DEFAULT, dbPoolSize: DB_POOL_DEFAULT },
    ...(image === LIBUV_DEFAULT ? [] : [{ size: image, dbPoolSize: DB_POOL_DEFAULT }]),
    ...DB_POOL_OTHERS.map((dbPoolSize) => ({ size: image, dbPoolSize })),
  ] as Array<{ size: string; dbPoolSize: number; nodeOptions?: string }>;
  const semi = withSemiSpace(PRODUCTION_ENV.NODE_OPTIONS, V8_SEMI_SPACE_MB);
  if (semi) arms.push({ size: image, dbPoolSize: DB_POOL_DEFAULT, nodeOptions: semi });
  const rounds = SETTINGS.repeats > 1 ? 2 : 1;
  const runs: ThreadpoolRun[] = [];
  for (const arm of arms) {
    const env = { ...ctx.brokerEnv(DEFAULT_ITERATIONS), UV_THREADPOOL_SIZE: arm.size, BROKER_DB_POOL_SIZE: String(arm.dbPoolSize) };
    const b = await BrokerChild.start(arm.nodeOptions ? { ...env, NODE_OPTIONS: arm.nodeOptions } : env);
    try {
      // The policy the issuance scenario stored is in the database already; the floor is warm from it.
      await jitWarmup(ctx, b, DEFAULT_ITERATIONS, false);
      const run: ThreadpoolRun = { ...arm, floorRps: 0, brokerRps: 0, ratios: [], brokerCpuMs: 0, maxRssMb: 0 };
      for (let round = 0; round < rounds; round++) {
        const { floor, broker, maxRss } = await compare(ctx, b, DEFAULT_ITERATIONS, CONNECTIONS);
        run.ratios.push(broker.run.rps / floor.run.rps);
        run.floorRps += floor.run.rps / rounds;
        run.brokerRps += broker.run.rps / rounds;
        run.brokerCpuMs! += broker.cpu.broker / rounds;
        run.maxRssMb = Math.max(run.maxRssMb!, maxRss);
        log(`UV_THREADPOOL_SIZE=${run.size} BROKER_DB_POOL_SIZE=${run.dbPoolSize}${arm.nodeOptions ? ` NODE_OPTIONS=${arm.nodeOptions}` : ''}: floor ${floor.run.rps.toFixed(0)}/s, broker ${broker.run.rps.toFixed(0)}/s, ratio ${run.ratios.at(-1)!.toFixed(2)}`);
      }
      runs.push(run);
    } finally {
      await b.close().catch(() => b.kill());
    }
  }
  return runs;
}
