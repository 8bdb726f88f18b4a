import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { teardownRoles } from '../../src/leases/teardown.js';
import { createLogger } from '../../src/logger.js';
import { pickCreator } from '../../src/postgres/creators.js';
import { roleNameFor } from '../../src/postgres/role-name.js';
import { createRoleSql } from '../../src/postgres/roles.js';
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

const silentLog = createLogger('silent');

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
  /** The broker's creator roles on 16+ (src/postgres/creators.ts); [] on 15. */
  creators: string[];
  database: string;
  /** Subject prefix: `pop` for live background leases, `bench:reap` for the reaping backlog. */
  prefix: string;
  /** Leave the leases active but already past expiry (the reaper's backlog). */
  expired?: boolean;
}

/**
 * Creates `count` issued roles with active lease rows, as superuser: the same role attributes,
 * memberships and comment as createRoleSql, and the grant that stands in for how the broker made it:
 * on 16+ ADMIN OPTION for one of the creator roles, round robin (what PostgreSQL gives a role's
 * creator), on 15 none (there the broker creates roles itself and holds nothing on them). As superuser this
 * takes seconds and does not depend on how fast the broker's own path is.
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
            const marker = escapeIdent(o.managedRole);
            return `CREATE ROLE ${name} LOGIN PASSWORD ${escapeLit(verifier)} VALID UNTIL ${validUntil} IN ROLE ${escapeIdent(o.grantRole)}${o.creators.length ? '' : `, ${marker}`};
                    ${o.creators.length
                      ? `GRANT ${marker} TO ${name} WITH INHERIT FALSE, SET FALSE;
                         GRANT ${name} TO ${escapeIdent(o.creators[(from + k) % o.creators.length])} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE`
                      : 'SELECT 1'};
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
  /** Milliseconds per issued role: its CREATE ROLE transaction exactly as the broker sends it. */
  create: number;
  /** Milliseconds per issued role: teardownRoles() for that one role, the reaper's production path. */
  teardown: number;
  /** Milliseconds per DROP ROLE as superuser, which checks no ADMIN rights at all: the reference. */
  dropAsSuperuser: number;
}

/**
 * Cost of one issued role's DDL with `live` issued roles in place, `n` roles of each kind, one
 * session, no other load: creating it as the broker does (createRoleSql in a transaction, as a
 * random creator on 16+), ending it as the reaper does (teardownRoles, one role per call), and a
 * superuser's DROP ROLE of an identical role for reference.
 */
export async function probeRoleDdl(pgs: TestPostgres, live: number, n: number, o: PopulationOptions): Promise<DdlProbe> {
  const su = superClient(pgs);
  await su.connect();
  const pool = new pg.Pool({ connectionString: pgs.brokerUrl, max: 2, application_name: 'bench ddl probe' });
  pool.on('error', () => undefined);
  const time = async (fn: () => Promise<unknown>) => {
    const t = performance.now();
    await fn();
    return (performance.now() - t) / n;
  };
  try {
    const verifier = scramVerifier('bench-ddl-probe', 1);
    const names = (tag: string) => Array.from({ length: n }, (_, i) => roleNameFor(`bench:ddl:${tag}:${i}`));
    const issued = names('issued');
    const reference = names('reference');
    const roleSql = (username: string) => createRoleSql({
      username, verifier, validUntil: new Date(Date.now() + 3600_000), connectionLimit: -1, grantRole: o.grantRole,
      managedRole: o.managedRole, creator: pickCreator(o.creators), assumeRole: false, comment: 'bench ddl probe',
    });
    const create = await time(async () => {
      for (const name of issued) await pool.query(`BEGIN;\n${roleSql(name)};\nCOMMIT`);
    });
    for (const name of reference) await pool.query(`BEGIN;\n${roleSql(name)};\nCOMMIT`);
    const deps = { pool, databaseUrl: pgs.brokerUrl, managedRole: o.managedRole, timeouts: { lockTimeoutSeconds: 0, queryTimeoutSeconds: 0 }, log: silentLog };
    const teardown = await time(async () => {
      for (const name of issued) {
        const outcome = await teardownRoles(deps, [{ username: name, reassign_to: o.grantRole }]);
        if (outcome.get(name) !== null) throw new Error(`ddl probe: teardown of ${name} failed: ${outcome.get(name)}`);
      }
    });
    const dropAsSuperuser = await time(async () => {
      for (const name of reference) await su.query(`DROP ROLE ${escapeIdent(name)}`);
    });
    return { server: pgs.version, live, create, teardown, dropAsSuperuser };
  } finally {
    await pool.end().catch(() => undefined);
    await su.end().catch(() => undefined);
  }
}
