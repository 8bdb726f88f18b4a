import { randomUUID } from 'node:crypto';
import type { Static } from '@sinclair/typebox';
import type pg from 'pg';
import type { FastifyBaseLogger } from 'fastify';
import { recordAudit, type AuditEvent } from '../audit/repository.js';
import type { Identity } from '../auth/verify.js';
import type { Config } from '../config.js';
import { Errors } from '../errors.js';
import { evaluatePolicies, type PolicyEvaluation } from '../policy/evaluate.js';
import { readClaim } from '../policy/match.js';
import type { PolicyCache } from '../policy/cache.js';
import { enabledPoliciesSql, policySnapshot, type Policy } from '../policy/repository.js';
import { grantToCreators, pickCreator } from '../postgres/creators.js';
import type { GrantRoleGuard } from '../postgres/grant-guard.js';
import { repairCreators } from '../postgres/migrate.js';
import { isConnectionError, withBatchedTransaction, type Queryable } from '../postgres/pool.js';
import { roleNameFor } from '../postgres/role-name.js';
import { createRoleSql } from '../postgres/roles.js';
import { generatePassword, scramVerifierAsync } from '../postgres/scram.js';
import type { CredentialBody, CredentialRequest } from '../schemas/lease.js';
import { insertLeaseWithinQuota, lockIdentitySql } from './repository.js';

export interface IssueDeps {
  pool: pg.Pool;
  config: Config;
  /**
   * Creator roles to create issued roles as (PostgreSQL 16+), [] to create them as the broker.
   * Resolved inside the issuance, so a failure to set them up is audited like any other.
   */
  creators: () => Promise<string[]>;
  grantRoles: GrantRoleGuard;
  /** The policies issuance decides with, kept between requests (see PolicyCache). */
  policies: PolicyCache;
  log: FastifyBaseLogger;
  /** Receives what to log about an issued credential (the route puts it in the request's log line). */
  noteIssued: (fields: Record<string, unknown>) => void;
}

export interface RequestContext {
  identity: Identity;
  requestId: string;
  clientIp: string | null;
  userAgent: string | null;
}

/** The body of POST /credentials, as its route schema defines it. */
export type IssueRequest = Static<typeof CredentialRequest>;

interface Decision {
  chosen: Policy;
  ttl: number;
}

/** A decision written: its expiries are PostgreSQL's, as the INSERT took them (see expiry.ts). */
interface Issued extends Decision {
  expiresAt: Date;
  maxExpiresAt: Date;
}

export type DenialReason = 'no_policy' | 'ambiguous_policy' | 'ttl_too_long' | 'quota_exceeded' | 'grant_role_unsafe' | 'database_missing';

export class IssueDenied extends Error {
  /** `warn`: what to log if this refusal is the answer (not one re-decided on fresher policies). */
  constructor(readonly reason: DenialReason, readonly policy: string | null, readonly error: Error, readonly warn?: () => void) {
    super(error.message);
  }
}

/** Chooses the policy: the named one if it admits the token, else the single admitting one. */
export function choosePolicy(evaluations: PolicyEvaluation[], named?: string): Policy {
  if (named !== undefined) {
    const hit = evaluations.find((e) => e.policy.name === named && e.admitted);
    // Same answer whether the policy is missing or refuses: names are not enumerable here. The
    // name is safe to echo: the body schema admits only what PolicyName's pattern allows.
    if (!hit) throw new IssueDenied('no_policy', named, new Errors.NoPolicy(`Policy ${named} does not admit this token; POST /policies/evaluate explains why`));
    return hit.policy;
  }
  const admitted = evaluations.filter((e) => e.admitted);
  if (admitted.length === 0) {
    throw new IssueDenied('no_policy', null, new Errors.NoPolicy('No policy admits this token; POST /policies/evaluate explains why'));
  }
  if (admitted.length > 1) {
    const names = admitted.map((e) => e.policy.name).join(', ');
    throw new IssueDenied('ambiguous_policy', null, new Errors.AmbiguousPolicy(`Several policies admit this token (${names}); name one in the request body`));
  }
  return admitted[0].policy;
}

function matchedClaims(policy: Policy, claims: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.keys(policy.claims).map((key) => [key, readClaim(claims, key) ?? null]));
}

function unsafeGrantRole(deps: IssueDeps, policy: Policy, problem: string): IssueDenied {
  return new IssueDenied('grant_role_unsafe', policy.name, new Errors.UnsafeGrantRole(
    `Policy ${policy.name} cannot issue credentials until an admin fixes it: ${problem}`),
  () => deps.log.warn({ policy: policy.name, grant_role: policy.grant_role, problem }, 'policy grant_role is no longer safe to hand out; issuance refused'));
}

