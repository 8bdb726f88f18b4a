import type pg from 'pg';
import { auditJson, insertAuditFromJson } from '../audit/repository.js';
import { eligibleGroupSql } from '../leases/owned-objects.js';
import { teardownRoles } from '../leases/teardown.js';
import type { Statement } from '../leases/teardown-steps.js';
import { claimMarker } from '../postgres/marker.js';
import { isConnectionError, withTransaction } from '../postgres/pool.js';
import { issuedRoleCondition } from '../postgres/roles.js';
import { escapeIdent } from '../postgres/sql.js';
import type { FinishDeps } from '../leases/finish.js';

/** A role whose lease ended longer ago than this is an orphan even though a lease row exists. */
export const ORPHAN_GRACE_SECONDS = 300;

// Roles already reported as out of reach, so the warning is not repeated every run.
const reportedUnmanageable = new Set<string>();

/** How long an orphan whose teardown failed is left out of the sweep, doubling per failure. */
const ORPHAN_RETRY_SECONDS = 60;
const ORPHAN_RETRY_MAX_SECONDS = 3600;
// Orphans whose teardown failed, per deployment (marker role): how often, and when to try again.
// Without this a batch's worth that always fail would be taken first by every run, by name, and
// the sweep would never reach the rest.
const failingByDeployment = new Map<string, Map<string, { failures: number; retryAt: number }>>();

/**
 * Drops members of this deployment's marker role that have no live lease: created by hand, or
 * left behind by something outside the broker. Lease and role are created in one transaction,
 * so a committed role without a lease row is never one being issued right now. Objects such a
 * role owns go to the first group it inherits from; with none, it is left for an operator (see
 * leases/owned-objects.ts).
 *
 * On PostgreSQL 16+ a CREATEROLE broker may only alter or drop roles it holds ADMIN OPTION on.
 * It has that on every role it created; a member someone else put into the marker role without
 * granting it is reported once and left alone, so it cannot stall the sweep for the others.
 */
