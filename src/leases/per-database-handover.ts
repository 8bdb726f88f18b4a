import pg from 'pg';
import { connectionConfig, sessionSettings } from '../postgres/pool.js';
import { ownedObjectsSql, reassignTargets, type OwnedHere } from './owned-objects.js';
import { stepEach, type RoleToDrop, type TeardownDeps, type TeardownResult, type TeardownRun } from './teardown-steps.js';

/**
 * The broker's connection settings, in another database. Parsed as pg parses DATABASE_URL, so
 * libpq's socket form (`postgres://broker@/broker?host=/run/postgresql`), which WHATWG URL
 * refuses, works here as it does for the pool; with the pool's search_path, since what runs here
 * is the most exposed: in a database where the roles being torn down may have created anything.
 */
export function clientConfigForDatabase(databaseUrl: string, database: string, ours: pg.ClientConfig = {}): pg.ClientConfig {
  return connectionConfig(databaseUrl, ours, database);
}

async function inDatabase(deps: TeardownDeps, database: string, sql: string): Promise<void> {
  const client = new pg.Client(clientConfigForDatabase(deps.databaseUrl, database, {
    ...sessionSettings(deps.timeouts, false), application_name: 'pg-credential-broker reaper',
  }));
  client.on('error', () => undefined);
  await client.connect();
  try {
    await client.query(sql);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * Hands over and drops what the logged-out roles own or hold, database by database; returns the
 * roles that hold nothing anywhere any more, which DROP ROLE may now take.
 */
export async function handOverOwnedObjects(
  deps: TeardownDeps, creator: string | null, loggedOut: RoleToDrop[], result: TeardownResult, progress: TeardownRun,
): Promise<RoleToDrop[]> {
  let live = loggedOut;
  // pg_shdepend lists, per database, every object a role owns or holds a privilege on (tables,
  // grants, default privileges); dbid 0 marks shared objects (databases, tablespaces), which
  // REASSIGN/DROP OWNED handle from any database, so those run in the broker's own. Visiting
  // exactly these databases is the same as visiting every database that accepts connections,
  // without connecting to the ones that hold nothing.
  // A step like the others: after another creator group found the server gone it is not tried,
  // and its own failure is each role's outcome rather than an exception that loses them all.
  const depRows: Array<{ datname: string; rolname: string; datallowconn: boolean; owns: boolean; owns_schema: boolean }> = [];
  const targets = new Map<string, string | null>();
  live = await stepEach(live, result, 'find owned objects', async (batch) => {
    // owns: something REASSIGN OWNED moves (privileges, default privileges and user mappings it
    // does not; DROP OWNED clears those), so a role holding only those needs no group to hand anything to.
    const { rows } = await deps.pool.query<(typeof depRows)[number]>(
      `SELECT COALESCE(d.datname, current_database()) AS datname, COALESCE(d.datallowconn, true) AS datallowconn, r.rolname,
              bool_or(s.deptype = 'o' AND s.classid NOT IN ('pg_default_acl'::regclass, 'pg_user_mapping'::regclass)) AS owns,
              bool_or(s.deptype = 'o' AND s.classid = 'pg_namespace'::regclass) AS owns_schema
         FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid LEFT JOIN pg_database d ON d.oid = s.dbid
        WHERE s.refclassid = 'pg_authid'::regclass AND r.rolname = ANY($1) AND (s.dbid = 0 OR d.oid IS NOT NULL)
        GROUP BY 1, 2, 3`,
      [batch.map((r) => r.username)],
    );
    depRows.push(...rows);
    const owners = batch.filter((r) => rows.some((row) => row.rolname === r.username && row.owns));
    if (owners.length === 0) return;
    for (const [username, target] of await reassignTargets(deps.pool, owners, deps.managedRole)) targets.set(username, target);
  }, progress);
  const byDatabase = new Map<string, { roles: Set<string> } & OwnedHere>();
  for (const row of depRows) {
    // A database that refuses connections cannot be cleaned; DROP ROLE (teardown.ts) then names it.
    if (!row.datallowconn) continue;
    if (!byDatabase.has(row.datname)) byDatabase.set(row.datname, { roles: new Set(), owners: new Set(), schemaOwners: new Set() });
    const here = byDatabase.get(row.datname)!;
    here.roles.add(row.rolname);
    if (row.owns) here.owners.add(row.rolname);
    if (row.owns_schema) here.schemaOwners.add(row.rolname);
  }
  const failed = new Set<string>();
  for (const [database, here] of byDatabase) {
    const batch = live.filter((r) => here.roles.has(r.username));
    const ok = await stepEach(batch, result, database, (subset) => inDatabase(deps, database, ownedObjectsSql(subset, creator, targets, here)));
    for (const r of batch) if (!ok.includes(r)) failed.add(r.username);
  }
  return live.filter((r) => !failed.has(r.username));
}
