import { auditJson, insertAuditFromJson } from '../audit/repository.js';
import type { Metrics } from '../metrics.js';
import type { Queryable } from '../postgres/pool.js';
import { withTransaction } from '../postgres/pool.js';
import { identityLockKey } from './repository.js';
import { loginStillEnabled, NOLOGIN_STEP, teardownRoles, type TeardownDeps } from './teardown.js';

/** After this many failed teardowns a lease reads revoke_failed; it is still retried, less often. */
export const MAX_ATTEMPTS = 5;
/** A lease claimed for teardown is hidden from other claimers this long, then retried. */
export const CLAIM_SECONDS = 120;
/** Roles per teardown batch: thousands of DROP ROLEs in one transaction exhaust max_locks_per_transaction. */
export const TEARDOWN_BATCH = 200;

export interface EndingLease {
  id: string;
  username: string;
  grant_role: string;
  end_reason: string;
  ended_by: string;
  issuer: string;
  subject: string;
  policy: string;
  attempts: number;
  /** The backend that holds the claim, as of the statement that returned the lease. */
  claimed_by_pid: number | null;
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

/**
 * SQL condition on lease `l`: its teardown is free to take. A claim lapses when its time is up,
 * or at once when the backend that made it is gone: the broker that claimed the lease was killed
 * (or lost the database) mid-teardown, and nobody will finish it but the next claimer.
 */
const CLAIM_LAPSED = `(l.next_attempt_at IS NULL OR l.next_attempt_at <= now()
  OR (l.claimed_by_pid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = l.claimed_by_pid)))`;

const ENDING_COLUMNS = ['id', 'username', 'grant_role', 'end_reason', 'ended_by', 'issuer', 'subject', 'policy', 'attempts', 'claimed_by_pid'].map((c) => `l.${c}`).join(', ');

/**
 * Who ends a lease that ran out: the reaper, or a revocation that found it already past its
 * expiry. A caller's own reason never decides the state, so `"reason": "expired"` in a bulk
 * revocation still ends its leases as revoked.
 */
const BY_EXPIRY = { endedBy: 'reaper', reason: 'expired' } as const;
const ENDED_BY_EXPIRY_SQL = `(ended_by = '${BY_EXPIRY.endedBy}' AND end_reason = '${BY_EXPIRY.reason}')`;
export const endedByExpiry = (l: Pick<EndingLease, 'ended_by' | 'end_reason'>) => l.ended_by === BY_EXPIRY.endedBy && l.end_reason === BY_EXPIRY.reason;

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
    `WITH target AS MATERIALIZED (SELECT id FROM broker.leases WHERE ${where.join(' AND ')} ORDER BY id FOR UPDATE)
     UPDATE broker.leases l SET state = 'revoking',
            -- One already past its expiry ended then, by itself: it is recorded as expired.
            ended_at = LEAST(now(), l.expires_at),
            ended_by = CASE WHEN l.expires_at <= now() THEN '${BY_EXPIRY.endedBy}' ELSE $1 END,
            end_reason = CASE WHEN l.expires_at <= now() THEN '${BY_EXPIRY.reason}' ELSE $2 END,
            next_attempt_at = now() + make_interval(secs => $3), claimed_by_pid = pg_backend_pid()
       FROM target WHERE l.id = target.id AND l.state = 'active'
     RETURNING ${ENDING_COLUMNS}`,
    params,
  );
  // In id order, as locked: batches then follow one order whatever plan the UPDATE took.
  return rows.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

/**
 * Claims one ended lease whose teardown is due or has failed before, so an owner or admin can
 * have it finished now instead of at the next retry. A `revoking` lease that never failed, is not
 * yet due and whose claimer's connection still lives is being torn down by someone else right
 * now: that one is left to them (the caller waits with awaitEnded).
 */
export async function claimEnded(db: Queryable, id: string): Promise<EndingLease[]> {
  const { rows } = await db.query<EndingLease>(
    `UPDATE broker.leases l SET next_attempt_at = now() + make_interval(secs => $2), claimed_by_pid = pg_backend_pid()
      WHERE l.id = $1 AND l.state IN ('revoking', 'revoke_failed')
        AND (l.attempts > 0 OR ${CLAIM_LAPSED})
      RETURNING ${ENDING_COLUMNS}`,
    [id, CLAIM_SECONDS],
  );
  return rows;
}

