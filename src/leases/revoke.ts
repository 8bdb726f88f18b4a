import { setTimeout as sleep } from 'node:timers/promises';
import { recordAudit, type AuditEvent } from '../audit/repository.js';
import type { Queryable } from '../postgres/pool.js';
import { withTransaction } from '../postgres/pool.js';
import { claimEnded, markRevoking, renewClaim, type EndFilter, type EndingLease } from './claims.js';
import { finishLeases, roleToDrop, type Actor, type FinishDeps } from './finish.js';
import { identityLockKey } from './repository.js';
import { disableLogins, NOLOGIN_STEP } from './teardown.js';
import type { TeardownRun } from './teardown-steps.js';

/** Roles per teardown batch: thousands of DROP ROLEs in one transaction exhaust max_locks_per_transaction. */
export const TEARDOWN_BATCH = 200;

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

/** The event a revocation request leaves whatever it matched; each lease it ends gets its own too. */
export function revocationRequested(filter: EndFilter, actor: Actor, reason: string, matched: number): AuditEvent {
  const named = Object.fromEntries(Object.entries(filter).filter(([, v]) => v !== undefined));
  return {
    type: 'revocation.requested', issuer: actor.issuer, subject: actor.subject, lease_id: filter.id ?? null,
    policy: filter.policy ?? null, reason, request_id: actor.requestId ?? null, client_ip: actor.clientIp ?? null,
    detail: { filter: named, matched },
  };
}

/**
 * Synchronous revocation for the API: mark, tear down, record. With `includeEnding`, a lease whose
 * teardown is already under way (single id only) is finished now too. Returns the outcome per lease.
 */
export async function revokeNow(
  deps: FinishDeps, filter: EndFilter, actor: Actor, reason: string,
  options: { includeEnding?: boolean; issuers?: string[]; recordRequest?: boolean; endingWaitMs?: number } = {},
): Promise<{ leases: EndingLease[]; errors: Map<string, string | null>; outage: Map<string, unknown> }> {
  const endedBy = `${actor.issuer} ${actor.subject}`;
  const keys = identityLockKeys(filter, options.issuers ?? []);
  let leases = keys.length === 0 && !options.recordRequest
    ? await markRevoking(deps.pool, filter, endedBy, reason)
    : await withTransaction(deps.pool, async (client) => {
      // Issuance holds this lock from its first statement to COMMIT: taking it first means a
      // credential being issued to the subject right now is committed, and revoked, here.
      if (keys.length > 0) await client.query('SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(k, 0)) FROM unnest($1::text[]) AS k', [keys]);
      const marked = await markRevoking(client, filter, endedBy, reason);
      // Committed with the marking, so the request is on record even when it matched nothing, and
      // never for leases it did not mark.
      if (options.recordRequest) await recordAudit(client, revocationRequested(filter, actor, reason, marked.length));
      return marked;
    });
  if (leases.length === 0 && options.includeEnding && filter.id !== undefined) leases = await claimEnded(deps.pool, filter.id);
  const errors = new Map<string, string | null>();
  // Teardown failures that came from PostgreSQL going away: the caller answers them 503, not 500.
  const outage = new Map<string, unknown>();
  const takenOver: EndingLease[] = [];
  // Each batch's teardown ends its own logins first; the later batches' logins end now, so none
  // keeps working while an earlier batch waits on a lock. What fails here is tried, and recorded,
  // again in the batch's own teardown.
  const early: TeardownRun = { unreachable: null };
  for (let i = TEARDOWN_BATCH; i < leases.length; i += TEARDOWN_BATCH) {
    await disableLogins(deps, leases.slice(i, i + TEARDOWN_BATCH).map(roleToDrop), early);
  }
  // Batches bound the locks one DROP ROLE takes (max_locks_per_transaction).
  for (let i = 0; i < leases.length; i += TEARDOWN_BATCH) {
    // A long bulk revoke can outlast the claim markRevoking took; renewed batch by batch, the
    // claim holds while we work, and what a reaper took over after a lapse is left to it.
    const slice = leases.slice(i, i + TEARDOWN_BATCH);
    const batch = await renewClaim(deps.pool, slice);
    takenOver.push(...slice.filter((l) => !batch.includes(l)));
    const outcome = await finishLeases(deps, batch, actor);
    for (const [name, error] of outcome) errors.set(name, error);
    for (const [name, err] of outcome.outage) outage.set(name, err);
  }
  for (const [name, error] of await stillEnding(deps.pool, takenOver)) errors.set(name, error);
  if (filter.id === undefined) {
    for (const [name, error] of await endLoginsAlreadyEnding(deps, filter, actor, new Set(leases.map((l) => l.id)), options.endingWaitMs ?? ENDING_WAIT_MS)) {
      errors.set(name, error);
    }
  }
  return { leases, errors, outage };
}

