import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { roleNameFor } from '../../src/postgres/role-name.js';
import { scramVerifier } from '../../src/postgres/scram.js';
import { escapeIdent, escapeLit } from '../../src/postgres/sql.js';
import type { TestPostgres } from '../../test/helpers/postgres.js';

/**
 * The population of issued roles, controlled by the bench as superuser.
 *
 * On PostgreSQL 16+, a CREATEROLE role that is not superuser holds ADMIN OPTION on every role it
 * created, and each CREATE ROLE … IN ROLE / ROLE, ALTER ROLE and DROP ROLE it runs checks its
 * ADMIN rights by walking all of its memberships (after every catalogue change invalidates the
 * cached list). Every such statement therefore costs time proportional to the number of live
 * issued roles. Measurements are only comparable when that number is controlled, so every
 * issuance run starts from an empty population, and a separate scenario sets it explicitly.
 */

function superClient(pgs: TestPostgres): pg.Client {
  const client = new pg.Client({ connectionString: pgs.superuserUrl.replace(/\/postgres$/, `/${pgs.database}`), application_name: 'bench population' });
  client.on('error', () => undefined);
  return client;
}

/**
 * Drops issued roles as superuser (no ADMIN walk) with their lease rows: `runs` only those the
 * load runs created (subjects `bench:…`), `all` also the background population (`pop:…`).
 */
export async function dropIssuedRoles(pgs: TestPostgres, which: 'runs' | 'all' = 'all'): Promise<number> {
  const client = superClient(pgs);
  await client.connect();
  try {
    const pattern = which === 'all' ? 'lease\\_%' : 'lease\\_bench\\_%';
    const { rows } = await client.query<{ rolname: string }>(`SELECT rolname FROM pg_roles WHERE rolname LIKE '${pattern}'`);
    for (let i = 0; i < rows.length; i += 1000) {
      const chunk = rows.slice(i, i + 1000).map((r) => escapeIdent(r.rolname));
      await client.query(`BEGIN; DROP ROLE ${chunk.join(', ')}; COMMIT`);
    }
    await client.query(`DELETE FROM broker.leases WHERE subject LIKE 'bench:%'${which === 'all' ? ` OR subject LIKE 'pop:%'` : ''}`);
    // Dead catalogue tuples from earlier runs would otherwise slow the index scans of later ones.
    await client.query('VACUUM pg_authid, pg_auth_members, pg_shdescription, broker.leases');
    return rows.length;
  } finally {
    await client.end().catch(() => undefined);
  }
}

export interface PopulationOptions {
  issuer: string;
  policy: string;
  grantRole: string;
  managedRole: string;
  brokerRole: string;
  database: string;
  /** Subject prefix: `pop` for live background leases, `bench:reap` for the reaping backlog. */
  prefix: string;
  /** Leave the leases active but already past expiry (the reaper's backlog). */
  expired?: boolean;
}

/**
 * Creates `count` issued roles with active lease rows, as superuser: the same role attributes,
 * IN ROLE and comment as createRoleSql, and a `GRANT … TO broker WITH ADMIN OPTION` standing in
 * for the implicit ADMIN grant plus `ROLE broker` a broker-created role has. Done by the broker
 * itself this would take quadratic time (see above); as superuser it takes seconds.
 */
export async function createPopulation(pgs: TestPostgres, count: number, o: PopulationOptions): Promise<number> {
  const start = performance.now();
  const verifier = scramVerifier('bench-population-password', 1);
  const client = superClient(pgs);
  await client.connect();
  try {
    for (let from = 0; from < count; from += 500) {
      const to = Math.min(count, from + 500);
      const ids: string[] = [];
      const names: string[] = [];
      const subjects: string[] = [];
      for (let i = from; i < to; i++) {
        const subject = `${o.prefix}:${i}`;
        subjects.push(subject);
        names.push(roleNameFor(subject));
        ids.push(randomUUID());
      }
      await client.query('BEGIN');
      await client.query(
        `INSERT INTO broker.leases (id, username, policy, grant_role, database, issuer, subject, claims, state, expires_at, max_expires_at)
         SELECT id, username, $4, $5, $6, $7, subject, '{}', 'active', now() + interval '1 hour', now() + interval '2 hours'
           FROM unnest($1::uuid[], $2::text[], $3::text[]) AS t(id, username, subject)`,
        [ids, names, subjects, o.policy, o.grantRole, o.database, o.issuer],
      );
      const validUntil = escapeLit(new Date(Date.now() + 3600_000).toISOString());
      await client.query(
        names
          .map((n, k) => {
            const name = escapeIdent(n);
            return `CREATE ROLE ${name} LOGIN PASSWORD ${escapeLit(verifier)} VALID UNTIL ${validUntil} IN ROLE ${escapeIdent(o.grantRole)}, ${escapeIdent(o.managedRole)};
                    GRANT ${name} TO ${escapeIdent(o.brokerRole)} WITH ADMIN OPTION;
                    COMMENT ON ROLE ${name} IS ${escapeLit(`lease ${ids[k]} sub ${subjects[k]}`)}`;
          })
          .join(';\n'),
      );
      await client.query('COMMIT');
    }
    if (o.expired) {
      await client.query(`UPDATE broker.leases SET expires_at = now() - interval '1 minute' WHERE subject LIKE $1 AND state = 'active'`, [`${o.prefix}:%`]);
    }
    await client.query('VACUUM ANALYZE broker.leases');
  } finally {
    await client.end().catch(() => undefined);
  }
  return (performance.now() - start) / 1000;
}

