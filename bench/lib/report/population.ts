import { CREATOR_COUNT } from '../../../src/postgres/creators.js';
import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';

/** Live issued roles: issuance under a background role population, and the per-statement DDL probe. */
export function renderPopulation(r: Results): string[] {
  const out: string[] = [];
  const m = r.meta;
  out.push('## Live issued roles: role statements on PostgreSQL 16+');
  out.push('');
  if (r.population) {
    out.push('Since PostgreSQL 16 a CREATEROLE role that is not superuser automatically holds ADMIN OPTION on every role it creates, and PostgreSQL checks `IN ROLE`, `ALTER ROLE` and `DROP ROLE` by walking the acting role\'s whole membership graph (`roles_is_member_of`), rebuilt after every change to pg_auth_members. When the broker\'s own role created every issued role, that graph held every live lease, and each role statement got slower with each of them (before this design, measured on this machine: 12.3 ms per CREATE ROLE at 1,000 live leases, 55.8 ms at 3,000, 74 roles/s reaping a 10,000 backlog). Issued roles are now created by one of ' + CREATOR_COUNT + ' NOLOGIN creator roles the broker acts as through a SECURITY DEFINER function each owns (src/postgres/creators.ts, creator-functions.ts; SET ROLE would walk every creator\'s memberships after each role change), chosen at random, and are no members of the broker, so each walk sees about 1/' + CREATOR_COUNT + ' of the live roles. What still grows with them is PostgreSQL\'s own per-grant bookkeeping on the group and marker roles, which every issued role joins. On PostgreSQL 15 CREATEROLE skips these checks and the broker creates roles itself.');
    out.push('');
    const ps = m.settings as { populationBurst?: number };
    out.push(`Here a background population of live issued roles (created as superuser, each granted WITH ADMIN OPTION to a creator role, round robin, like a broker-issued role) is in place before one burst of ${ps.populationBurst} credentials per side, ${r.population[0]?.connections} clients, BROKER_SCRAM_ITERATIONS=${r.population[0]?.iterations}:`);
    out.push('');
    out.push(table(['live issued roles', 'floor req/s', 'floor PostgreSQL CPU ms/op', 'broker req/s', 'broker p50 ms', 'broker p99 ms', 'broker PostgreSQL CPU ms/op', 'ratio broker/floor'],
      r.population.map((p) => [p.live.toLocaleString('en-US'), fmt(p.floor.rps, 0), fmt(p.floorCpu.pg, 2), fmt(p.broker.rps, 0), fmt(p.broker.latency.p50, 2), fmt(p.broker.latency.p99, 2), fmt(p.brokerCpu.pg, 2), fmt(p.ratio, 2)])));
  } else out.push('Not measured (see failed scenarios).');
  out.push('');
  if (r.ddl) {
    out.push('Per issued role at such populations (milliseconds, one session, no other load): its CREATE ROLE transaction as the broker sends it, its teardown through `teardownRoles()` one role at a time (the reaper\'s code: membership for the creator and NOLOGIN, session check, DROP ROLE, each as the creator), and a superuser\'s DROP ROLE of an identical role, which checks no ADMIN rights at all:');
    out.push('');
    out.push(table(['PostgreSQL', 'live issued roles', 'CREATE ROLE transaction ms', 'teardown ms', 'DROP ROLE (superuser) ms'],
      r.ddl.map((d) => [String(d.server), d.live.toLocaleString('en-US'), fmt(d.create, 2), fmt(d.teardown, 2), fmt(d.dropAsSuperuser, 3)])));
    out.push('');
  }
  return out;
}
