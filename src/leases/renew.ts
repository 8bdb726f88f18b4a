import type { FastifyBaseLogger } from 'fastify';
import type pg from 'pg';
import { recordAudit } from '../audit/repository.js';
import type { Identity } from '../auth/verify.js';
import { Errors } from '../errors.js';
import { evaluatePolicies, type PolicyEvaluation } from '../policy/evaluate.js';
import { getPolicy } from '../policy/repository.js';
import { creatorOf } from '../postgres/creators.js';
import { repairCreators } from '../postgres/migrate.js';
import type { GrantRoleGuard } from '../postgres/grant-guard.js';
import { withTransaction } from '../postgres/pool.js';
import { setValidUntil } from '../postgres/roles.js';
import { isoRow } from '../postgres/rows.js';
import { SERVER_SECOND_SQL } from './expiry.js';
import { identityLockKey, LEASE_COLUMNS, type Lease } from './repository.js';

function whyNotAdmitted(verdict: PolicyEvaluation): string | null {
  if (verdict.admitted) return null;
  if (verdict.reason) return verdict.reason;
  return verdict.failed_claims.map((f) => `claim ${f.claim} does not match`).join(', ');
}

/**
 * How far a renewal may carry a lease. The bound is set at issuance (issue time + the policy's
 * max_ttl); a max_ttl lowered since then moves it earlier by as many seconds, counted from the
 * stored bound rather than from created_at (leases issued before expiries were taken on
 * PostgreSQL's clock have bounds from the broker host's). It never falls before the current expiry: a renewal does not end a lease early because the
 * policy changed. Leases issued before max_ttl was recorded keep their bound.
 */
export function renewalBound(maxExpiresAt: Date, expiresAt: Date, issuedMaxTtl: number | null, policyMaxTtl: number): Date {
  if (issuedMaxTtl === null || policyMaxTtl >= issuedMaxTtl) return maxExpiresAt;
  const lowered = maxExpiresAt.getTime() - (issuedMaxTtl - policyMaxTtl) * 1000;
  return new Date(Math.min(maxExpiresAt.getTime(), Math.max(lowered, expiresAt.getTime())));
}

/**
 * Moves an active lease's expiry to now + ttl, never past max_expires_at, in one transaction
 * with VALID UNTIL so PostgreSQL and the lease row never disagree.
 */
export async function renewLease(managedRole: string, log: FastifyBaseLogger, ...args: Parameters<typeof renewOnce>): Promise<Lease & { capped: boolean }> {
  const [pool, , , , , creators] = args;
  try {
    return await renewOnce(...args);
  } catch (err) {
    // 42883: a creator's function was dropped since start-up. Made again as at start-up, and the
    // renewal (rolled back whole) tried once more.
    if (creators.length === 0 || (err as { code?: string }).code !== '42883') throw err;
    if (!(await repairCreators(pool, managedRole, log))) throw err;
    return renewOnce(...args);
  }
}