/**
 * Waits until a lease being torn down elsewhere reads expired or revoked; its final state, or
 * null. Stops early once nobody holds the teardown: the other claimer recorded a failure and
 * released its claim, so waiting longer changes nothing.
 */
export async function awaitEnded(db: Queryable, id: string, timeoutMs: number): Promise<string | null> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const { rows } = await db.query<{ state: string; claimed: boolean }>(
      'SELECT state, claimed_by_pid IS NOT NULL AS claimed FROM broker.leases WHERE id = $1', [id]);
    const state = rows[0]?.state;
    if (state === 'expired' || state === 'revoked') return state;
    if (state !== 'revoking' || !rows[0].claimed || Date.now() > deadline) return null;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Claims ended leases whose teardown is due: expired ones first become `revoking`. */
export async function claimDueLeases(db: Queryable, limit: number): Promise<EndingLease[]> {
  // MATERIALIZED: the locking subquery runs exactly once, so LIMIT and SKIP LOCKED mean what
  // they say; an inlined or re-scanned subquery could claim rows another reaper has locked.
  await db.query(
    `WITH due AS MATERIALIZED (
       SELECT id FROM broker.leases WHERE state = 'active' AND expires_at <= now()
        ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
     UPDATE broker.leases l SET state = 'revoking', ended_at = l.expires_at, ended_by = '${BY_EXPIRY.endedBy}', end_reason = '${BY_EXPIRY.reason}', next_attempt_at = now()
       FROM due WHERE l.id = due.id`,
    [limit * 5],
  );
  const { rows } = await db.query<EndingLease>(
    `WITH due AS MATERIALIZED (
       SELECT id FROM broker.leases l
        WHERE state IN ('revoking', 'revoke_failed') AND ${CLAIM_LAPSED}
        ORDER BY next_attempt_at NULLS FIRST LIMIT $1 FOR UPDATE SKIP LOCKED)
     UPDATE broker.leases l SET next_attempt_at = now() + make_interval(secs => $2), claimed_by_pid = pg_backend_pid()
       FROM due WHERE l.id = due.id
     RETURNING ${ENDING_COLUMNS}`,
    [limit, CLAIM_SECONDS],
  );
  return rows;
}

function backoffSeconds(attempts: number, baseSeconds: number): number {
  return Math.min(baseSeconds * 2 ** Math.min(attempts, 10), 3600);
}

/**
 * When to try a failed teardown again. A role that can still log in is retried at the base
 * interval, without backoff: what stopped it (a busy pool, a lock held on the role) passes, and
 * until then an ended lease's credential still works. The attempts count all the same, so one
 * that keeps failing still reads revoke_failed, with its audit event, after MAX_ATTEMPTS.
 */
