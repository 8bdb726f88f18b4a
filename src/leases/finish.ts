import { auditJson, insertAuditFromJson, type AuditEvent } from '../audit/repository.js';
import type { Metrics } from '../metrics.js';
import { endedByExpiry, ENDED_BY_EXPIRY_SQL, type EndingLease } from './claims.js';
import { loginStillEnabled, teardownRoles } from './teardown.js';
import type { RoleToDrop, TeardownDeps, TeardownResult } from './teardown-steps.js';

// Finishing claimed leases: their roles torn down, and each outcome recorded on the lease row and
// in the audit trail by one statement, so the row and the trail never disagree.

/** After this many failed teardowns a lease reads revoke_failed; it is still retried, less often. */
export const MAX_ATTEMPTS = 5;

export interface Actor {
  issuer: string;
  subject: string;
  requestId?: string | null;
  clientIp?: string | null;
}

export const roleToDrop = (l: EndingLease): RoleToDrop => ({ username: l.username, reassign_to: l.grant_role });

function backoffSeconds(attempts: number, baseSeconds: number): number {
  return Math.min(baseSeconds * 2 ** Math.min(attempts, 10), 3600);
}

/**
 * When to try a failed teardown again. A role that can still log in is retried at the base
 * interval, without backoff: what stopped it (a busy pool, a lock held on the role) passes, and
 * until then an ended lease's credential still works. The attempts count all the same: one that
 * keeps failing reads revoke_failed, with its audit event, after MAX_ATTEMPTS, and backs off from
 * then on like any other, since a failure that lasting will not pass by itself.
 */
export function retryDelaySeconds(error: string, attempts: number, baseSeconds: number): number {
  return loginStillEnabled(error) && attempts < MAX_ATTEMPTS ? baseSeconds : backoffSeconds(attempts, baseSeconds);
}

export interface FinishDeps extends TeardownDeps {
  metrics?: Metrics;
  retryBaseSeconds: number;
}

/**
 * Who an event about a lease's teardown names: the caller whose request made the attempt (with
 * the owner in `detail`), or the lease's owner for the reaper's. `ended_by` is always there: who
 * ended the lease need not be who finishes, or fails to finish, its teardown.
 */
function teardownActor(l: EndingLease, actor?: Actor): Pick<AuditEvent, 'issuer' | 'subject' | 'request_id' | 'client_ip' | 'detail'> {
  return {
    issuer: actor?.issuer ?? l.issuer,
    subject: actor?.subject ?? l.subject,
    request_id: actor?.requestId ?? null,
    client_ip: actor?.clientIp ?? null,
    detail: actor ? { owner_issuer: l.issuer, owner_subject: l.subject, ended_by: l.ended_by } : { ended_by: l.ended_by },
  };
}

/** A timestamptz column in the API's form, RFC 3339 UTC with milliseconds, whatever the session's TimeZone. */
const utc = (column: string) => `to_char(${column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')`;

/**
 * SQL for the detail of a lease.teardown_failed event, from the lease row `f` the same statement
 * updated: the attempt count, state and retry time are the row's, not what the caller expected.
 */
const FAILED_ATTEMPT_DETAIL = `CASE WHEN e.type = 'lease.teardown_failed' THEN e.detail || jsonb_build_object(
    'attempt', f.attempts, 'state', f.state, 'ended_at', ${utc('f.ended_at')},
    'retry_scheduled', f.next_attempt_at IS NOT NULL, 'next_attempt_at', ${utc('f.next_attempt_at')}) ELSE e.detail END`;

/**
 * Tears down the roles of claimed leases and records the outcome: `expired`/`revoked` with an
 * audit event each, or another attempt with backoff and a lease.teardown_failed event
 * (revoke_failed from MAX_ATTEMPTS on, with a lease.revoke_failed event too when it first gets
 * there). A lease someone else finished meanwhile gets no second event: events are written only
 * for the state changes the same statement made.
 */