/** How long a bulk revocation waits for teardowns others hold to disable their logins. */
export const ENDING_WAIT_MS = 10_000;

/**
 * The leases of a bulk revocation's filter that were already ending when it marked the rest (so it
 * did not mark them), and whose logins still work: a teardown under way elsewhere (a DELETE, the
 * reaper, a revocation on another replica) that has not reached NOLOGIN yet, or one that failed
 * before it. Answered 200 without them, "this subject's access has ended" would be false until the
 * other teardown gets there, or for as long as it keeps failing. Each one nobody holds is claimed
 * and finished here, as DELETE /leases/{id} finishes one; each another claimer holds is waited
 * for until its login is disabled, at most `waitMs` for all of them. Returns, by username, the
 * error for each whose login may still work afterwards (or whose teardown here failed).
 */
async function endLoginsAlreadyEnding(
  deps: FinishDeps, filter: EndFilter, actor: Actor, marked: Set<string>, waitMs: number,
): Promise<Map<string, string>> {
  const where: string[] = [];
  const params: unknown[] = [];
  for (const key of ['subject', 'issuer', 'policy'] as const) {
    if (filter[key] !== undefined) where.push(`l.${key} = $${params.push(filter[key])}`);
  }
  const errors = new Map<string, string>();
  if (where.length === 0) return errors;
  // Only roles that can log in now: one past VALID UNTIL (a lease the reaper ends on expiry) cannot.
  const { rows } = await deps.pool.query<{ id: string; username: string }>(
    `SELECT l.id, l.username FROM broker.leases l JOIN pg_roles r ON r.rolname = l.username
      WHERE l.state IN ('revoking', 'revoke_failed') AND r.rolcanlogin AND (r.rolvaliduntil IS NULL OR r.rolvaliduntil > now())
        AND ${where.join(' AND ')} ORDER BY l.id`,
    params,
  );
  const deadline = Date.now() + waitMs;
  for (const lease of rows.filter((r) => !marked.has(r.id))) {
    for (;;) {
      if (Date.now() > deadline) {
        errors.set(lease.username, `${NOLOGIN_STEP}: its teardown, which another claimer (the reaper, or another request) holds or which failed before, `
          + `has not disabled its login within ${waitMs} ms`);
        break;
      }
      const claimed = await claimEnded(deps.pool, lease.id);
      if (claimed.length > 0) {
        const error = (await finishLeases(deps, claimed, actor)).get(lease.username) ?? null;
        if (error !== null) errors.set(lease.username, error);
        break;
      }
      const { rows: [now] } = await deps.pool.query<{ can_login: boolean | null }>(
        `SELECT r.rolcanlogin AS can_login FROM broker.leases l LEFT JOIN pg_roles r ON r.rolname = l.username WHERE l.id = $1`, [lease.id]);
      if (!now?.can_login) break;
      await sleep(100);
    }
  }
  return errors;
}

/**
 * Leases whose claim lapsed before this caller reached them (the connection that held it closed,
 * or the revocation outlasted it) and another claimer took over: done for the caller only once
 * they read expired or revoked. Until then they are reported unfinished, and as still able to
 * log in unless their role already cannot.
 */
async function stillEnding(db: Queryable, leases: EndingLease[]): Promise<Map<string, string | null>> {
  const outcome = new Map<string, string | null>();
  if (leases.length === 0) return outcome;
  const { rows } = await db.query<{ username: string; state: string; can_login: boolean | null }>(
    `SELECT l.username, l.state, r.rolcanlogin AS can_login
       FROM broker.leases l LEFT JOIN pg_roles r ON r.rolname = l.username WHERE l.id = ANY($1::uuid[])`,
    [leases.map((l) => l.id)]);
  const why = 'not finished by this revocation: its claim lapsed and another claimer (the reaper, or another request) took the teardown over';
  for (const { username, state, can_login } of rows) {
    if (state === 'expired' || state === 'revoked') outcome.set(username, null);
    // Reported by whether the role can still log in now, as far as the catalogue says.
    else outcome.set(username, can_login === true ? `${NOLOGIN_STEP}: ${why}` : why);
  }
  return outcome;
}
