import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { asCreator } from '../postgres/creator-functions.js';
import { actAs, creatorNames, creatorOf } from '../postgres/creators.js';
import { repairCreators } from '../postgres/migrate.js';
import { isConnectionError, withBatchedTransaction, withTransaction } from '../postgres/pool.js';
import { issuedRoleCondition } from '../postgres/roles.js';
import { escapeIdent } from '../postgres/sql.js';
import { handOverOwnedObjects, rollBackPrepared } from './per-database-handover.js';
import { startingLogins, terminateSessions } from './sessions.js';
import {
  describeError, serverGone, stepEach, TeardownResult, type RoleToDrop, type Run, type Statement, type TeardownDeps, type TeardownRun,
} from './teardown-steps.js';

// How long NOLOGIN may take before the broker looks for a session of its roles in its way (well
// under the shortest lock timeout, 1 s), and how often it looks after that.
const BLOCKER_WATCH_AFTER_MS = 200;
const BLOCKER_POLL_MS = 50;

/** The first step, which ends new logins; a failure there is prefixed with this name. */
export const NOLOGIN_STEP = 'NOLOGIN';

/** True when a teardown error left the role able to log in: it stopped at, or before, NOLOGIN. */
export function loginStillEnabled(error: string | null | undefined): boolean {
  return error?.startsWith(`${NOLOGIN_STEP}: `) ?? false;
}

/**
 * Runs statements as `creator` in one transaction, or as the broker for null: through the
 * creator's function (creator-functions.ts), or, for a statement with bind parameters, which
 * the function cannot pass on, after SET LOCAL ROLE.
 */
function runAs(deps: TeardownDeps, creator: string | null): Run {
  const { pool, pace } = deps;
  // The record and the statement commit together, or neither does.
  const afterRecord = (before: Statement[], text: string) => withTransaction(pool, async (client) => {
    for (const s of before) await client.query(s.text, s.values);
    return client.query(text);
  });
  const viaFunction = async (sql: string, before?: Statement[]) => {
    const once = () => (before ? afterRecord(before, asCreator(creator!, sql)) : pool.query(asCreator(creator!, sql)));
    try {
      return await once();
    } catch (err) {
      // 42883: the creator's function was dropped since start-up. Made again as at start-up, and
      // the statement sent once more, so teardown does not wait for a restart.
      if ((err as { code?: string }).code !== '42883' || !(await repairCreators(pool, deps.managedRole, deps.log))) throw err;
      return once();
    }
  };
  const send: Run = (sql, params, before) => {
    if (before && params) throw new Error('runAs: `before` goes only with a statement without parameters');
    if (!creator) return before ? afterRecord(before, sql) : pool.query(sql, params);
    return params ? withBatchedTransaction(pool, actAs(creator), (client) => client.query(sql, params)) : viaFunction(sql, before);
  };
  if (!pace) return send;
  return async (sql, params, before) => {
    const started = performance.now();
    // After a success only: a failure's time is mostly waiting (a lock, a timeout), not work.
    const result = await send(sql, params, before);
    await pace(performance.now() - started);
    return result;
  };
}

/**
 * Ends a batch of issued roles: NOLOGIN, terminate their sessions, reassign and drop what they
 * own in every database where they own or hold anything, then DROP ROLE. Only members of this
 * deployment's marker role are touched; a role that no longer exists counts as done. Never
 * throws for a single role's trouble: each role gets its own outcome.
 *
 * Each role is ended by whoever holds ADMIN OPTION on it: its creator role on PostgreSQL 16+
 * (see creators.ts), else the broker itself.
 */
