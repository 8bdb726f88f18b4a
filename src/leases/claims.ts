import { creatorOf } from '../postgres/creators.js';
import type { Queryable } from '../postgres/pool.js';

// Who holds a lease's teardown: claims taken by a revocation or the reaper, renewed while the
// work goes on, and lapsing when the claimer's time is up or its connection is gone.

/** A lease claimed for teardown is hidden from other claimers this long, then retried. */
export const CLAIM_SECONDS = 120;

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
export const ENDED_BY_EXPIRY_SQL = `(ended_by = '${BY_EXPIRY.endedBy}' AND end_reason = '${BY_EXPIRY.reason}')`;
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

/**
 * How many of the longest-due leases a reaper's claim chooses its batch from: enough that a batch
 * of a 10,000-lease backlog spread over 64 creators holds a few creators' leases, not all 64's.
 */
export const CLAIM_WINDOW_BATCHES = 10;

/**
 * Claims ended leases whose teardown is due: expired ones first become `revoking`.
 *
 * Teardown runs its statements once per creator role (teardown.ts), and issuance spreads roles
 * over 64 creators at random, so a batch of the `limit` longest-due leases paid for about 64 sets
 * of statements. The batch is chosen instead from the `limit × CLAIM_WINDOW_BATCHES` longest-due,
 * whole creator groups at a time, largest first: in a 10,000 backlog, claim and teardown together
 * then took 1.1–1.2 ms per role instead of 2.3–2.4 (without the reaper's pauses). The group of the longest-due lease always comes
 * first, so every lease gets its turn however many arrive behind it. The creator is read from the
 * catalogue here only to choose; teardown reads it again for itself.
 */
export async function claimDueLeases(db: Queryable, limit: number, creators: string[]): Promise<EndingLease[]> {
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
  // Chosen without locks, then locked with the claim's conditions checked again, skipping any
  // another claimer took meanwhile. Roles already gone, and every role on 15, share the NULL group.
  const { rows } = await db.query<EndingLease>(
    `WITH candidates AS MATERIALIZED (
       SELECT l.id, l.username, row_number() OVER (ORDER BY l.next_attempt_at NULLS FIRST, l.id) AS age
         FROM (SELECT id, username, next_attempt_at FROM broker.leases l
                WHERE state IN ('revoking', 'revoke_failed') AND ${CLAIM_LAPSED}
                ORDER BY next_attempt_at NULLS FIRST LIMIT $3) l),
     grouped AS (
       SELECT c.id, c.age, min(c.age) OVER w AS first, count(*) OVER w AS size
         FROM candidates c LEFT JOIN pg_roles r ON r.rolname = c.username
         CROSS JOIN LATERAL (SELECT ${creatorOf('r', '$4')} AS creator OFFSET 0) cr
       WINDOW w AS (PARTITION BY cr.creator)),
     chosen AS MATERIALIZED (
       SELECT id FROM grouped ORDER BY first = 1 DESC, size DESC, first, age LIMIT $1),
     -- Looked up by id, whatever the statistics: a plan that scans the due leases instead, with
     -- row estimates from before a backlog turned due, had rechecked every one against each chosen.
     due AS MATERIALIZED (
       SELECT l.id FROM broker.leases l
        WHERE l.id = ANY (ARRAY(SELECT id FROM chosen)) AND state IN ('revoking', 'revoke_failed') AND ${CLAIM_LAPSED}
        FOR UPDATE OF l SKIP LOCKED)
     UPDATE broker.leases l SET next_attempt_at = now() + make_interval(secs => $2), claimed_by_pid = pg_backend_pid()
       FROM due WHERE l.id = due.id
     RETURNING ${ENDING_COLUMNS}`,
    [limit, CLAIM_SECONDS, limit * CLAIM_WINDOW_BATCHES, creators],
  );
  if (rows.length > 0) return rows;
  // Nothing claimed can also mean every chosen lease was locked by another claimer at that
  // instant (a revocation's, or another reaper's around a handover), with others still due:
  // those are claimed by age instead, so the run does not end while work is left.
  return (await db.query<EndingLease>(
    `WITH due AS MATERIALIZED (
       SELECT l.id FROM broker.leases l WHERE state IN ('revoking', 'revoke_failed') AND ${CLAIM_LAPSED}
        ORDER BY next_attempt_at NULLS FIRST LIMIT $1 FOR UPDATE OF l SKIP LOCKED)
     UPDATE broker.leases l SET next_attempt_at = now() + make_interval(secs => $2), claimed_by_pid = pg_backend_pid()
       FROM due WHERE l.id = due.id
     RETURNING ${ENDING_COLUMNS}`,
    [limit, CLAIM_SECONDS],
  )).rows;
}

/**
 * Extends the claim on leases this caller claimed (still ending, still claimed by the same
 * backend) by CLAIM_SECONDS from now; returns those, leaving out any another claimer has taken.
 */
export async function renewClaim(db: Queryable, leases: EndingLease[]): Promise<EndingLease[]> {
  if (leases.length === 0) return leases;
  // Locked in id order first, as markRevoking locks: an UPDATE takes its rows in whatever order its
  // plan meets them, and against a revocation that locks in id order (one by policy whose snapshot
  // still saw these leases active, for one, which keeps the lock on a row its recheck then leaves out) that
  // crossed, and PostgreSQL ended one of them as a deadlock: a 500 for the bulk revocation.
  const { rows } = await db.query<{ id: string }>(
    `WITH locked AS MATERIALIZED (
       SELECT l.id FROM broker.leases l JOIN unnest($1::uuid[], $3::int[]) AS mine(id, pid) ON l.id = mine.id
        WHERE l.state IN ('revoking', 'revoke_failed') AND l.claimed_by_pid = mine.pid
        ORDER BY l.id FOR UPDATE OF l)
     UPDATE broker.leases l SET next_attempt_at = now() + make_interval(secs => $2), claimed_by_pid = pg_backend_pid()
       FROM locked WHERE l.id = locked.id
     RETURNING l.id`,
    [leases.map((l) => l.id), CLAIM_SECONDS, leases.map((l) => l.claimed_by_pid)],
  );
  const kept = new Set(rows.map((r) => r.id));
  return leases.filter((l) => kept.has(l.id));
}
