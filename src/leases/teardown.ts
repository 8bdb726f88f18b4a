import pg from 'pg';
import type { FastifyBaseLogger } from 'fastify';
import { issuedRoleCondition } from '../postgres/roles.js';
import { escapeIdent } from '../postgres/sql.js';

export interface RoleToDrop {
  username: string;
  /** Where objects the role owns are reassigned, so a migration's tables outlive the lease. */
  reassign_to: string;
}

export interface TeardownDeps {
  pool: pg.Pool;
  databaseUrl: string;
  managedRole: string;
  log: FastifyBaseLogger;
}

/** username -> null when the role is gone (dropped now or already), or the error that stopped it. */
export type TeardownResult = Map<string, string | null>;

// Sessions get this long to exit after pg_terminate_backend before we drop the role anyway.
const TERMINATE_WAIT_MS = 5000;

function urlForDatabase(databaseUrl: string, database: string): string {
  const url = new URL(databaseUrl);
  url.pathname = `/${encodeURIComponent(database)}`;
  return url.toString();
}

function describe(err: unknown): string {
  const { code, message } = err as { code?: string; message?: string };
  return `${code ? code + ': ' : ''}${message ?? String(err)}`.slice(0, 1000);
}

async function inDatabase(deps: TeardownDeps, database: string, sql: string): Promise<void> {
  const client = new pg.Client({ connectionString: urlForDatabase(deps.databaseUrl, database), application_name: 'pg-credential-broker reaper' });
  client.on('error', () => undefined);
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * Ends a batch of issued roles: NOLOGIN, terminate their sessions, reassign and drop what they
 * own in every database where they own or hold anything, then DROP ROLE. Only members of this
 * deployment's marker role are touched; a role that no longer exists counts as done.
 */
export async function teardownRoles(deps: TeardownDeps, roles: RoleToDrop[]): Promise<TeardownResult> {
  const result: TeardownResult = new Map(roles.map((r) => [r.username, null]));
  if (roles.length === 0) return result;
  const { rows: present } = await deps.pool.query<{ rolname: string; oid: number }>(
    `SELECT r.rolname, r.oid::int AS oid FROM pg_roles r
      WHERE r.rolname = ANY($1) AND ${issuedRoleCondition('r', '$2')}`,
    [roles.map((r) => r.username), deps.managedRole],
  );
  const live = roles.filter((r) => present.some((p) => p.rolname === r.username));
  if (live.length === 0) return result;
  const names = live.map((r) => r.username);

  // Login first, sessions second: otherwise a client could reconnect between the two steps.
  await deps.pool.query(names.map((n) => `ALTER ROLE ${escapeIdent(n)} NOLOGIN`).join(';\n'));
  await deps.pool.query(
    `SELECT pg_terminate_backend(pid, $2) FROM pg_stat_activity WHERE usename = ANY($1) AND pid <> pg_backend_pid()`,
    [names, TERMINATE_WAIT_MS],
  );

  // pg_shdepend lists, per database, every object a role owns or holds a privilege on (tables,
  // grants, default privileges). Visiting exactly those databases is the same as visiting every
  // database that accepts connections, without connecting to the ones that hold nothing.
  const { rows: deps_ } = await deps.pool.query<{ datname: string; rolname: string }>(
    `SELECT DISTINCT d.datname, r.rolname
       FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid JOIN pg_roles r ON r.oid = s.refobjid
      WHERE s.refclassid = 'pg_authid'::regclass AND r.rolname = ANY($1) AND d.datallowconn`,
    [names],
  );
  const byDatabase = new Map<string, Set<string>>();
  for (const row of deps_) {
    if (!byDatabase.has(row.datname)) byDatabase.set(row.datname, new Set());
    byDatabase.get(row.datname)!.add(row.rolname);
  }
  const failed = new Set<string>();
  for (const [database, owners] of byDatabase) {
    const batch = live.filter((r) => owners.has(r.username));
    try {
      await inDatabase(deps, database, ownedObjectsSql(batch));
    } catch (batchErr) {
      // Retry one by one so a single stubborn role does not hold back the others.
      for (const role of batch) {
        try {
          await inDatabase(deps, database, ownedObjectsSql([role]));
        } catch (err) {
          failed.add(role.username);
          result.set(role.username, `${database}: ${describe(err)}`);
        }
      }
      deps.log.debug({ database, err: describe(batchErr) }, 'batch cleanup failed, retried per role');
    }
  }

  const droppable = names.filter((n) => !failed.has(n));
  if (droppable.length === 0) return result;
  try {
    await deps.pool.query(`DROP ROLE IF EXISTS ${droppable.map(escapeIdent).join(', ')}`);
  } catch {
    for (const name of droppable) {
      try {
        await deps.pool.query(`DROP ROLE IF EXISTS ${escapeIdent(name)}`);
      } catch (err) {
        result.set(name, describe(err));
      }
    }
  }
  return result;
}

function ownedObjectsSql(roles: RoleToDrop[]): string {
  const byTarget = new Map<string, string[]>();
  for (const role of roles) {
    if (!byTarget.has(role.reassign_to)) byTarget.set(role.reassign_to, []);
    byTarget.get(role.reassign_to)!.push(role.username);
  }
  const statements = ['BEGIN'];
  for (const [target, owners] of byTarget) {
    statements.push(`REASSIGN OWNED BY ${owners.map(escapeIdent).join(', ')} TO ${escapeIdent(target)}`);
  }
  statements.push(`DROP OWNED BY ${roles.map((r) => escapeIdent(r.username)).join(', ')}`);
  statements.push('COMMIT');
  return statements.join(';\n');
}
