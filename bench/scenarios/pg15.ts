import fs from 'node:fs';
import type { TestIssuer } from '../../test/helpers/issuer.js';
import { startPostgres } from '../../test/helpers/postgres.js';
import { api } from '../lib/api.js';
import type { BrokerChild } from '../lib/broker.js';
import { floorLoad, httpLoad } from '../lib/load.js';
import { log } from '../lib/log.js';
import { postmasterPid, quietPostgres } from '../lib/postgres.js';
import type { Pg15Issuance, Results } from '../lib/results.js';
import { strip } from '../lib/runs.js';
import { DEFAULT_ITERATIONS, POLICY, SETTINGS, TUNED_ITERATIONS } from '../lib/settings.js';
import { createContext } from './context.js';
import { compare } from './floor-vs-broker.js';
import { jitWarmup } from './warmup.js';

export const PG15_INITDB = '/usr/lib/postgresql/15/bin/initdb';
const CONNECTIONS = 16;

/**
 * P1, P3 and P1b again on Debian's PostgreSQL 15, the server PITFALLS measured the 230/s →
 * 3,250/s floor on. Its CREATE ROLE runs a slower PBKDF2 and none of 16+'s membership checks, so
 * the verifier setting weighs far more there than on the embedded 18. The same measurement as
 * the issuance scenario at 16 clients: a fresh broker per iteration count, warmed up, then floor
 * and broker bursts in turn. Skipped, with the reason recorded, where postgresql-15 is missing.
 */
export async function runOnPg15(issuer: TestIssuer, results: Results, start: (env: Record<string, string>) => Promise<BrokerChild>, stop: (b: BrokerChild) => Promise<void>): Promise<Pg15Issuance> {
  if (!fs.existsSync(PG15_INITDB)) return { unavailable: `postgresql-15 is not installed (no ${PG15_INITDB})` };
  log('starting PostgreSQL 15 (Debian package)');
  const pgs = await startPostgres({ flavor: 'pg15' });
  let ctx: Awaited<ReturnType<typeof createContext>> | undefined;
  try {
    await quietPostgres(pgs);
    const pmPid = await postmasterPid(pgs);
    ctx = await createContext(pgs, pmPid, issuer, results);
    const [{ version }] = await pgs.query<{ version: string }>('SELECT version()');
    const out: Pg15Issuance = { postgres: version, runs: [] };
    for (const iterations of [DEFAULT_ITERATIONS, TUNED_ITERATIONS]) {
      const broker = await start(ctx.brokerEnv(iterations));
      try {
        if (iterations === DEFAULT_ITERATIONS) {
          const put = await api(broker.url, 'PUT', `/policies/${POLICY}`, ctx.adminToken, {
            issuer: issuer.issuer, claims: { sub: 'bench:*' }, grant_role: 'app_readers', database: pgs.database,
            default_ttl: 3600, max_ttl: 7200, max_active_leases: 100_000,
          });
          if (put.status !== 201 && put.status !== 200) throw new Error(`PUT /policies/${POLICY} on PostgreSQL 15: ${put.status} ${JSON.stringify(put.body)}`);
        }
        const warmup = await jitWarmup(ctx, broker, iterations);
        if (SETTINGS.warmup) {
          await floorLoad(ctx.floorSpec(iterations), CONNECTIONS, { amount: SETTINGS.warmup });
          await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections: CONNECTIONS, amount: SETTINGS.warmup, tokens: ctx.tokens, expect: 201 });
        }
        const { floor, broker: b, maxRss } = await compare(ctx, broker, iterations, CONNECTIONS, SETTINGS.burst, SETTINGS.targetRepeats);
        const ratio = b.run.rps / floor.run.rps;
        out.runs.push({
          iterations, warmup,
          level: { connections: CONNECTIONS, floor: strip(floor.run), broker: strip(b.run), floorCpu: floor.cpu, brokerCpu: b.cpu, ratio, maxRssMb: maxRss },
        });
        log(`PostgreSQL 15, iterations ${iterations}, c=${CONNECTIONS}: floor ${floor.run.rps.toFixed(0)}/s | broker ${b.run.rps.toFixed(0)}/s (errors ${b.run.errors}) ratio ${ratio.toFixed(2)}`);
      } finally {
        await stop(broker);
      }
    }
    return out;
  } finally {
    await ctx?.close();
    await pgs.stop();
  }
}
