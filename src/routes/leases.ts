import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Errors } from '../errors.js';
import { renewLease } from '../leases/renew.js';
import { getLease, listLeases, type Lease } from '../leases/repository.js';
import { awaitEnded } from '../leases/claims.js';
import type { FinishDeps } from '../leases/finish.js';
import { revocationRequested, revokeNow } from '../leases/revoke.js';
import { recordAudit } from '../audit/repository.js';
import { loginStillEnabled } from '../leases/teardown.js';
import { problemResponses } from '../schemas/common.js';
import { BulkRevokeRequest, BulkRevokeResult, Lease as LeaseSchema, LeaseIdParams, LeasePage, LeaseQuery, RenewRequest, RevokeQuery } from '../schemas/lease.js';
import { requestContext } from './context.js';
import { beforeBody, noBodyMeansNoOptions } from '../validation.js';

/** Owners see their own leases; admins see all; everyone else gets the same 404 as for a missing id. */
export function visibleTo(request: FastifyRequest, lease: Lease | null): Lease {
  const who = request.identity;
  if (!lease || !who || !(who.admin || (lease.issuer === who.issuer && lease.subject === who.subject))) throw new Errors.LeaseNotFound();
  return lease;
}

// Longer than one teardown normally takes, sessions' exit wait included.
const HANDOVER_WAIT_MS = 10_000;

/**
 * REVOKE_INCOMPLETE, saying what the caller most needs to know: whether the ended credentials can
 * still log in (their teardown stopped before NOLOGIN) until the reaper's next try.
 */
function revokeIncomplete(errors: Array<string | null>, retrySeconds: number, bulk = false): Error {
  const enabled = errors.filter(loginStillEnabled).length;
  if (!bulk) {
    return new Errors.RevokeIncomplete(enabled > 0
      ? `The lease is ended, but its login could not be disabled yet; the reaper keeps trying (every ${retrySeconds} s at first)`
      : 'The lease is ended and its login disabled, but teardown did not finish; the reaper retries it');
  }
  const unfinished = `${errors.length} ${errors.length === 1 ? 'teardown' : 'teardowns'} did not finish`;
  return new Errors.RevokeIncomplete(enabled > 0
    ? `The leases are ended, but ${enabled} of their logins could not be disabled yet (${unfinished}); the reaper keeps trying (every ${retrySeconds} s at first)`
    : `The leases are ended and their logins disabled, but ${unfinished}; the reaper retries them`);
}

export function invalidCursor(err: unknown): never {
  if ((err as Error).message === 'INVALID_CURSOR') throw new Errors.BadRequest('cursor is not valid');
  throw err;
}

