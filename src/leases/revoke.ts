import { auditJson, insertAuditFromJson } from '../audit/repository.js';
import type { Metrics } from '../metrics.js';
import type { Queryable } from '../postgres/pool.js';
import { teardownRoles, type TeardownDeps } from './teardown.js';

/** After this many failed teardowns a lease reads revoke_failed; it is still retried, less often. */
export const MAX_ATTEMPTS = 5;
/** A lease claimed for teardown is hidden from other claimers this long, then retried. */
export const CLAIM_SECONDS = 120;

export interface EndingLease {
  id: string;
  username: string;
  grant_role: string;
  end_reason: string;
  issuer: string;
  subject: string;
  policy: string;
  attempts: number;
}

export interface EndFilter {
  id?: string;
  subject?: string;
  issuer?: string;
  policy?: string;
}

export interface Actor {
  issuer: string;
  subject: string;
  requestId?: string | null;
  clientIp?: string | null;
}

const ENDING_COLUMNS = 'id, username, grant_role, end_reason, issuer, subject, policy, attempts';

/**
 * Step one of any revocation, committed on its own: the matching active leases now read
 * `revoking` with ended_at, ended_by and end_reason, and are claimed by the caller for
 * CLAIM_SECONDS. If the caller dies, the reaper finishes the job after the claim lapses.
 */
export async function markRevoking(db: Queryable, filter: EndFilter, endedBy: string, reason: string): Promise<EndingLease[]> {
  const where: string[] = [`state = 'active'`];
  const params: unknown[] = [endedBy, reason, CLAIM_SECONDS];
  for (const key of ['id', 'subject', 'issuer', 'policy'] as const) {
    if (filter[key] !== undefined) where.push(`${key} = $${params.push(filter[key])}`);
  }
  const { rows } = await db.query<EndingLease>(
    `UPDATE broker.leases SET state = 'revoking', ended_at = now(), ended_by = $1, end_reason = $2,
            next_attempt_at = now() + make_interval(secs => $3)
      WHERE id IN (SELECT id FROM broker.leases WHERE ${where.join(' AND ')} FOR UPDATE)
      RETURNING ${ENDING_COLUMNS}`,
    params,
  );
  return rows;
}

/** Claims ended leases whose teardown is due: expired ones first become `revoking`. */
export async function claimDueLeases(db: Queryable, limit: number): Promise<EndingLease[]> {
  await db.query(
    `UPDATE broker.leases SET state = 'revoking', ended_at = expires_at, ended_by = 'reaper', end_reason = 'expired', next_attempt_at = now()
      WHERE id IN (SELECT id FROM broker.leases WHERE state = 'active' AND expires_at <= now()
                    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)`,
    [limit * 5],
  );
  const { rows } = await db.query<EndingLease>(
    `UPDATE broker.leases SET next_attempt_at = now() + make_interval(secs => $2)
      WHERE id IN (SELECT id FROM broker.leases
                    WHERE state IN ('revoking', 'revoke_failed') AND (next_attempt_at IS NULL OR next_attempt_at <= now())
                    ORDER BY next_attempt_at NULLS FIRST LIMIT $1 FOR UPDATE SKIP LOCKED)
      RETURNING ${ENDING_COLUMNS}`,
    [limit, CLAIM_SECONDS],
  );
  return rows;
}

function backoffSeconds(attempts: number, baseSeconds: number): number {
  return Math.min(baseSeconds * 2 ** Math.min(attempts, 10), 3600);
}

export interface FinishDeps extends TeardownDeps {
  metrics?: Metrics;
  retryBaseSeconds: number;
}

/**
 * Tears down the roles of claimed leases and records the outcome: `expired`/`revoked` with an
 * audit event each, or another attempt with backoff (revoke_failed past MAX_ATTEMPTS).
 */
export async function finishLeases(deps: FinishDeps, leases: EndingLease[], actor?: Actor): Promise<Map<string, string | null>> {
  const outcome = await teardownRoles(
    deps,
    leases.map((l) => ({ username: l.username, reassign_to: l.grant_role })),
  );
  const done = leases.filter((l) => outcome.get(l.username) === null);
  const failed = leases.filter((l) => outcome.get(l.username) !== null);
  if (done.length > 0) {
    const audit = done.map((l) => ({
      type: l.end_reason === 'expired' ? 'lease.expired' : 'lease.revoked',
      issuer: actor?.issuer ?? l.issuer,
      subject: actor?.subject ?? l.subject,
      lease_id: l.id,
      policy: l.policy,
      username: l.username,
      reason: l.end_reason,
      request_id: actor?.requestId ?? null,
      client_ip: actor?.clientIp ?? null,
      detail: actor ? { owner_issuer: l.issuer, owner_subject: l.subject } : null,
    }));
    await deps.pool.query(
      `WITH done AS (
         UPDATE broker.leases SET state = CASE WHEN end_reason = 'expired' THEN 'expired' ELSE 'revoked' END,
                last_error = NULL, next_attempt_at = NULL
          WHERE id = ANY($1::uuid[]) AND state IN ('revoking', 'revoke_failed')
       )
       ${insertAuditFromJson(2)}`,
      [done.map((l) => l.id), auditJson(audit)],
    );
    for (const l of done) (l.end_reason === 'expired' ? deps.metrics?.expired : deps.metrics?.revoked)?.inc();
  }
  for (const l of failed) {
    const attempts = l.attempts + 1;
    deps.metrics?.reaperFailures.inc();
    deps.log.warn({ lease_id: l.id, username: l.username, attempts, error: outcome.get(l.username) }, 'lease teardown failed; will retry');
    await deps.pool.query(
      `UPDATE broker.leases SET attempts = $2, last_error = $3, state = CASE WHEN $2 >= $4 THEN 'revoke_failed' ELSE 'revoking' END,
              next_attempt_at = now() + make_interval(secs => $5)
        WHERE id = $1 AND state IN ('revoking', 'revoke_failed')`,
      [l.id, attempts, outcome.get(l.username), MAX_ATTEMPTS, backoffSeconds(attempts, deps.retryBaseSeconds)],
    );
  }
  return outcome;
}

/** Synchronous revocation for the API: mark, tear down, record. Returns the outcome per lease. */
export async function revokeNow(deps: FinishDeps, filter: EndFilter, actor: Actor, reason: string): Promise<{ leases: EndingLease[]; errors: Map<string, string | null> }> {
  const leases = await markRevoking(deps.pool, filter, `${actor.issuer} ${actor.subject}`, reason);
  const errors = leases.length ? await finishLeases(deps, leases, actor) : new Map<string, string | null>();
  return { leases, errors };
}

