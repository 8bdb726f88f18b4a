import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';

/** Live issued roles: issuance under a background role population, and the per-statement DDL probe. */
export function renderPopulation(r: Results): string[] {
  const out: string[] = [];
  const m = r.meta;
  out.push('## Live issued roles: why every role statement slows down on PostgreSQL 16+');
  out.push('');
  if (r.population) {
    out.push('Since PostgreSQL 16 a CREATEROLE role that is not superuser automatically holds ADMIN OPTION on every role it creates, and PostgreSQL checks a grant (`IN ROLE`, `ROLE broker`), an `ALTER ROLE` or a `DROP ROLE` by listing *all* roles the acting role is a member of (`roles_is_member_of`), a list it must rebuild after every change to pg_authid/pg_auth_members. The broker\'s list contains every live issued role, so each of these statements costs time proportional to the number of live leases — for the floor and the broker alike. On PostgreSQL 15 (CREATEROLE bypasses those checks) the same statements stay flat.');
    out.push('');
    const ps = m.settings as { populationBurst?: number };
    out.push(`Here a background population of live issued roles (created as superuser, each granted to the broker WITH ADMIN OPTION like a broker-created role) is in place before one burst of ${ps.populationBurst} credentials per side, ${r.population[0]?.connections} clients, BROKER_SCRAM_ITERATIONS=${r.population[0]?.iterations}:`);
    out.push('');
    out.push(table(['live issued roles', 'floor req/s', 'floor PostgreSQL CPU ms/op', 'broker req/s', 'broker p50 ms', 'broker p99 ms', 'broker PostgreSQL CPU ms/op', 'ratio broker/floor'],
      r.population.map((p) => [p.live.toLocaleString('en-US'), fmt(p.floor.rps, 0), fmt(p.floorCpu.pg, 2), fmt(p.broker.rps, 0), fmt(p.broker.latency.p50, 2), fmt(p.broker.latency.p99, 2), fmt(p.brokerCpu.pg, 2), fmt(p.ratio, 2)])));
  } else out.push('Not measured (see failed scenarios).');
  out.push('');
  if (r.ddl) {
    out.push('Per-statement cost at such populations (milliseconds per statement, one session, no other load), today\'s statements beside two candidate fixes for issuance:');
    out.push('');
    out.push('- **(a)** the same CREATE ROLE … ROLE broker, but the two IN ROLE grants made after `SET LOCAL ROLE` to a NOLOGIN "granter" role that holds ADMIN OPTION on the group and marker roles and never creates roles, so PostgreSQL checks *its* short membership list for them instead of the broker\'s;');
    out.push('- **(b)** (a) without `ROLE broker`, measured after switching the background population to the state such a deployment would be in: on 16+ the broker keeps only the implicit ADMIN grant PostgreSQL gives a role\'s creator (no INHERIT, no SET — enough for ALTER/DROP ROLE), on 15 no membership at all. Teardown would then need pg_signal_backend to terminate sessions and a membership granted at teardown time for DROP/REASSIGN OWNED.');
    out.push('- The reaper\'s ALTER ROLE … NOLOGIN and DROP ROLE run as the broker, whose ADMIN rights they need; as superuser DROP ROLE skips the walk.');
    out.push('');
    out.push(table(['PostgreSQL', 'live issued roles', 'CREATE ROLE today ms', '(a) ms', '(b) ms', 'ALTER ROLE NOLOGIN (broker) ms', 'DROP ROLE (broker) ms', 'DROP ROLE (broker), state (b) ms', 'DROP ROLE (superuser) ms'],
      r.ddl.map((d) => [String(d.server), d.live.toLocaleString('en-US'), fmt(d.createAsToday, 2), fmt(d.createViaGranter, 2), fmt(d.createViaGranterNoBrokerGrant, 2), fmt(d.alterNologin, 2), fmt(d.dropAsBroker, 2), fmt(d.dropAsBrokerNoBrokerGrant, 2), fmt(d.dropAsSuperuser, 3)])));
    out.push('');
  }
  return out;
}