export async function teardownRoles(deps: TeardownDeps, roles: RoleToDrop[]): Promise<TeardownResult> {
  const result = new TeardownResult(roles.map((r) => [r.username, null]));
  const run: TeardownRun = { unreachable: null };
  // Every creator group's logins and sessions end before any group's slow part (lock waits in
  // REASSIGN OWNED, a large DROP OWNED) starts, so no ended lease's login outlives another's wait.
  const loggedOut = await endLogins(deps, await issuedByCreator(deps, roles, result), result, run);
  for (const [creator, live] of loggedOut) await dropRoles(deps, creator, live, result, run);
  return result;
}

/**
 * Only the first two steps of a teardown, NOLOGIN and ending the sessions, for roles whose full
 * teardown comes later (a revocation's later batches), so their logins end now. Same outcomes as
 * teardownRoles for those steps; a role that passed both has null. Calls that share `run` stop
 * trying, one after the other, once one of them finds the server gone.
 */
export async function disableLogins(deps: TeardownDeps, roles: RoleToDrop[], run: TeardownRun = { unreachable: null }): Promise<TeardownResult> {
  const result = new TeardownResult(roles.map((r) => [r.username, null]));
  await endLogins(deps, await issuedByCreator(deps, roles, result), result, run);
  return result;
}

/** An issued role as the catalogue showed it before this attempt: what an earlier one already did. */
interface IssuedRole {
  role: RoleToDrop;
  canLogin: boolean;
  /** Whoever ends it already holds the membership that ending its sessions needs. */
  member: boolean;
}

/**
 * SQL condition on the pg_roles row `alias` and the creator expression `creator` (NULL: the
 * broker acts itself): the GRANT before ending the role's sessions would change nothing. On 16+
 * that is a membership of the actor granted by the actor (by the bootstrap superuser, oid 10, if
 * the actor is a superuser), with the options that GRANT sets; on 15 a pair has one membership,
 * whoever granted it. The options are read through to_jsonb so that 15, which has no such
 * columns, parses it.
 */
function membershipInPlace(alias: string, creator: string): string {
  return `EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles a ON a.oid = m.member
                   WHERE m.roleid = ${alias}.oid AND a.rolname = COALESCE(${creator}, current_user)
                     AND (NOT to_jsonb(m) ? 'set_option'
                          OR (m.grantor = CASE WHEN a.rolsuper THEN 10::oid ELSE a.oid END
                              AND (${creator} IS NULL OR ((to_jsonb(m) ->> 'inherit_option')::boolean
                                                          AND NOT (to_jsonb(m) ->> 'set_option')::boolean)))))`;
}

/**
 * The roles this deployment issued, by who ends them. Roles that are gone count as done; one
 * that is not a plain member of the marker role, or a failed lookup, is each role's outcome.
 */
async function issuedByCreator(deps: TeardownDeps, roles: RoleToDrop[], result: TeardownResult): Promise<Map<string | null, IssuedRole[]>> {
  const byCreator = new Map<string | null, IssuedRole[]>();
  if (roles.length === 0) return byCreator;
  let present: Array<{ rolname: string; issued: boolean; creator: string | null; can_login: boolean; member: boolean }>;
  try {
    // OFFSET 0 keeps the planner from copying the creator subquery into each place that uses it.
    ({ rows: present } = await deps.pool.query(
      `SELECT r.rolname, ${issuedRoleCondition('r', '$2')} AS issued, c.creator, r.rolcanlogin AS can_login,
              ${membershipInPlace('r', 'c.creator')} AS member
         FROM pg_roles r CROSS JOIN LATERAL (SELECT ${creatorOf('r', '$3')} AS creator OFFSET 0) c
        WHERE r.rolname = ANY($1)`,
      [roles.map((r) => r.username), deps.managedRole, creatorNames(deps.managedRole)],
    ));
  } catch (err) {
    // Reported as a failure per role, like any later step's, so the caller can still record it
    // (and retry soon: the logins are still enabled) rather than leave the claim to lapse.
    for (const role of roles) {
      result.set(role.username, `${NOLOGIN_STEP}: not tried after looking up the roles: ${describeError(err)}`);
      if (isConnectionError(err) && serverGone(err)) result.outage.set(role.username, err);
    }
    return byCreator;
  }
  for (const p of present) {
    // Never drop what this deployment did not issue, and never pretend such a role is gone.
    if (!p.issued) {
      result.set(p.rolname, `role ${p.rolname} exists but is not a plain member of ${deps.managedRole}; left alone`);
      continue;
    }
    if (!byCreator.has(p.creator)) byCreator.set(p.creator, []);
    for (const role of roles.filter((r) => r.username === p.rolname)) {
      byCreator.get(p.creator)!.push({ role, canLogin: p.can_login, member: p.member });
    }
  }
  return byCreator;
}