export function retryDelaySeconds(error: string, attempts: number, baseSeconds: number): number {
  return loginStillEnabled(error) ? baseSeconds : backoffSeconds(attempts, baseSeconds);
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
export async function finishLeases(deps: FinishDeps, leases: EndingLease[], actor?: Actor): Promise<Map<string, string | null>> {
  const outcome = await teardownRoles(
    deps,
    leases.map((l) => ({ username: l.username, reassign_to: l.grant_role })),
  );
  const done = leases.filter((l) => outcome.get(l.username) === null);
  const failed = leases.filter((l) => outcome.get(l.username) !== null);
  if (done.length > 0) {
    const audit = done.map((l) => ({
      type: endedByExpiry(l) ? 'lease.expired' : 'lease.revoked',
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
    const { rows } = await deps.pool.query<{ lease_id: string }>(
      `WITH done AS (
         UPDATE broker.leases SET state = CASE WHEN ${ENDED_BY_EXPIRY_SQL} THEN 'expired' ELSE 'revoked' END,
                last_error = NULL, next_attempt_at = NULL, claimed_by_pid = NULL
          WHERE id = ANY($1::uuid[]) AND state IN ('revoking', 'revoke_failed')
          RETURNING id
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
      type: 'lease.revoke_failed', issuer: l.issuer, subject: l.subject, lease_id: l.id, policy: l.policy, username: l.username,
      reason: error, detail: { attempts: MAX_ATTEMPTS },
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

/**
 * The per-identity issuance locks a revocation by subject waits on: that subject under the named
 * issuer, or under every allowed issuer. Sorted, so two revocations take them in the same order.
 * An issuer- or policy-wide revocation cannot name its identities beforehand and takes none.
 */
function identityLockKeys(filter: EndFilter, issuers: string[]): string[] {
  const subject = filter.subject;
  if (subject === undefined || filter.id !== undefined) return [];
  const under = filter.issuer !== undefined ? [filter.issuer] : issuers;
  return [...new Set(under)].sort().map((issuer) => identityLockKey(issuer, subject));
}

/**
 * Synchronous revocation for the API: mark, tear down, record. With `includeEnding`, a lease whose
 * teardown is already under way (single id only) is finished now too. Returns the outcome per lease.
 */
export async function revokeNow(
  deps: FinishDeps, filter: EndFilter, actor: Actor, reason: string, options: { includeEnding?: boolean; issuers?: string[] } = {},
): Promise<{ leases: EndingLease[]; errors: Map<string, string | null> }> {
  const endedBy = `${actor.issuer} ${actor.subject}`;
  const keys = identityLockKeys(filter, options.issuers ?? []);
  let leases = keys.length === 0
    ? await markRevoking(deps.pool, filter, endedBy, reason)
    : await withTransaction(deps.pool, async (client) => {
      // Issuance holds this lock from its first statement to COMMIT: taking it first means a
      // credential being issued to the subject right now is committed, and revoked, here.
      await client.query('SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest($1::text[]) AS k', [keys]);
      return markRevoking(client, filter, endedBy, reason);
    });
  if (leases.length === 0 && options.includeEnding && filter.id !== undefined) leases = await claimEnded(deps.pool, filter.id);
  const errors = new Map<string, string | null>();
  const takenOver: EndingLease[] = [];
  // Batches bound the locks one DROP ROLE takes (max_locks_per_transaction).
  for (let i = 0; i < leases.length; i += TEARDOWN_BATCH) {
    // A long bulk revoke can outlast the claim markRevoking took; renewed batch by batch, the
    // claim holds while we work, and what a reaper took over after a lapse is left to it.
    const slice = leases.slice(i, i + TEARDOWN_BATCH);
    const batch = await renewClaim(deps.pool, slice);
    takenOver.push(...slice.filter((l) => !batch.includes(l)));
    for (const [name, error] of await finishLeases(deps, batch, actor)) errors.set(name, error);
  }
  for (const [name, error] of await stillEnding(deps.pool, takenOver)) errors.set(name, error);
  return { leases, errors };
}

/**
 * Leases whose claim lapsed before this caller reached them (the connection that held it closed,
 * or the revocation outlasted it) and another claimer took over: done for the caller only once
 * they read expired or revoked. Until then they are reported unfinished, as possibly still able
 * to log in, since nothing here knows how far the other claimer got.
 */
async function stillEnding(db: Queryable, leases: EndingLease[]): Promise<Map<string, string | null>> {
  const outcome = new Map<string, string | null>();
  if (leases.length === 0) return outcome;
  const { rows } = await db.query<{ username: string; state: string }>(
    'SELECT username, state FROM broker.leases WHERE id = ANY($1::uuid[])', [leases.map((l) => l.id)]);
  for (const { username, state } of rows) {
    const ended = state === 'expired' || state === 'revoked';
    outcome.set(username, ended ? null : `${NOLOGIN_STEP}: not tried by this revocation: its claim lapsed and the reaper took the teardown over`);
  }
  return outcome;
}

/**
 * Extends the claim on leases this caller claimed (still ending, still claimed by the same
 * backend) by CLAIM_SECONDS from now; returns those, leaving out any another claimer has taken.
 */
export async function renewClaim(db: Queryable, leases: EndingLease[]): Promise<EndingLease[]> {
  if (leases.length === 0) return leases;
  const { rows } = await db.query<{ id: string }>(
    `UPDATE broker.leases l SET next_attempt_at = now() + make_interval(secs => $2), claimed_by_pid = pg_backend_pid()
      FROM unnest($1::uuid[], $3::int[]) AS mine(id, pid)
      WHERE l.id = mine.id AND l.state IN ('revoking', 'revoke_failed') AND l.claimed_by_pid = mine.pid
      RETURNING l.id`,
    [leases.map((l) => l.id), CLAIM_SECONDS, leases.map((l) => l.claimed_by_pid)],
  );
  const kept = new Set(rows.map((r) => r.id));
  return leases.filter((l) => kept.has(l.id));
}
