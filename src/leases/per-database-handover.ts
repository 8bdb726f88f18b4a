import pg from 'pg';
import { connectionConfig, sessionSettings } from '../postgres/pool.js';
import { escapeIdent, escapeLit } from '../postgres/sql.js';
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

/** Runs `statements` one after another on a connection of its own to `database`; the last one's rows. */
async function inDatabase(deps: TeardownDeps, database: string, statements: Array<string | pg.QueryConfig>): Promise<any[]> {
  const client = new pg.Client(clientConfigForDatabase(deps.databaseUrl, database, {
    ...sessionSettings(deps.timeouts, false), application_name: 'pg-credential-broker reaper',
  }));
  client.on('error', () => undefined);
  await client.connect();
  try {
    let rows: any[] = [];
    for (const statement of statements) ({ rows } = await client.query(statement));
    return rows;
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * `err` (a lock wait in `database` that timed out), naming who holds locks on the tables these
 * roles own there: an app's long transaction, or another lease of the same holder left idle in
 * one, fails every handover until it ends, and a bare 55P03 named nobody.
 */
async function withLockHolders(deps: TeardownDeps, database: string, roles: RoleToDrop[], err: unknown): Promise<unknown> {
  // 55P03: lock_timeout; 57014: statement_timeout, the only bound with BROKER_LOCK_TIMEOUT=0.
  if (!['55P03', '57014'].includes((err as { code?: string }).code ?? '')) return err;
  const holders: Array<{ pid: number | null; holder: string | null; gid: string | null }> = await inDatabase(deps, database, [{
    text: `SELECT DISTINCT l.pid, COALESCE(a.usename, p.owner) AS holder, p.gid
             FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
             LEFT JOIN pg_stat_activity a ON a.pid = l.pid
             LEFT JOIN pg_prepared_xacts p ON l.pid IS NULL AND l.virtualtransaction = '-1/' || p.transaction::text
            WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND l.granted
              AND pg_get_userbyid(c.relowner) = ANY($1) AND l.pid IS DISTINCT FROM pg_backend_pid()
            ORDER BY 1`,
    values: [roles.map((r) => r.username)],
  }]).catch(() => []);
  if (holders.length === 0) return err;
  const named = holders.map((h) => (h.gid !== null ? `prepared transaction '${h.gid}' (${h.holder})` : `pid ${h.pid} (${h.holder ?? 'unknown role'})`));
  return Object.assign(err as object, { detail: `locks on their tables in ${database} are held by ${named.join(', ')}; retried once those transactions end` });
}

/** A prepared transaction of a role being dropped, in the database it was prepared in. */
export interface PreparedHere {
  owner: string;
  gid: string;
}

/**
 * Statements that roll back the roles' prepared transactions in this database, each sent on its
 * own: ROLLBACK PREPARED refuses a transaction block, the implicit one of a multi-statement query
 * included. One outlives every session and DROP ROLE itself, holding its locks (a table the group
 * uses, one the role owns, which fails every handover) and the xmin horizon until a superuser or
 * its owner ends it, so the broker ends it as its owner. On 16+ the creator may SET ROLE to the
 * roles only for this, as in ownedObjectsSql; the session's role is reset before what follows.
 */
export function rollBackPreparedStatements(prepared: PreparedHere[], creator: string | null): string[] {
  if (prepared.length === 0) return [];
  const names = [...new Set(prepared.map((p) => p.owner))].map(escapeIdent).join(', ');
  const statements = [creator
    ? `SET ROLE ${escapeIdent(creator)}; GRANT ${names} TO ${escapeIdent(creator)} WITH INHERIT TRUE, SET TRUE; RESET ROLE`
    : `GRANT ${names} TO CURRENT_USER`];
  for (const { owner, gid } of prepared) statements.push(`SET ROLE ${escapeIdent(owner)}`, `ROLLBACK PREPARED ${escapeLit(gid)}`);
  statements.push('RESET ROLE');
  if (creator) statements.push(`SET ROLE ${escapeIdent(creator)}; GRANT ${names} TO ${escapeIdent(creator)} WITH INHERIT TRUE, SET FALSE; RESET ROLE`);
  return statements;
}

/** Rolls back these prepared transactions, database by database (see rollBackPreparedStatements). */
export async function rollBackPrepared(deps: TeardownDeps, creator: string | null, prepared: Array<PreparedHere & { database: string }>): Promise<void> {
  for (const database of new Set(prepared.map((p) => p.database))) {
    await inDatabase(deps, database, rollBackPreparedStatements(prepared.filter((p) => p.database === database), creator));
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
  const depRows: Array<{ datname: string; rolname: string; datallowconn: boolean; owns: boolean; owns_schema: boolean; prepared: string[] }> = [];
  const targets = new Map<string, string | null>();
  live = await stepEach(live, result, 'find owned objects', async (batch) => {
    // owns: something REASSIGN OWNED moves (privileges, default privileges and user mappings it
    // does not; DROP OWNED clears those), so a role holding only those needs no group to hand anything to.
    // A prepared transaction of the role counts as holding something in its database (below).
    const { rows } = await deps.pool.query<(typeof depRows)[number]>(
      `SELECT datname, datallowconn, rolname, bool_or(owns) AS owns, bool_or(owns_schema) AS owns_schema,
              array_remove(array_agg(gid), NULL) AS prepared
         FROM (SELECT COALESCE(d.datname, current_database()) AS datname, COALESCE(d.datallowconn, true) AS datallowconn, r.rolname,
                      s.deptype = 'o' AND s.classid NOT IN ('pg_default_acl'::regclass, 'pg_user_mapping'::regclass) AS owns,
                      s.deptype = 'o' AND s.classid = 'pg_namespace'::regclass AS owns_schema, NULL::text AS gid
                 FROM pg_shdepend s JOIN pg_roles r ON r.oid = s.refobjid LEFT JOIN pg_database d ON d.oid = s.dbid
                WHERE s.refclassid = 'pg_authid'::regclass AND r.rolname = ANY($1) AND (s.dbid = 0 OR d.oid IS NOT NULL)
               UNION ALL
               SELECT p.database, d.datallowconn, p.owner, false, false, p.gid
                 FROM pg_prepared_xacts p JOIN pg_database d ON d.datname = p.database
                WHERE p.owner = ANY($1)) AS held
        GROUP BY 1, 2, 3`,
      [batch.map((r) => r.username)],
    );
    depRows.push(...rows);
    const owners = batch.filter((r) => rows.some((row) => row.rolname === r.username && row.owns));
    if (owners.length === 0) return;
    for (const [username, target] of await reassignTargets(deps.pool, owners, deps.managedRole)) targets.set(username, target);
  }, progress);
  const byDatabase = new Map<string, { roles: Set<string>; prepared: PreparedHere[] } & OwnedHere>();
  for (const row of depRows) {
    // A database that refuses connections cannot be cleaned; DROP ROLE (teardown.ts) then names it.
    if (!row.datallowconn) continue;
    if (!byDatabase.has(row.datname)) byDatabase.set(row.datname, { roles: new Set(), owners: new Set(), schemaOwners: new Set(), prepared: [] });
    const here = byDatabase.get(row.datname)!;
    here.roles.add(row.rolname);
    here.prepared.push(...row.prepared.map((gid) => ({ owner: row.rolname, gid })));
    if (row.owns) here.owners.add(row.rolname);
    if (row.owns_schema) here.schemaOwners.add(row.rolname);
  }
  const failed = new Set<string>();
  for (const [database, here] of byDatabase) {
    const batch = live.filter((r) => here.roles.has(r.username));
    const ok = await stepEach(batch, result, database, (subset) => inDatabase(deps, database, [
      ...rollBackPreparedStatements(here.prepared.filter((p) => subset.some((r) => r.username === p.owner)), creator),
      ownedObjectsSql(subset, creator, targets, here),
    ]).then(() => undefined, async (err) => { throw await withLockHolders(deps, database, subset, err); }));
    for (const r of batch) if (!ok.includes(r)) failed.add(r.username);
  }
  return live.filter((r) => !failed.has(r.username));
}
