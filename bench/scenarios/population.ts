import { createLogger } from '../../src/logger.js';
import { migrate } from '../../src/postgres/migrate.js';
import { startPostgres } from '../../test/helpers/postgres.js';
import type { BrokerChild } from '../lib/broker.js';
import { log } from '../lib/log.js';
import { createPopulation, dropIssuedRoles, probeRoleDdl } from '../lib/population.js';
import { strip } from '../lib/runs.js';
import { MANAGED_ROLE, SETTINGS, TUNED_ITERATIONS } from '../lib/settings.js';
import type { BenchContext } from './context.js';
import { compare } from './floor-vs-broker.js';

/**
 * Role-population scaling: one floor/broker burst at each size of a background population of
 * live issued roles, with the per-statement DDL probe at that size; then the same probe on
 * PostgreSQL 15 at the largest size, when a PostgreSQL 15 server can be started.
 */
export async function runPopulation(ctx: BenchContext, broker: BrokerChild): Promise<void> {
  const { pgs, results, popOptions } = ctx;
  results.population = [];
  for (const live of SETTINGS.population) {
    await dropIssuedRoles(pgs, 'all');
    const createSeconds = live ? await createPopulation(pgs, live, popOptions('pop')) : 0;
    const { floor, broker: b } = await compare(ctx, broker, TUNED_ITERATIONS, 16, SETTINGS.populationBurst, 1);
    results.ddl = [...(results.ddl ?? []), await probeRoleDdl(pgs, live, SETTINGS.ddlProbe, popOptions('bench:ddl'))];
    results.population.push({ live, createSeconds, iterations: TUNED_ITERATIONS, connections: 16, floor: strip(floor.run), broker: strip(b.run), floorCpu: floor.cpu, brokerCpu: b.cpu, ratio: b.run.rps / floor.run.rps });
    log(`population ${live}: floor ${floor.run.rps.toFixed(0)}/s (${floor.cpu.pg.toFixed(2)} ms PG CPU/op) | broker ${b.run.rps.toFixed(0)}/s ratio ${(b.run.rps / floor.run.rps).toFixed(2)}`);
  }
  await dropIssuedRoles(pgs, 'all');
  // The same statements on PostgreSQL 15, where CREATEROLE skips the ADMIN membership walk.
  const pg15 = await startPostgres({ flavor: 'pg15' }).catch((err: Error) => {
    log(`no PostgreSQL 15 comparison: ${err.message.split('\n')[0]}`);
    return null;
  });
  if (pg15) {
    try {
      await pg15.query(`ALTER ROLE ALL SET log_statement = 'none'`, [], 'postgres');
      await migrate(pg15.brokerUrl, MANAGED_ROLE, createLogger('silent'));
      const live = SETTINGS.population[SETTINGS.population.length - 1];
      // No creator roles on 15: the broker creates issued roles itself there.
      await createPopulation(pg15, live, { ...popOptions('pop'), creators: [] });
      const probe = await probeRoleDdl(pg15, live, SETTINGS.ddlProbe, { ...popOptions('bench:ddl'), creators: [] });
      results.ddl = [...(results.ddl ?? []), probe];
      log(`PostgreSQL ${pg15.version}, ${live} live roles: CREATE ROLE ${probe.create.toFixed(2)} ms, teardown ${probe.teardown.toFixed(2)} ms`);
    } finally {
      await pg15.stop();
    }
  }
}