async function renewOnce(
  pool: pg.Pool,
  id: string,
  owner: Identity,
  ttlSeconds: number | undefined,
  ctx: { requestId: string; clientIp: string | null },
  creators: string[],
  grantRoles: GrantRoleGuard,
): Promise<Lease & { capped: boolean }> {
  return withTransaction(pool, async (client) => {
    await lockIdentity(client, id, owner);
    const row = await lockLease(client, id, owner);
    if (row.state !== 'active' || row.lapsed) throw new Errors.LeaseEnded(`Lease ${id} has ended (${row.lapsed && row.state === 'active' ? 'expired' : row.state}) and cannot be renewed`);
    // Issuance refuses a group that has become unsafe; extending a login that holds it would
    // hand out the same access a little longer.
    const unsafeGroup = (problem: string) => new Errors.UnsafeGrantRole(
      `Lease ${id} cannot be renewed until an admin fixes its group (${problem}); it still ends at ${(row.expires_at as Date).toISOString()}`);
    const unsafe = await grantRoles.problem(client, row.grant_role);
    if (unsafe) throw unsafeGroup(unsafe);
    // A renewal is a new grant of time, so the policy must still admit the token presented now:
    // deleting or disabling a policy, or tightening its claims, stops renewals at once (leases
    // already issued still run to their expiry; revoke them to end them sooner).
    const policy = await getPolicy(client, row.policy);
    const refusal = policy ? whyNotAdmitted(evaluatePolicies([policy], owner.claims)[0]) : 'it no longer exists';
    const endsAt = (row.expires_at as Date).toISOString();
    if (!policy || refusal) {
      throw new Errors.NoPolicy(`Lease ${id} cannot be renewed: policy ${row.policy} no longer admits this token (${refusal}); it still ends at ${endsAt}`);
    }
    // Nor is more time given to access the policy no longer hands out: a new credential carries
    // what it grants now.
    if (policy.grant_role !== row.grant_role || policy.database !== row.database) {
      throw new Errors.NoPolicy(`Lease ${id} cannot be renewed: policy ${row.policy} now grants ${policy.grant_role} on ${policy.database}, `
        + `and this lease holds ${row.grant_role} on ${row.database}; request a new credential (this one still ends at ${endsAt})`);
    }
    const ttl = ttlSeconds ?? policy.default_ttl;
    // From the lease row's read, on PostgreSQL's clock, as issuance takes it (see expiry.ts).
    const wanted = ((row.server_second as number) + ttl) * 1000;
    const max = renewalBound(row.max_expires_at as Date, row.expires_at as Date, row.max_ttl as number | null, policy.max_ttl);
    const capped = wanted > max.getTime();
    const expiresAt = new Date(Math.min(wanted, max.getTime()));
    const lowered = max.getTime() < (row.max_expires_at as Date).getTime();
    // The guard's answer may predate an operator's DROP ROLE of the group (it trusts it for
    // BROKER_GRANT_RECHECK_INTERVAL); whether the group still exists rides along with this query
    // for free, and a missing one gets the guard's own refusal at once, as issuance does.
    const { rows: [role] } = await client.query<{ creator: string | null; group_exists: boolean; connection_limit: number }>(
      `SELECT ${creatorOf('r', '$2')} AS creator, EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname = $3) AS group_exists,
              r.rolconnlimit AS connection_limit
         FROM pg_roles r WHERE r.rolname = $1`, [row.username, creators, row.grant_role]);
    if (role && !role.group_exists) {
      grantRoles.forget(row.grant_role);
      const problem = await grantRoles.problem(client, row.grant_role);
      if (problem) throw unsafeGroup(problem);
    }
    // Likewise a connection_limit lowered since issuance (-1 is none): the role allows more
    // sessions than the policy now hands out. A raised one renews as before.
    if (role && policy.connection_limit !== -1 && (role.connection_limit === -1 || role.connection_limit > policy.connection_limit)) {
      const held = role.connection_limit === -1 ? 'has no limit' : `allows ${role.connection_limit}`;
      throw new Errors.NoPolicy(`Lease ${id} cannot be renewed: policy ${row.policy} now allows ${policy.connection_limit} connections per credential, `
        + `and this lease's role ${held}; request a new credential (this one still ends at ${endsAt})`);
    }
    await extendRole(client, id, row.username, expiresAt, role?.creator ?? null, endsAt);
    // A lowered bound is kept with the policy's max_ttl it came from, so the next renewal lowers
    // it only by what max_ttl drops after this one. The expiry is checked again on the clock as it
    // reads now: now() is when this transaction began, and a wait since then may have outlasted
    // the lease, which the quota and the reaper would already treat as over.
    const updated = await client.query(
      `UPDATE broker.leases SET expires_at = $2, max_expires_at = $3, max_ttl = CASE WHEN $4 THEN $5::int ELSE max_ttl END
        WHERE id = $1 AND expires_at > pg_catalog.clock_timestamp() RETURNING ${LEASE_COLUMNS}`,
      [id, expiresAt, max, lowered, policy.max_ttl],
    );
    if (updated.rows.length === 0) throw new Errors.LeaseEnded(`Lease ${id} expired while this renewal waited, and cannot be renewed`);
    await recordAudit(client, {
      type: 'lease.renewed', issuer: owner.issuer, subject: owner.subject, lease_id: id, policy: row.policy, username: row.username,
      request_id: ctx.requestId, client_ip: ctx.clientIp, detail: { ttl, expires_at: expiresAt.toISOString(), capped, ...(lowered ? { max_expires_at: max.toISOString(), max_ttl: policy.max_ttl } : {}) },
    });
    return { ...isoRow<Lease>(updated.rows[0]), capped };
  });
}

