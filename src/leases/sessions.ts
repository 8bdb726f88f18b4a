import { setTimeout as sleep } from 'node:timers/promises';
import type pg from 'pg';
import { escapeIdent, escapeLit } from '../postgres/sql.js';
import type { RoleToDrop, Run, TeardownDeps } from './teardown-steps.js';

// Ending the sessions of roles whose logins have just been disabled (teardown.ts).

// Sessions get this long to exit after pg_terminate_backend; a role is never dropped while one
// survives, because a session outlives DROP ROLE and could then no longer be found by name.
export const TERMINATE_WAIT_MS = 5000;
// How long logins still starting after NOLOGIN get to finish by themselves (a few ms, normally)
// before they are signalled, and how often they are looked at meanwhile.
const STARTING_WAIT_MS = 250;
const STARTING_POLL_MS = 20;

/**
 * Ends the sessions of the roles in `batch` that have any; false when none had. `members`: the
 * roles whose membership the actor already holds (and, after this, the ones it took).
 * `starting`: logins still starting since before the batch's NOLOGIN (startingLogins), whichever
 * of them are the batch's are ended too.
 */
export async function terminateSessions(
  deps: TeardownDeps, run: Run, creator: string | null, members: Set<RoleToDrop>, batch: RoleToDrop[], starting: number[] = [],
): Promise<boolean> {
  if (starting.length > 0) {
    await grantMembership(run, creator, members, batch);
    await run(terminateStarting(creator, batch, starting));
  }
  // Looked up as the broker first: most ended roles have no session left, and for those no
  // statement runs as the creator. Every SET ROLE after a membership change costs PostgreSQL
  // 16+ a walk of every creator's memberships, and every GRANT one of the creator's; both grow
  // with the live issued roles, and they had been most of a teardown's cost.
  const withSessions = await sessionHolders(deps.pool, batch.map((r) => r.username));
  const targets = batch.filter((r) => withSessions.has(r.username));
  if (targets.length === 0) return false;
  await grantMembership(run, creator, members, targets);
  const targetNames = targets.map((r) => r.username);
  // The call sits in a materialized select list: in a WHERE clause the planner may evaluate it
  // before the usename filter, and it would then terminate every backend it can signal.
  const { rows: signalled } = await run(
    `WITH t AS MATERIALIZED (SELECT pid, pg_terminate_backend(pid, $2) AS ok FROM pg_stat_activity
                              WHERE usename = ANY($1) AND pid <> pg_backend_pid())
     SELECT ok FROM t`,
    [targetNames, TERMINATE_WAIT_MS],
  );
  if (signalled.every((r) => r.ok)) return true;
  // false also means the session ended by itself in the meantime: look again before failing.
  const left = await sessionHolders(deps.pool, targetNames);
  if (left.size > 0) throw new Error(`sessions of ${[...left].join(', ')} did not exit within ${TERMINATE_WAIT_MS} ms`);
  return true;
}

/** The roles among `names` with a session other than this one (usename is visible to anyone). */
async function sessionHolders(pool: pg.Pool, names: string[]): Promise<Set<string>> {
  const { rows } = await pool.query<{ usename: string }>(
    'SELECT DISTINCT usename FROM pg_stat_activity WHERE usename = ANY($1) AND pid <> pg_backend_pid()', [names]);
  return new Set(rows.map((r) => r.usename));
}

/**
 * Signalling a role's sessions needs its privileges, which nobody holds while it is live (a
 * creator only has ADMIN OPTION on it, the broker on 15 nothing): whoever ends it takes the
 * membership now, for the few statements left, so no membership graph walked by other
 * statements ever holds every live role. (The handover takes it too: owned-objects.ts.)
 */
async function grantMembership(run: Run, creator: string | null, members: Set<RoleToDrop>, roles: RoleToDrop[]): Promise<void> {
  const ungranted = roles.filter((r) => !members.has(r));
  if (ungranted.length === 0) return;
  const names = ungranted.map((r) => escapeIdent(r.username)).join(', ');
  await run(creator ? `GRANT ${names} TO ${escapeIdent(creator)} WITH INHERIT TRUE, SET FALSE` : `GRANT ${names} TO CURRENT_USER`);
  for (const role of ungranted) members.add(role);
}

