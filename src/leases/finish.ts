import { auditJson, insertAuditFromJson } from '../audit/repository.js';
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
 * Tears down the roles of claimed leases and records the outcome: `expired`/`revoked` with an
 * audit event each, or another attempt with backoff (revoke_failed from MAX_ATTEMPTS on, with an
 * audit event when it first gets there). A lease someone else finished meanwhile gets no second
 * event: events are written only for the state changes the same statement made.
 */
export async function finishLeases(deps: FinishDeps, leases: EndingLease[], actor?: Actor): Promise<TeardownResult> {
  const outcome = await teardownRoles(deps, leases.map(roleToDrop));
  const done = leases.filter((l) => outcome.get(l.username) === null);
  const failed = leases.filter((l) => outcome.get(l.username) !== null);
  if (done.length > 0) {
    const audit = done.map((l) => ({
      type: endedByExpiry(l) ? 'lease.expired' as const : 'lease.revoked' as const,
      issuer: actor?.issuer ?? l.issuer,
      subject: actor?.subject ?? l.subject,
      lease_id: l.id,
      policy: l.policy,
      username: l.username,
      reason: l.end_reason,
      request_id: actor?.requestId ?? null,
      client_ip: actor?.clientIp ?? null,
      // Who ended the lease need not be who finishes its teardown: the reaper (recorded under the
      // lease's identity) or a later request finishes one whose first teardown failed or whose
      // broker died. Without ended_by here the trail would lose who revoked it.
      detail: actor ? { owner_issuer: l.issuer, owner_subject: l.subject, ended_by: l.ended_by } : { ended_by: l.ended_by },
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
  for (const l of failed) {
    const error = outcome.get(l.username)!;
    deps.metrics?.reaperFailures.inc();
    // The revoke_failed event commits with the attempt that reaches it, or not at all: written
    // after it, a crash in between would lose it for good (attempts never read 5 again).
    const reachedFailed = {
      type: 'lease.revoke_failed' as const, issuer: l.issuer, subject: l.subject, lease_id: l.id, policy: l.policy, username: l.username,
      reason: error, detail: { attempts: MAX_ATTEMPTS, ended_by: l.ended_by },
    };
    const { rows } = await deps.pool.query<{ attempts: number }>(
      `WITH failed AS (
         UPDATE broker.leases SET attempts = attempts + 1, last_error = $2,
                state = CASE WHEN attempts + 1 >= $3 THEN 'revoke_failed' ELSE 'revoking' END,
                next_attempt_at = now() + make_interval(secs => $4), claimed_by_pid = NULL
          WHERE id = $1 AND state IN ('revoking', 'revoke_failed')
          RETURNING attempts
       ), event AS (
         ${insertAuditFromJson(5, '(SELECT attempts FROM failed) = $3')}
       )
       SELECT attempts FROM failed`,
      [l.id, error, MAX_ATTEMPTS, retryDelaySeconds(error, l.attempts + 1, deps.retryBaseSeconds), auditJson([reachedFailed])],
    );
    const attempts = rows[0]?.attempts;
    const loginEnabled = loginStillEnabled(error);
    deps.log.warn(
      { lease_id: l.id, username: l.username, attempts, error, login_enabled: loginEnabled },
      loginEnabled ? 'lease teardown failed before its login was disabled; will retry' : 'lease teardown failed; will retry',
    );
  }
  return outcome;
}
