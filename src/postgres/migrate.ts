import { readdir, readFile } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import type { Logger } from 'pino';
import { ensureCreators, usesCreators } from './creators.js';
import { claimMarker, refuseForeignMarker } from './marker.js';
import { connectionConfig, withTransaction } from './pool.js';
import { escapeIdent } from './sql.js';

const MIGRATIONS_DIR = fileURLToPath(new URL('../../migrations/', import.meta.url));
// Arbitrary but fixed: every replica of every version takes the same lock before migrating.
export const MIGRATION_LOCK_KEY = 4_711_020_001;

export interface MigrationResult {
  applied: string[];
}

/**
 * Applies pending migrations under an advisory lock, so replicas starting together take turns,
 * then makes sure the deployment's marker role and (16+) its creator roles exist.
 */
export async function migrate(databaseUrl: string, managedRole: string, logger: Logger): Promise<MigrationResult> {
  const client = new pg.Client(connectionConfig(databaseUrl, { application_name: 'pg-credential-broker migrate' }));
  client.on('error', (err) => logger.warn({ err: { message: err.message } }, 'migration connection failed'));
  await client.connect();
  const applied: string[] = [];
  try {
    await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_KEY]);
    await client.query('CREATE SCHEMA IF NOT EXISTS broker');
    await client.query(
      'CREATE TABLE IF NOT EXISTS broker.schema_migrations (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())',
    );
    const done = new Set((await client.query<{ version: string }>('SELECT version FROM broker.schema_migrations')).rows.map((r) => r.version));
    const files = (await readdir(MIGRATIONS_DIR)).filter((f) => /^\d+_.*\.sql$/.test(f)).sort();
    for (const file of files) {
      if (done.has(file)) continue;
      const sql = await readFile(MIGRATIONS_DIR + file, 'utf8');
      await client.query('BEGIN');
      try {
        await client.query(sql);
        await client.query('INSERT INTO broker.schema_migrations (version) VALUES ($1)', [file]);
        await client.query('COMMIT');
      } catch (err) {
        await client.query('ROLLBACK').catch(() => undefined);
        throw new Error(`migration ${file} failed: ${(err as Error).message}`);
      }
      applied.push(file);
      logger.info({ migration: file }, 'applied migration');
    }
    // Before anything is recorded or created for it: a marker role another database's deployment
    // uses must not be bound to this schema either.
    await refuseForeignMarker(client, managedRole);
    const boundNow = await bindDeployment(client, managedRole);
    // A deployment in another database can claim the marker role between that check and ours:
    // the loser leaves its schema unbound, so it can start again with a marker role of its own.
    await ensureManagedRole(client, managedRole).catch(async (err: unknown) => {
      if (boundNow) await client.query('DELETE FROM broker.deployment');
      throw err;
    });
    await ensureCreators(client, managedRole, await policyGroups(client));
  } finally {
    await client.query('SELECT pg_advisory_unlock_all()').catch(() => undefined);
    await client.end().catch(() => undefined);
  }
  return { applied };
}

const policyGroups = async (db: Pick<pg.Client, 'query'>) =>
  (await db.query<{ grant_role: string }>('SELECT DISTINCT grant_role FROM broker.policies')).rows.map((r) => r.grant_role);

/** ensureCreators for a running broker, taking the migration lock so replicas take turns. */
export async function prepareCreators(pool: pg.Pool, managedRole: string): Promise<string[]> {
  return withTransaction(pool, async (client) => {
    await client.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK_KEY]);
    return ensureCreators(client, managedRole, await policyGroups(client));
  });
}

// How long after a repair the next one is left alone: each waits on the migration lock holding a
// pooled connection. After one that worked, briefly: a 42883 just after it has another cause (or
// met a function dropped while it ran), and one repair a second is bound enough. After one that
// failed, longer: it will fail again until an operator acts.
const AFTER_REPAIR_MS = 1000;
const AFTER_FAILED_REPAIR_MS = 30_000;
const repairs = new WeakMap<pg.Pool, { running: Promise<void> | null; lastAt: number; lastFailed: boolean }>();
type RepairLog = { warn(msg: string): void; error(obj: object, msg: string): void };