/**
 * The logins that were starting when this was called, after NOLOGIN: a backend checks that its
 * role may log in early in its start-up (InitializeSessionUserId), and shows that role in
 * pg_stat_activity only at the end of it (pgstat_bestart on 15, pgstat_bestart_final on 18), and
 * any client may stretch the time between the two with post_auth_delay, up to 35 minutes, in its
 * startup packet. A login that passed the check just before NOLOGIN committed is not found by its
 * role's name, and once the role is dropped it can no longer be found or signalled, yet it logs in
 * and stays.
 *
 * Whose such a login is, nobody but the server knows. What shows that it is starting: it holds its
 * start-up transaction's virtualxid lock (from before it reads pg_authid), and in pg_stat_activity
 * it is missing (15) or has neither database nor role yet (18; so have the auxiliary processes,
 * which hold no virtualxid). Those holding one once NOLOGIN had committed are all that may still
 * log in as the roles: any other reads pg_authid after the commit. pg_locks is read first (the
 * LATERAL subquery, kept whole by OFFSET 0, runs only once it has a row), pg_stat_activity after: a login whose start-up ends in between then shows
 * its role, where read the other way round it would show in neither.
 *
 * Only backends that also hold their database's lock, or wait for it, count: a backend asks for
 * it right after the login check, before post_auth_delay's sleep, and keeps it through its
 * start-up (it may wait, behind CREATE DATABASE … TEMPLATE or an attempted DROP DATABASE). One without it
 * is still authenticating, has passed no check and holds no role anyone could signal it as; anyone
 * who can reach the port can keep one there until authentication_timeout, with no password, and
 * each would otherwise cost every teardown the wait below. (Its wait event would say so too, but
 * the broker, no superuser, is not shown other roles' wait events.)
 *
 * One query per teardown, which nearly always finds nothing; the few found get a moment to finish
 * by themselves (stillStarting), and the pids of those still starting are returned.
 */
export async function startingLogins(pool: pg.Pool): Promise<number[]> {
  const { rows } = await pool.query<Starting>(
    `SELECT v.pid, v.vxid
       FROM (SELECT array_agg(pid) AS pids, array_agg(vxid) AS vxids
               FROM (SELECT pid, max(virtualxid) FILTER (WHERE locktype = 'virtualxid' AND mode = 'ExclusiveLock' AND granted) AS vxid,
                            bool_or(locktype = 'object' AND classid = 'pg_catalog.pg_database'::pg_catalog.regclass) AS past_check
                       FROM pg_locks WHERE pid <> pg_backend_pid() GROUP BY pid) h
              WHERE vxid IS NOT NULL AND past_check) l
      CROSS JOIN LATERAL (SELECT u.pid, u.vxid FROM unnest(l.pids, l.vxids) AS u(pid, vxid)
                            LEFT JOIN pg_stat_get_activity(NULL) a ON a.pid = u.pid
                           WHERE a.pid IS NULL OR (a.datid IS NULL AND a.usesysid IS NULL) OFFSET 0) v`);
  if (rows.length === 0) return [];
  return (await stillStarting(pool, rows)).map((s) => s.pid);
}

interface Starting { pid: number; vxid: string }

/**
 * The logins among `starting` still in their start-up after a short wait: most finish within a
 * few ms, and then show their role, and those left are signalled, which costs statements as the
 * creator. The same start-up transaction (pid and virtualxid) still running is what tells.
 */
async function stillStarting(pool: pg.Pool, starting: Starting[]): Promise<Starting[]> {
  const deadline = performance.now() + STARTING_WAIT_MS;
  for (;;) {
    const { rows } = await pool.query<Starting>(
      `SELECT pid, virtualxid AS vxid FROM pg_locks WHERE locktype = 'virtualxid' AND mode = 'ExclusiveLock' AND granted
          AND (pid, virtualxid) IN (SELECT * FROM unnest($1::int[], $2::text[]))`,
      [starting.map((s) => s.pid), starting.map((s) => s.vxid)]);
    if (rows.length === 0 || performance.now() >= deadline) return rows;
    starting = rows;
    await sleep(STARTING_POLL_MS);
  }
}

/**
 * One statement that terminates each of `pids` whose login is one of `batch`'s roles. PostgreSQL
 * lets a role signal backends whose role (set at the login check, before the backend shows it)
 * it has the privileges of, and refuses the rest, so each pid is tried on its own and a refusal
 * passed over. The signal is sent by whoever holds the fewest privileges besides: the creator,
 * which inherits nothing but roles it ends; for the broker, which may hold others (its own, whose
 * logins start too), each role in turn, which holds its groups' too (a group that logs in itself
 * could lose a login stuck starting for longer than STARTING_WAIT_MS).
 */
function terminateStarting(creator: string | null, batch: RoleToDrop[], pids: number[]): string {
  const roles = creator ? [null] : batch.map((r) => r.username);
  const attempts = roles.map((role) => `
  ${role === null ? '' : `SET LOCAL ROLE ${escapeIdent(role)};`}
  FOREACH p IN ARRAY ARRAY[${pids.join(', ')}]::int[] LOOP
    BEGIN
      PERFORM pg_terminate_backend(p, ${TERMINATE_WAIT_MS});
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
  END LOOP;`).join('');
  return `DO ${escapeLit(`DECLARE p int; BEGIN${attempts}\nEND`)}`;
}