/**
 * Issuance's per-identity lock, held to COMMIT, taken before the lease row as a revocation by
 * subject takes them. The renewal checks the lease's expiry before its COMMIT, and a lease past its
 * expiry no longer counts against max_active_leases: without the lock, a renewal that checked just
 * before the expiry and committed just after it let an issuance in between count the lease as over
 * and issue one more, and both then lived on past the quota. Issuance holds the lock for a few
 * round trips; the wait is bounded like the role row's (ROLE_ROW_WAIT), so renewals queued behind a
 * burst of the identity's requests do not each hold a pooled connection for the lock timeout.
 */
async function lockIdentity(client: pg.PoolClient, id: string, owner: Identity): Promise<void> {
  try {
    // One round trip: the bound (for the rest of the transaction: ROLE_ROW_WAIT, or the configured
    // lock_timeout if shorter) is set in the materialized CTE, which is read before the lock is asked for.
    await client.query(
      `WITH bound AS MATERIALIZED (
         SELECT pg_catalog.set_config('lock_timeout', CASE WHEN s::interval = '0' OR s::interval > $1::text::interval THEN $1::text ELSE s END, true)
           FROM pg_catalog.current_setting('lock_timeout') AS t(s))
       SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended($2, 0)) FROM bound`,
      [ROLE_ROW_WAIT, identityLockKey(owner.issuer, owner.subject)]);
  } catch (err) {
    if ((err as { code?: string }).code !== '55P03') throw err;
    throw new Errors.DatabaseBusy(`Lease ${id} was not renewed: other requests of the same identity (issuance, renewal, revocation) held it for over ${ROLE_ROW_WAIT}; retry shortly`);
  }
}

/**
 * The lease row, locked for this renewal, if `owner` holds it. NOWAIT: a renewal never queues
 * behind another renewal or a revocation of the same lease. Queued renewals each held a pooled
 * connection, and their queue could keep a revocation from the row past its lock timeout.
 */
async function lockLease(client: pg.PoolClient, id: string, owner: Identity): Promise<Record<string, any>> {
  // The owner is part of the condition, so someone else's renewal of this id locks nothing and
  // cannot make the owner's own renewal find the row busy.
  const sql = `SELECT ${LEASE_COLUMNS}, max_ttl, expires_at <= now() AS lapsed, ${SERVER_SECOND_SQL} AS server_second
                 FROM broker.leases WHERE id = $1 AND issuer = $2 AND subject = $3`;
  const params = [id, owner.issuer, owner.subject];
  try {
    const { rows: [row] } = await client.query(`${sql} FOR UPDATE NOWAIT`, params);
    if (!row) throw new Errors.LeaseNotFound();
    return row;
  } catch (err) {
    if ((err as { code?: string }).code !== '55P03') throw err;
  }
  // Locked by another request on the owner's lease (a renewal, a revocation, the reaper). Checked
  // on this connection, after ending the transaction the refused lock aborted: another pooled
  // connection may not be free, least of all while renewals crowd in.
  await client.query('ROLLBACK');
  if ((await client.query(sql, params)).rows.length === 0) throw new Errors.LeaseNotFound();
  throw new Errors.DatabaseBusy(`Lease ${id} is being renewed or revoked by another request right now; retry shortly`);
}

// Only the broker changes an issued role, and only under its lease's row lock; a wait for the
// role's row is someone else holding it, typically one of the role's own sessions in an open
// transaction that altered the role. Waiting BROKER_LOCK_TIMEOUT for it would hold the lease row,
// and a pooled connection, all that time.
const ROLE_ROW_WAIT = '1s';

async function extendRole(client: pg.PoolClient, id: string, username: string, expiresAt: Date, creator: string | null, endsAt: string): Promise<void> {
  // lock_timeout is already bounded to ROLE_ROW_WAIT for this transaction (lockIdentity).
  try {
    await setValidUntil(client, username, expiresAt, creator);
  } catch (err) {
    // XX000 "tuple concurrently updated": the holder committed its change while this waited.
    const { code, message } = err as { code?: string; message?: string };
    if (code !== '55P03' && !(code === 'XX000' && /concurrently updated/.test(message ?? ''))) throw err;
    throw new Errors.DatabaseBusy(`Lease ${id} was not renewed: another session holds its role's catalogue row (one of the role's own `
      + `sessions, say, in an open transaction that altered the role); it still ends at ${endsAt}`);
  }
}