/**
 * For a statement that met 42883 (a creator's function dropped since start-up): prepareCreators
 * once, shared by every caller meeting it meanwhile. True when it worked and the statement is
 * worth sending once more; false when it failed, or too soon after the last one (see above): the
 * caller then reports its own error.
 */
export async function repairCreators(pool: pg.Pool, managedRole: string, log: RepairLog): Promise<boolean> {
  let state = repairs.get(pool);
  if (!state) repairs.set(pool, (state = { running: null, lastAt: 0, lastFailed: false }));
  const pause = state.lastFailed ? AFTER_FAILED_REPAIR_MS : AFTER_REPAIR_MS;
  if (!state.running && Date.now() - state.lastAt < pause) return false;
  const current = state;
  current.running ??= prepareCreators(pool, managedRole).then(
    () => {
      Object.assign(current, { lastAt: Date.now(), lastFailed: false });
      log.warn('a statement met a missing creator function (42883): the creator roles and their functions were checked, and any missing made again');
    },
    (err) => {
      Object.assign(current, { lastAt: Date.now(), lastFailed: true });
      // The requests waiting on it report their own error (the missing function); why it cannot
      // be made again is said here, once per attempt.
      log.error({ err: { message: (err as Error).message, code: (err as { code?: string }).code } },
        `a creator role function is missing and cannot be made again; requests that need it fail until this is fixed (next try in ${AFTER_FAILED_REPAIR_MS / 1000} s at the earliest)`);
      throw err;
    },
  ).finally(() => (current.running = null));
  return current.running.then(() => true, () => false);
}

/** The first marker role to migrate this schema owns it; another one is refused, with the way out. True when bound just now. */
async function bindDeployment(client: pg.Client, role: string): Promise<boolean> {
  const { rowCount } = await client.query('INSERT INTO broker.deployment (managed_role) VALUES ($1) ON CONFLICT DO NOTHING', [role]);
  const { rows: [bound] } = await client.query<{ managed_role: string }>('SELECT managed_role FROM broker.deployment');
  if (bound.managed_role !== role) {
    throw new Error(
      `this database's broker schema belongs to the deployment whose BROKER_MANAGED_ROLE is ${bound.managed_role}, not ${role}: ` +
        'give each deployment a database of its own (they would otherwise reap each other\'s leases), ' +
        `or set BROKER_MANAGED_ROLE=${bound.managed_role} if this is the same deployment`,
    );
  }
  return rowCount === 1;
}

async function ensureManagedRole(client: pg.Client, role: string): Promise<void> {
  const existing = await client.query<{ rolcanlogin: boolean }>('SELECT rolcanlogin FROM pg_roles WHERE rolname = $1', [role]);
  if (existing.rowCount === 0) {
    // 16+: a cluster-wide createrole_self_grant would also make the broker an inheriting member.
    const noSelfGrant = (await usesCreators(client)) ? `SET LOCAL createrole_self_grant = '';\n` : '';
    await client.query(`${noSelfGrant}CREATE ROLE ${escapeIdent(role)} NOLOGIN`).catch((err: { code?: string; message: string }) => {
      // 42710, or 23505 from the catalogue's unique index: a deployment in another database
      // created it meanwhile (advisory locks are per database). The claim below sorts out whose it is.
      if (err.code === '42710' || err.code === '23505') return;
      if (err.code !== '42501') throw err;
      throw new Error(`cannot create the marker role ${role} (BROKER_MANAGED_ROLE): ${err.message}; the broker's role needs CREATEROLE, or create ${role} NOLOGIN yourself and grant it to the broker WITH ADMIN OPTION`);
    });
  } else if (existing.rows[0].rolcanlogin) {
    // The marker role only tags issued roles; a login-capable marker is a misconfiguration.
    throw new Error(`BROKER_MANAGED_ROLE ${role} exists and can log in; it must be a NOLOGIN marker role`);
  }
  await claimMarker(client, role);
}