/** A login that could connect nowhere is no credential: refused, as an unsafe group is. */
function missingDatabase(deps: IssueDeps, policy: Policy, problem: string): IssueDenied {
  return new IssueDenied('database_missing', policy.name, new Errors.PolicyDatabaseMissing(
    `Policy ${policy.name} cannot issue credentials until an admin fixes it: ${problem}`),
  () => deps.log.warn({ policy: policy.name, database: policy.database, problem }, 'policy database is gone; issuance refused'));
}

/**
 * 42704 from CREATE ROLE … IN ROLE: most likely an operator dropped the group after the guard last
 * looked (it trusts its answer for BROKER_GRANT_RECHECK_INTERVAL). The remembered answer is
 * dropped and the group checked afresh, so this request gets the refusal the guard would give
 * (403, not 500) and the next ones are refused before anything is written. Any other error, or a
 * group that turns out fine, is returned as it was.
 */
async function groupGoneSince(deps: IssueDeps, policy: Policy | undefined, err: unknown): Promise<unknown> {
  if (!policy || (err as { code?: string }).code !== '42704') return err;
  deps.grantRoles.forget(policy.grant_role);
  const problem = await deps.grantRoles.problem(deps.pool, policy.grant_role);
  return problem ? unsafeGrantRole(deps, policy, problem) : err;
}

/**
 * The whole of POST /credentials after authentication. A credential is returned only after
 * the transaction holding both the lease row and the role has committed.
 */