export async function reapOrphans(deps: FinishDeps & { batchSize?: number }): Promise<number> {
  // Checked every run, not only at start-up: two deployments starting together for the first
  // time can both claim the marker role, and the later claim wins. A claim an operator cleared
  // (see otherDeployment) is taken again.
  const client = await deps.pool.connect();
  try {
    await claimMarker(client, deps.managedRole);
  } catch (err) {
    if (isConnectionError(err)) throw err;
    deps.log.error({ managed_role: deps.managedRole, err: { message: (err as Error).message } }, 'orphan sweep skipped');
    return 0;
  } finally {
    client.release();
  }
  const now = Date.now();
  const batchSize = deps.batchSize ?? 200;
  if (!failingByDeployment.has(deps.managedRole)) failingByDeployment.set(deps.managedRole, new Map());
  const failing = failingByDeployment.get(deps.managedRole)!;
  const resting = [...failing].filter(([, f]) => f.retryAt > now).map(([rolname]) => rolname);
  const { rows } = await deps.pool.query<{ rolname: string; reassign_to: string | null; manageable: boolean }>(
    `SELECT r.rolname,
            (SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
              WHERE m.member = r.oid AND ${eligibleGroupSql('$1')} ORDER BY g.rolname LIMIT 1) AS reassign_to,
            (pg_has_role(r.oid, 'MEMBER WITH ADMIN OPTION')
             OR (current_setting('server_version_num')::int < 160000
                 AND (SELECT rolcreaterole FROM pg_roles WHERE rolname = current_user))) AS manageable
       FROM pg_roles r
      WHERE ${issuedRoleCondition('r', '$1')}
        AND NOT EXISTS (
        SELECT 1 FROM broker.leases l
         WHERE l.username = r.rolname
           AND (l.state IN ('pending', 'active', 'revoking', 'revoke_failed') OR l.ended_at > now() - make_interval(secs => $2)))
        AND r.rolname <> ALL($3::text[])
      ORDER BY manageable DESC, rolname
      LIMIT $4`,
    [deps.managedRole, ORPHAN_GRACE_SECONDS, resting, batchSize],
  );
  // A failing one that is gone now (dropped by hand) is forgotten once its rest is over. Only when
  // the query listed every candidate: one merely past the batch's end would otherwise lose its
  // count, and start again at a minute's rest and one audit event a minute.
  if (rows.length < batchSize) {
    for (const [rolname, f] of failing) if (f.retryAt <= now && !rows.some((r) => r.rolname === rolname)) failing.delete(rolname);
  }
  const unmanageable = rows.filter((r) => !r.manageable && !reportedUnmanageable.has(r.rolname));
  if (unmanageable.length > 0) {
    for (const r of unmanageable) reportedUnmanageable.add(r.rolname);
    deps.log.warn({ usernames: unmanageable.map((r) => r.rolname), managed_role: deps.managedRole },
      'members of the managed role without a lease that the broker holds no ADMIN OPTION on; drop them by hand');
  }
  const candidates = rows.filter((r) => r.manageable);
  if (candidates.length === 0) return 0;
  const reassignTo = new Map(candidates.map((r) => [r.rolname, r.reassign_to]));
  // Each role.orphan_dropped event commits with its DROP ROLE: the role is the only trace of an
  // orphan, so an event written after the drop and lost (a crash, an error) could never be
  // written again.
  const recordDrop = (roles: Array<{ username: string }>) => orphanEvents(deps.managedRole, roles.map((r) => ({ rolname: r.username, reassign_to: reassignTo.get(r.username) ?? null })));
  const outcome = await teardownRoles({ ...deps, recordDrop }, candidates.map((r) => ({ username: r.rolname, reassign_to: r.reassign_to ?? '' })));
  const dropped = candidates.filter((r) => outcome.get(r.rolname) === null);
  const failed: OrphanDropFailure[] = [];
  for (const r of candidates) {
    if (outcome.get(r.rolname) === null) {
      failing.delete(r.rolname);
      continue;
    }
    const failures = (failing.get(r.rolname)?.failures ?? 0) + 1;
    const restSeconds = Math.min(ORPHAN_RETRY_SECONDS * 2 ** (failures - 1), ORPHAN_RETRY_MAX_SECONDS);
    failing.set(r.rolname, { failures, retryAt: now + restSeconds * 1000 });
    failed.push({ rolname: r.rolname, error: outcome.get(r.rolname)!, attempt: failures, retryAt: new Date(now + restSeconds * 1000) });
    deps.log.warn({ username: r.rolname, error: outcome.get(r.rolname), retry_in_seconds: restSeconds }, 'could not drop orphaned managed role');
  }
  if (failed.length > 0) {
    // The sweep's outcome stands without its events: the failures are logged above, and the
    // next attempt after the rest, which fails the same way if nothing changed, writes its own.
    await recordOrphanDropFailures(deps.pool, deps.managedRole, failed).catch((err: Error) =>
      deps.log.error({ usernames: failed.map((f) => f.rolname), err: { message: err.message } }, 'could not record failed orphan drops in the audit trail'));
  }
  if (dropped.length > 0) {
    deps.metrics?.orphans.inc(dropped.length);
    deps.log.info({ count: dropped.length }, 'dropped orphaned managed roles');
  }
  return dropped.length;
}

/**
 * One role.orphan_dropped event per role, as statements to run in the same transaction as (and
 * before) the roles' DROP ROLE IF EXISTS, so event and drop commit together. Only roles that still
 * exist are recorded: one a concurrent sweep (a leader that lost its lock mid-run, and the next)
 * dropped first has its event from that sweep. The lock, held to the commit and taken in a
 * statement of its own so that the INSERT's snapshot comes after it, makes the check run after
 * that sweep's commit. An earlier event for the same name says nothing: with event and drop
 * committed together, a role that exists despite one was made again since, and is another orphan.
 */