/**
 * NOLOGIN for every creator's roles, then their sessions terminated, those of logins still
 * starting included (sessions.ts); returns, by creator, the roles both steps succeeded for.
 */
async function endLogins(
  deps: TeardownDeps, byCreator: Map<string | null, IssuedRole[]>, result: TeardownResult, progress: TeardownRun,
): Promise<Map<string | null, RoleToDrop[]>> {
  const loggedOut = new Map<string | null, { run: Run; members: Set<RoleToDrop>; live: RoleToDrop[] }>();
  for (const [creator, roles] of byCreator) {
    const run = runAs(deps, creator);
    // Login first, sessions second: otherwise a client could reconnect between the two steps.
    // What an earlier attempt committed is not sent again: an ALTER ROLE waits for any open
    // transaction that altered the role, such as an earlier attempt's handover that its client gave
    // up on and the server still runs, and a retry that waited there would fail in this step and
    // report a login as enabled that is long disabled.
    const enabled = roles.filter((r) => r.canLogin).map((r) => r.role);
    const members = new Set(roles.filter((r) => r.member).map((r) => r.role));
    const passed = new Set([
      ...roles.filter((r) => !r.canLogin).map((r) => r.role),
      ...await stepEach(enabled, result, NOLOGIN_STEP, (batch) => noLogin(deps, run, creator, members, batch), progress),
    ]);
    loggedOut.set(creator, { run, members, live: roles.map((r) => r.role).filter((r) => passed.has(r)) });
  }
  // Looked for once all NOLOGINs have committed, and before any session is looked for by name: a
  // login that was starting then is either still starting, or shows its role by then.
  const anyLive = [...loggedOut.values()].some((g) => g.live.length > 0);
  const starting = anyLive && !progress.unreachable ? await startingLogins(deps.pool).catch((err: unknown) => err) : [];
  const ended = new Map<string | null, RoleToDrop[]>();
  for (const [creator, { run, members, live }] of loggedOut) {
    ended.set(creator, await stepEach(live, result, 'terminate sessions', async (batch) => {
      if (!Array.isArray(starting)) throw starting;
      await terminateSessions(deps, run, creator, members, batch, starting);
    }, progress));
  }
  return ended;
}

/**
 * NOLOGIN for `batch`. An issued role may alter itself (its password) in a transaction it leaves
 * open, which holds its catalogue row, so NOLOGIN would wait out every attempt while the session
 * lives on. So once NOLOGIN has waited a moment, the broker looks for sessions of these roles in
 * its way and ends them: NOLOGIN is queued on the row by then, so it takes the row before any
 * session that logs in meanwhile, which cannot happen if the sessions are ended first. Nothing
 * is looked for while NOLOGIN goes through at once, as it nearly always does: a query more per
 * teardown had cost the reaper a third of its pace.
 */