export async function issueCredential(deps: IssueDeps, ctx: RequestContext, body: IssueRequest): Promise<CredentialBody> {
  const { identity } = ctx;
  const base: Omit<AuditEvent, 'type'> = { issuer: identity.issuer, subject: identity.subject, request_id: ctx.requestId, client_ip: ctx.clientIp };
  // Set inside the transaction; read by the retry and by the audit of a failure.
  const picked: { policy?: Policy } = {};
  try {
    const username = roleNameFor(identity.subject);
    const password = generatePassword();
    // PBKDF2 for the verifier runs on libuv's pool while the transaction takes its lock, reads the
    // policies and inserts the lease; only CREATE ROLE needs it. (Awaited below; the catch only
    // keeps an early failure or denial from leaving it as an unhandled rejection.)
    const verifier = scramVerifierAsync(password, deps.config.scramIterations);
    verifier.catch(() => undefined);
    const leaseId = randomUUID();
    let issued: Issued | null = null;
    /** Everything decided before anything is written, from one set of policies; throws IssueDenied. */
    const decide = async (client: Queryable, policies: Policy[]): Promise<Decision> => {
      const chosen = choosePolicy(evaluatePolicies(policies, identity.claims), body.policy);
      picked.policy = chosen;
      const ttl = body.ttl ?? chosen.default_ttl;
      if (ttl > chosen.max_ttl) {
        throw new IssueDenied('ttl_too_long', chosen.name, new Errors.BadRequest(`ttl ${ttl} exceeds the policy max_ttl of ${chosen.max_ttl} seconds`));
      }
      const unsafe = await deps.grantRoles.problem(client, chosen.grant_role);
      if (unsafe) throw unsafeGrantRole(deps, chosen, unsafe);
      const noDatabase = await deps.grantRoles.databaseProblem(client, chosen.database);
      if (noDatabase) throw missingDatabase(deps, chosen, noDatabase);
      return { chosen, ttl };
    };
    // Three round trips: BEGIN with the identity lock (and the issuer's policies, unless kept from
    // an earlier request), the lease + audit INSERT, then CREATE ROLE and its comment with COMMIT.
    // The INSERT takes the lease only while the policies are as they were read (PolicyCache), in
    // a statement that starts after the lock, so a request that waited on it sees what was
    // committed meanwhile. It also takes the expiries on PostgreSQL's clock and hands them back for
    // the VALID UNTIL literal, which CREATE ROLE could not have computed itself (it takes no
    // expression), so the host's clock is never asked and no round trip is added.
    const lock = lockIdentitySql(identity.issuer, identity.subject);
    const attempt = (creator: string | null) => {
      const kept = deps.policies.get(identity.issuer);
      const begin = kept ? lock : `${lock};\n${enabledPoliciesSql(identity.issuer)}`;
      return withBatchedTransaction(deps.pool, begin, async (client, commit, begun) => {
        // `check`: the token the policies were read under, for the INSERT to compare, whether kept
        // from an earlier request or read in this transaction after the lock: under READ COMMITTED
        // the INSERT has a snapshot of its own, and a change committed between the read and the
        // INSERT (a round trip, or a wait on a lock) must send it back to read them again too.
        // `fresh`: read in this transaction, so a refusal stands without another read.
        const readHere = (rows: Record<string, unknown>[]) => {
          const read = policySnapshot(rows);
          deps.policies.store(identity.issuer, read.version, read.policies);
          return { policies: read.policies, check: read.version, fresh: true };
        };
        let current: { policies: Policy[]; check: string; fresh: boolean } = kept ? { policies: kept.policies, check: kept.version, fresh: false } : readHere(begun.rows);
        const readAgain = async () => {
          current = readHere((await client.query(enabledPoliciesSql(identity.issuer))).rows);
        };
        for (;;) {
          let decision: Decision;
          try {
            decision = await decide(client, current.policies);
          } catch (err) {
            // A refusal is never given on kept policies: a policy created or widened a moment ago
            // must admit at once, so the table is read again first.
            if (!(err instanceof IssueDenied) || current.fresh) throw err;
            await readAgain();
            continue;
          }
          const { chosen, ttl } = decision;
          const result = await insertLeaseWithinQuota(
            client,
            {
              id: leaseId, username, policy: chosen.name, grant_role: chosen.grant_role, database: chosen.database,
              issuer: identity.issuer, subject: identity.subject, claims: matchedClaims(chosen, identity.claims),
              ttl_seconds: ttl, max_ttl: chosen.max_ttl,
              client_ip: ctx.clientIp, user_agent: ctx.userAgent, request_id: ctx.requestId,
            },
            chosen.max_active_leases,
            { ...base, type: 'credential.issued', lease_id: leaseId, policy: chosen.name, username, detail: { ttl, grant_role: chosen.grant_role } },
            current.check,
          );
          if (result.policyVersion !== current.check) {
            // The policies changed since they were read: decide once more, on them as they are now.
            await readAgain();
            continue;
          }
          if (!result.inserted) {
            // Retry-After: when the soonest of those leases expires, rather than the 5 s every other
            // 429 and 503 says; a client that honours it then finds a place free, unless it is renewed.
            const quota = Object.assign(new Errors.QuotaExceeded(`This identity already holds ${chosen.max_active_leases} active leases under policy ${chosen.name}, its max_active_leases (${chosen.max_active_leases}); one must end (expiry, or DELETE /leases/{id}) before another is issued`),
              { retryAfterSeconds: result.freesInSeconds === null ? undefined : Math.max(1, result.freesInSeconds) });
            throw new IssueDenied('quota_exceeded', chosen.name, quota);
          }
          const written = { ...decision, expiresAt: result.expiresAt!, maxExpiresAt: result.maxExpiresAt! };
          await commit(createRoleSql({
            username, verifier: await verifier, validUntil: written.expiresAt, connectionLimit: chosen.connection_limit,
            grantRole: chosen.grant_role, managedRole: deps.config.managedRole, creator,
            assumeRole: chosen.assume_role, comment: `lease ${leaseId} sub ${identity.subject}`,
          }));
          issued = written;
          return;
        }
      });
    };
    const creators = await deps.creators();
    const creator = pickCreator(creators);
    try {
      try {
        await attempt(creator);
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (creator && code === '42883') {
          // A creator's function was dropped since start-up: made again as at start-up, then once more.
          if (!(await repairCreators(deps.pool, deps.config.managedRole, deps.log))) throw err;
          await attempt(creator);
        } else if (creator && picked.policy && code === '42501') {
          // The creators lack ADMIN OPTION on a group the broker was granted after they were set
          // up. Hand it on (a no-op when the broker lacks it too) and try once more.
          await grantToCreators(deps.pool, creators, [picked.policy.grant_role, deps.config.managedRole]);
          await attempt(creator);
        } else {
          throw err;
        }
      }
    } catch (err) {
      throw await groupGoneSince(deps, picked.policy, err);
    }
    const { chosen, ttl, expiresAt, maxExpiresAt } = issued!;
    deps.noteIssued({ lease_id: leaseId, username, policy: chosen.name, subject: identity.subject, ttl });
    const { publicPgHost: host, publicPgPort: port } = deps.config;
    return {
      lease_id: leaseId,
      username,
      password,
      expires_at: expiresAt.toISOString(),
      max_expires_at: maxExpiresAt.toISOString(),
      policy: chosen.name,
      grant_role: chosen.grant_role,
      host,
      port,
      database: chosen.database,
      uri: `postgresql://${username}:${encodeURIComponent(password)}@${host.includes(':') ? `[${host}]` : host}:${port}/${encodeURIComponent(chosen.database)}`,
    };
  } catch (err) {
    const denied = err instanceof IssueDenied;
    if (denied) err.warn?.();
    // With PostgreSQL unreachable or silent the event cannot be written either, and trying would
    // hold the answer for another timeout; the 503's log line is the record (problem.ts).
    if (isConnectionError(err)) throw err;
    await recordAudit(deps.pool, {
      ...base,
      type: denied ? 'credential.denied' : 'credential.failed',
      policy: denied ? err.policy : picked.policy?.name ?? null,
      reason: denied ? err.reason : ((err as { code?: string }).code ?? 'error'),
    }).catch((auditErr: Error) => deps.log.warn({ err: { message: auditErr.message } }, 'could not record audit event'));
    // The catalogue error goes to the client; the denial rides along for metrics.
    if (denied) throw Object.assign(err.error, { denial: err });
    throw err;
  }
}