export function orphanEvents(managedRole: string, dropped: Array<{ rolname: string; reassign_to: string | null }>): Statement[] {
  const events = auditJson(dropped.map((r) => ({ type: 'role.orphan_dropped', username: r.rolname, issuer: null, subject: null, reason: 'managed role without a live lease', detail: { reassigned_to: r.reassign_to } })));
  return [
    orphanEventsLock(managedRole),
    {
      text: insertAuditFromJson(1, 'EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = e.username)'),
      values: [events],
    },
  ];
}

// One per deployment: it is held through the DROP ROLE, which may wait on locks, and the sweeps
// of other deployments on the cluster have nothing to share with this one's.
const orphanEventsLock = (managedRole: string): Statement => ({
  text: `SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended('pg-credential-broker orphan events ' || $1, 0))`,
  values: [managedRole],
});

interface OrphanDropFailure {
  rolname: string;
  /** The teardown's error, as logged: the step and PostgreSQL's message, never a password or token. */
  error: string;
  /** Consecutive failures this process has seen for the role (the map above, which a restart clears). */
  attempt: number;
  retryAt: Date;
}

/**
 * One role.orphan_drop_failed event per orphan whose teardown failed: a login the broker manages
 * outlived every lease and is still there, which the log alone keeps from an auditor.
 *
 * One per failed attempt, and no more: the volume is bounded by the rest the sweep already gives
 * a failing orphan (1 minute, doubling up to an hour), so a stuck one leaves 6 events in its first
 * hour (at 0, 1, 3, 7, 15 and 31 minutes) and then one an hour, about 30 a day, never one per
 * BROKER_REAPER_INTERVAL. Writing only
 * when the error changes would bound it further, but a role stuck for a month would then show one
 * event at its start and nothing saying it is still there; the hourly one does. The rest is kept in
 * memory, so a restart, or another replica taking over the sweep, tries (and records) once more at
 * once and starts the count again at 1.
 *
 * Recorded only for roles that still exist, after the lock orphanEvents takes, as there: a
 * concurrent sweep that dropped the role meanwhile has written its role.orphan_dropped, and a
 * failure event after it would say the role outlived its drop. login_disabled is read from the
 * catalogue in the same statement, not guessed from the error: an earlier attempt may have
 * committed NOLOGIN, and a lookup that failed says nothing either way.
 */
export async function recordOrphanDropFailures(pool: pg.Pool, managedRole: string, failures: OrphanDropFailure[]): Promise<void> {
  const events = auditJson(failures.map((f) => ({
    type: 'role.orphan_drop_failed', username: f.rolname, issuer: null, subject: null, reason: f.error,
    detail: { attempt: f.attempt, retry_scheduled: true, next_attempt_at: f.retryAt.toISOString() },
  })));
  await withTransaction(pool, async (client) => {
    const lock = orphanEventsLock(managedRole);
    await client.query(lock.text, lock.values);
    await client.query(insertAuditFromJson(1, 'r.rolname = e.username', {
      from: 'pg_catalog.pg_roles r', detail: `e.detail || jsonb_build_object('login_disabled', NOT r.rolcanlogin)`,
    }), [events]);
  });
}

/**
 * orphanEvents and the DROP ROLE IF EXISTS they go with, as the broker, in one transaction: a
 * sweep's last step without the steps before it (for tests of the deduplication).
 */
export async function recordOrphansDropped(pool: pg.Pool, managedRole: string, dropped: Array<{ rolname: string; reassign_to: string | null }>): Promise<void> {
  await withTransaction(pool, async (client) => {
    for (const s of orphanEvents(managedRole, dropped)) await client.query(s.text, s.values);
    await client.query(`DROP ROLE IF EXISTS ${dropped.map((r) => escapeIdent(r.rolname)).join(', ')}`);
  });
}