export interface DdlProbe {
  /** PostgreSQL major version. */
  server: number;
  live: number;
  /** Milliseconds per statement batch, as the broker unless noted. */
  createAsToday: number;
  createViaGranter: number;
  createViaGranterNoBrokerGrant: number;
  alterNologin: number;
  dropAsBroker: number;
  /** DROP ROLE as the broker once the population is in state (b). */
  dropAsBrokerNoBrokerGrant: number;
  dropAsSuperuser: number;
}

const GRANTER = 'bench_granter';

/**
 * Cost of one issued role's DDL with `live` issued roles in place, `n` statements of each kind:
 * CREATE ROLE exactly as createRoleSql writes it; the same role with its IN ROLE grants made
 * while SET ROLE to a helper role that holds ADMIN on the groups but created no roles (so its
 * membership list stays short); ALTER ROLE … NOLOGIN and DROP ROLE as the broker (the reaper's
 * statements) and DROP ROLE as superuser (no ADMIN check).
 */
export async function probeRoleDdl(pgs: TestPostgres, live: number, n: number, o: PopulationOptions, sqlAsToday: (username: string) => string): Promise<DdlProbe> {
  const su = superClient(pgs);
  await su.connect();
  const broker = new pg.Client({ connectionString: pgs.brokerUrl, application_name: 'bench ddl probe' });
  broker.on('error', () => undefined);
  await broker.connect();
  const time = async (fn: () => Promise<unknown>) => {
    const t = performance.now();
    await fn();
    return (performance.now() - t) / n;
  };
  try {
    const [{ exists }] = (await su.query<{ exists: boolean }>('SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS exists', [GRANTER])).rows;
    if (!exists) {
      await su.query(`CREATE ROLE ${GRANTER} NOLOGIN`);
      await su.query(`GRANT ${escapeIdent(o.grantRole)}, ${escapeIdent(o.managedRole)} TO ${GRANTER} WITH ADMIN OPTION`);
      await su.query(`GRANT ${GRANTER} TO ${escapeIdent(o.brokerRole)}`);
    }
    const verifier = escapeLit(scramVerifier('bench-ddl-probe', 1));
    const until = escapeLit(new Date(Date.now() + 3600_000).toISOString());
    const names = (tag: string) => Array.from({ length: n }, (_, i) => roleNameFor(`bench:ddl:${tag}:${i}`));
    const today = names('today');
    const granted = names('granter');
    const bare = names('bare');
    const createAsToday = await time(async () => {
      for (const name of today) await broker.query(sqlAsToday(name));
    });
    const createViaGranter = await time(async () => {
      for (const name of granted) {
        const id = escapeIdent(name);
        await broker.query(`BEGIN;
          CREATE ROLE ${id} LOGIN PASSWORD ${verifier} VALID UNTIL ${until} ROLE ${escapeIdent(o.brokerRole)};
          SET LOCAL ROLE ${GRANTER};
          GRANT ${escapeIdent(o.grantRole)}, ${escapeIdent(o.managedRole)} TO ${id};
          RESET ROLE;
          COMMENT ON ROLE ${id} IS 'bench ddl probe';
          COMMIT`);
      }
    });
    const alterNologin = await time(() => broker.query(today.map((name) => `ALTER ROLE ${escapeIdent(name)} NOLOGIN`).join(';\n')));
    const dropAsBroker = await time(async () => {
      for (const name of today) await broker.query(`DROP ROLE ${escapeIdent(name)}`);
    });
    const dropAsSuperuser = await time(async () => {
      for (const name of granted) await su.query(`DROP ROLE ${escapeIdent(name)}`);
    });
    // (b) models a deployment whose every live role was issued without ROLE broker: the broker
    // then holds only the implicit ADMIN grant (no INHERIT, no SET) on them on 16+, and no
    // membership at all on 15. The background population is switched to that state first.
    const { rows: pop } = await su.query<{ rolname: string }>(
      `SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles b ON b.oid = m.member
        WHERE b.rolname = $1 AND r.rolname LIKE 'lease\\_%'`,
      [o.brokerRole],
    );
    for (let i = 0; i < pop.length; i += 500) {
      const chunk = pop.slice(i, i + 500).map((r) => escapeIdent(r.rolname));
      await su.query(
        pgs.version >= 16
          ? chunk.map((r) => `GRANT ${r} TO ${escapeIdent(o.brokerRole)} WITH INHERIT FALSE, SET FALSE`).join(';\n')
          : `REVOKE ${chunk.join(', ')} FROM ${escapeIdent(o.brokerRole)}`,
      );
    }
    const createViaGranterNoBrokerGrant = await time(async () => {
      for (const name of bare) {
        const id = escapeIdent(name);
        await broker.query(`BEGIN;
          CREATE ROLE ${id} LOGIN PASSWORD ${verifier} VALID UNTIL ${until};
          SET LOCAL ROLE ${GRANTER};
          GRANT ${escapeIdent(o.grantRole)}, ${escapeIdent(o.managedRole)} TO ${id};
          RESET ROLE;
          COMMENT ON ROLE ${id} IS 'bench ddl probe';
          COMMIT`);
      }
    });
    const dropAsBrokerNoBrokerGrant = await time(async () => {
      for (const name of bare) await broker.query(`DROP ROLE ${escapeIdent(name)}`);
    });
    return { server: pgs.version, live, createAsToday, createViaGranter, createViaGranterNoBrokerGrant, alterNologin, dropAsBroker, dropAsBrokerNoBrokerGrant, dropAsSuperuser };
  } finally {
    await broker.end().catch(() => undefined);
    await su.end().catch(() => undefined);
  }
}