async function noLogin(deps: TeardownDeps, run: Run, creator: string | null, members: Set<RoleToDrop>, batch: RoleToDrop[]): Promise<void> {
  const sql = batch.map((r) => `ALTER ROLE ${escapeIdent(r.username)} NOLOGIN`).join(';\n');
  const names = batch.map((r) => r.username);
  const done = new AbortController();
  // The watch ends with the statement, not after the reaper's pause that follows it.
  const started = performance.now();
  const attempt = runAs({ ...deps, pace: undefined }, creator)(sql).finally(() => done.abort());
  const watching = (async () => {
    await sleep(BLOCKER_WATCH_AFTER_MS, undefined, { signal: done.signal });
    while (!done.signal.aborted) {
      // One failed look (no free connection, a session slow to exit) must not end the watch.
      try {
        if (await blockedBySessionsOf(deps.pool, names)) await terminateSessions(deps, run, creator, members, batch);
      } catch (err) {
        deps.log.debug({ err: { message: (err as Error).message } }, 'could not end the sessions in the way of NOLOGIN yet');
      }
      await sleep(BLOCKER_POLL_MS, undefined, { signal: done.signal });
    }
  })().catch(() => undefined);
  try {
    await attempt;
  } catch (err) {
    await endPreparedHolders(deps, creator, batch, err);
    await runAs({ ...deps, pace: undefined }, creator)(sql);
  } finally {
    await watching;
  }
  await deps.pace?.(performance.now() - started);
}

/**
 * Whether a session of these roles holds a lock another session waits for. Not narrowed to the
 * broker's own NOLOGIN: a broker that logs in as another role and takes its own with SET ROLE
 * cannot see that session's query or wait, and these roles' sessions are ended next anyway.
 */
async function blockedBySessionsOf(pool: pg.Pool, names: string[]): Promise<boolean> {
  const { rows } = await pool.query<{ blocked: boolean }>(
    `SELECT EXISTS (SELECT 1 FROM pg_stat_activity w CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS b(pid)
                      JOIN pg_stat_activity h ON h.pid = b.pid
                     WHERE h.usename = ANY($1)) AS blocked`, [names]);
  return rows[0].blocked;
}

/**
 * After NOLOGIN's lock wait timed out (`err`): a prepared transaction of these roles holds its
 * locks with no session to end (max_prepared_transactions > 0). Each is rolled back as its owner,
 * in its database, so that NOLOGIN can be sent again. Throws `err` when none is found, and names
 * them in it when rolling them back fails, for a superuser to finish.
 */
async function endPreparedHolders(deps: TeardownDeps, creator: string | null, batch: RoleToDrop[], err: unknown): Promise<void> {
  // 55P03: lock_timeout; 57014: statement_timeout, the only bound with BROKER_LOCK_TIMEOUT=0.
  if (!['55P03', '57014'].includes((err as { code?: string }).code ?? '')) throw err;
  const { rows } = await deps.pool.query<{ owner: string; gid: string; database: string }>(
    'SELECT owner, gid, database FROM pg_prepared_xacts WHERE owner = ANY($1)', [batch.map((r) => r.username)],
  ).catch(() => ({ rows: [] }));
  if (rows.length === 0) throw err;
  try {
    await rollBackPrepared(deps, creator, rows);
  } catch (failure) {
    const held = rows.map((r) => `${r.owner}'s '${r.gid}' in ${r.database}`).join(', ');
    throw Object.assign(err as object, {
      detail: `prepared transactions hold the role: ${held}; rolling them back failed (${(failure as Error).message}): ROLLBACK PREPARED them as a superuser`,
    });
  }
}

/** What the logged-out roles own, in every database, then the roles themselves. */
async function dropRoles(
  deps: TeardownDeps, creator: string | null, loggedOut: RoleToDrop[], result: TeardownResult, progress: TeardownRun,
): Promise<void> {
  if (loggedOut.length === 0) return;
  const run = runAs(deps, creator);
  const droppable = await handOverOwnedObjects(deps, creator, loggedOut, result, progress);
  await stepEach(droppable, result, 'DROP ROLE', (batch) =>
    run(`DROP ROLE IF EXISTS ${batch.map((r) => escapeIdent(r.username)).join(', ')}`, undefined, deps.recordDrop?.(batch)).then(() => undefined), progress);
}