export async function finishLeases(deps: FinishDeps, leases: EndingLease[], actor?: Actor): Promise<TeardownResult> {
  const outcome = await teardownRoles(deps, leases.map(roleToDrop));
  const done = leases.filter((l) => outcome.get(l.username) === null);
  const failed = leases.filter((l) => outcome.get(l.username) !== null);
  if (done.length > 0) {
    const audit = done.map((l) => ({
      type: endedByExpiry(l) ? 'lease.expired' as const : 'lease.revoked' as const,
      lease_id: l.id,
      policy: l.policy,
      username: l.username,
      reason: l.end_reason,
      // Who ended the lease need not be who finishes its teardown: the reaper (recorded under the
      // lease's identity) or a later request finishes one whose first teardown failed or whose
      // broker died. Without ended_by here the trail would lose who revoked it.
      ...teardownActor(l, actor),
    }));
    const { rows } = await deps.pool.query<{ lease_id: string }>(
      // Locked in id order first, as every statement that locks several leases and waits does
      // (markRevoking, renewClaim): two such statements in different orders deadlock.
      `WITH locked AS MATERIALIZED (
         SELECT id FROM broker.leases WHERE id = ANY($1::uuid[]) AND state IN ('revoking', 'revoke_failed') ORDER BY id FOR UPDATE
       ), done AS (
         UPDATE broker.leases l SET state = CASE WHEN ${ENDED_BY_EXPIRY_SQL} THEN 'expired' ELSE 'revoked' END,
                last_error = NULL, next_attempt_at = NULL, claimed_by_pid = NULL
           FROM locked WHERE l.id = locked.id
          RETURNING l.id
       )
       ${insertAuditFromJson(2, 'e.lease_id IN (SELECT id FROM done)')}
       RETURNING lease_id`,
      [done.map((l) => l.id), auditJson(audit)],
    );
    const finished = new Set(rows.map((r) => r.lease_id));
    for (const l of done) if (finished.has(l.id)) (endedByExpiry(l) ? deps.metrics?.expired : deps.metrics?.revoked)?.inc();
  }
  for (const l of failed) await recordFailedAttempt(deps, l, outcome.get(l.username)!, actor);
  return outcome;
}

/**
 * One failed teardown attempt: the lease's attempts, last_error and next retry, its
 * lease.teardown_failed event (and lease.revoke_failed on reaching MAX_ATTEMPTS), in one statement.
 * Each attempt is on record, not only the last: an auditor must see that a role outlived the end
 * of its lease, and whether it could still log in meanwhile. `error` is what last_error holds:
 * the step and PostgreSQL's error for a teardown statement, which carries no password or token.
 */
async function recordFailedAttempt(deps: FinishDeps, l: EndingLease, error: string, actor?: Actor): Promise<void> {
  deps.metrics?.reaperFailures.inc();
  const loginEnabled = loginStillEnabled(error);
  const about = { lease_id: l.id, policy: l.policy, username: l.username, reason: error };
  const attempt = teardownActor(l, actor);
  const events: AuditEvent[] = [
    // The statement adds attempt, state, ended_at and the retry (FAILED_ATTEMPT_DETAIL).
    { type: 'lease.teardown_failed', ...about, ...attempt, detail: { ...attempt.detail, login_disabled: !loginEnabled } },
    // The revoke_failed event commits with the attempt that reaches it, or not at all: written
    // after it, a crash in between would lose it for good (attempts never read 5 again).
    { type: 'lease.revoke_failed', ...about, issuer: l.issuer, subject: l.subject, detail: { attempts: MAX_ATTEMPTS, ended_by: l.ended_by } },
  ];
  const { rows } = await deps.pool.query<{ attempts: number }>(
    `WITH failed AS (
       UPDATE broker.leases SET attempts = attempts + 1, last_error = $2,
              state = CASE WHEN attempts + 1 >= $3 THEN 'revoke_failed' ELSE 'revoking' END,
              next_attempt_at = now() + make_interval(secs => $4), claimed_by_pid = NULL
        WHERE id = $1 AND state IN ('revoking', 'revoke_failed')
        RETURNING attempts, state, ended_at, next_attempt_at
     ), event AS (
       ${insertAuditFromJson(5, `e.type = 'lease.teardown_failed' OR f.attempts = $3`, { from: 'failed f', detail: FAILED_ATTEMPT_DETAIL })}
     )
     SELECT attempts FROM failed`,
    [l.id, error, MAX_ATTEMPTS, retryDelaySeconds(error, l.attempts + 1, deps.retryBaseSeconds), auditJson(events)],
  );
  deps.log.warn(
    { lease_id: l.id, username: l.username, attempts: rows[0]?.attempts, error, login_enabled: loginEnabled },
    loginEnabled ? 'lease teardown failed before its login was disabled; will retry' : 'lease teardown failed; will retry',
  );
}