export default async function leaseRoutes(fastify: FastifyInstance): Promise<void> {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>();

  app.get(
    '/leases',
    {
      schema: {
        summary: 'List leases: your own, or everyone\'s for an admin',
        tags: ['leases'],
        querystring: LeaseQuery,
        response: { 200: LeasePage, ...problemResponses(400, 401, 429, 503) },
      },
      preParsing: beforeBody(app.authenticate),
    },
    async (request) => {
      const who = request.identity!;
      return listLeases(app.db, request.query, who.admin ? undefined : { issuer: who.issuer, subject: who.subject }).catch(invalidCursor);
    },
  );

  app.get(
    '/leases/:id',
    {
      schema: {
        summary: 'One lease (owner or admin)',
        tags: ['leases'],
        params: LeaseIdParams,
        response: { 200: LeaseSchema, ...problemResponses(400, 401, 404, 429, 503) },
      },
      preParsing: beforeBody(app.authenticate),
    },
    async (request) => visibleTo(request, await getLease(app.db, request.params.id)),
  );

  const finishDeps = (): FinishDeps => ({
    pool: app.db,
    databaseUrl: app.config.databaseUrl,
    managedRole: app.config.managedRole,
    timeouts: app.config,
    log: app.log,
    metrics: app.metrics,
    retryBaseSeconds: app.config.reaperIntervalSeconds,
  });

  app.delete(
    '/leases/:id',
    {
      schema: {
        summary: 'Revoke now: sessions are killed and the role is dropped before this answers (owner or admin)',
        tags: ['leases'],
        params: LeaseIdParams,
        querystring: RevokeQuery,
        response: { 200: LeaseSchema, ...problemResponses(400, 401, 404, 429, 500, 503) },
      },
      preParsing: beforeBody(app.authenticate),
    },
    async (request) => {
      const lease = visibleTo(request, await getLease(app.db, request.params.id));
      const ctx = requestContext(request);
      const actor = { issuer: ctx.identity.issuer, subject: ctx.identity.subject, requestId: ctx.requestId, clientIp: ctx.clientIp };
      const reason = request.query.reason ?? 'revoked by request';
      const { leases, errors, outage } = await revokeNow(finishDeps(), { id: lease.id }, actor, reason, { includeEnding: true });
      if (leases.length === 0) {
        // Nothing for this request to end, so no lease.revoked of its own: the request is still
        // on record, as every request that gets past its token is.
        await recordAudit(app.db, revocationRequested({ id: lease.id }, actor, reason, 0));
        // A reaper already tearing it down gets a moment to finish, so 200 still means "gone".
        await awaitEnded(app.db, lease.id, HANDOVER_WAIT_MS);
      }
      // Judge by the lease, not by this attempt: someone else may have finished it meanwhile.
      const now = visibleTo(request, await getLease(app.db, lease.id));
      if (now.state === 'revoked' || now.state === 'expired') return now;
      if (leases.length === 0) {
        // How far the other teardown got is not known here: claim nothing about the login.
        throw new Errors.RevokeIncomplete('The lease is ended; the reaper is tearing it down and has not finished yet');
      }
      const error = errors.get(lease.username) ?? now.last_error;
      // PostgreSQL went away mid-teardown and is back: the failed attempt is recorded for the
      // reaper, and the caller gets a 503 with Retry-After, never a 500, saying how far it got.
      if (outage.has(lease.username)) {
        request.log.warn({ lease_id: lease.id, error }, 'PostgreSQL went away during a revocation');
        throw new Errors.DatabaseUnavailableDuring(loginStillEnabled(error)
          ? 'PostgreSQL went away during the teardown: the lease is ended, but its login could not be disabled yet; retry shortly, or the reaper finishes it'
          : 'PostgreSQL went away during the teardown: the lease is ended and its login disabled; retry shortly, or the reaper finishes it');
      }
      throw revokeIncomplete([error], app.config.reaperIntervalSeconds);
    },
  );

  app.post(
    '/leases/revoke',
    {
      schema: {
        summary: 'Revoke every active lease of a subject, issuer or policy at once (admin)',
        tags: ['leases'],
        body: BulkRevokeRequest,
        response: { 200: BulkRevokeResult, ...problemResponses(400, 401, 403, 429, 500, 503) },
      },
      preParsing: beforeBody(app.requireAdmin),
    },
    async (request) => {
      const { subject, issuer, policy, reason } = request.body;
      if (subject === undefined && issuer === undefined && policy === undefined) {
        throw new Errors.BadRequest('name at least one of subject, issuer or policy');
      }
      const ctx = requestContext(request);
      const actor = { issuer: ctx.identity.issuer, subject: ctx.identity.subject, requestId: ctx.requestId, clientIp: ctx.clientIp };
      const { leases, errors } = await revokeNow(finishDeps(), { subject, issuer, policy }, actor, reason ?? 'bulk revocation', {
        issuers: app.config.issuers.map((i) => i.issuer), recordRequest: true,
      });
      const failed = [...errors.values()].filter((e) => e !== null);
      // No 503 here, even after an outage: a retry would find these leases no longer active and
      // answer {revoked: 0}, and the caller would lose which leases were ended and how far.
      if (failed.length > 0) throw revokeIncomplete(failed, app.config.reaperIntervalSeconds, true);
      return { revoked: leases.length, lease_ids: leases.map((l) => l.id) };
    },
  );

  app.post(
    '/leases/:id/renew',
    {
      schema: {
        summary: 'Renew an active lease: it now ends ttl seconds from now (default_ttl without one; earlier than before if ttl is short), never past max_expires_at; its policy must still admit the token (owner)',
        tags: ['leases'],
        params: LeaseIdParams,
        body: RenewRequest,
        response: { 200: LeaseSchema, ...problemResponses(400, 401, 403, 404, 409, 429, 503) },
      },
      preParsing: beforeBody(app.authenticate),
      preValidation: noBodyMeansNoOptions,
    },
    async (request) => {
      const ctx = requestContext(request);
      return renewLease(app.config.managedRole, request.log, app.db, request.params.id, ctx.identity, request.body?.ttl, ctx, await app.roleCreators(), app.grantRoles);
    },
  );
}
