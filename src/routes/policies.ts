import type { FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import { recordAudit } from '../audit/repository.js';
import { Errors } from '../errors.js';
import { evaluatePolicies } from '../policy/evaluate.js';
import { policyShapeProblem } from '../policy/shape.js';
import { deletePolicy, getPolicy, listPolicies, policiesForIssuer, putPolicy } from '../policy/repository.js';
import { brokerHoldsAdmin, grantToCreators } from '../postgres/creators.js';
import { withTransaction, type Queryable } from '../postgres/pool.js';
import { grantRoleProblem } from '../postgres/roles.js';
import { grantReachesBrokerDatabase } from '../postgres/exposure.js';
import { problemResponses } from '../schemas/common.js';
import { Evaluation, Policy, PolicyInput, PolicyWritten, PolicyListQuery, PolicyNameParams, PolicyPage, type PolicyInputBody } from '../schemas/policy.js';
import { requestContext } from './context.js';
import { invalidCursor } from './leases.js';
import { beforeBody } from '../validation.js';

export default async function policyRoutes(fastify: FastifyInstance): Promise<void> {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>();

  /** Every reason a policy may not be stored, checked against config and the live cluster. */
  async function policyProblem(input: PolicyInputBody): Promise<string | null> {
    if (!app.config.issuers.some((i) => i.issuer === input.issuer)) return `issuer ${input.issuer} is not one of BROKER_ISSUERS`;
    const shape = policyShapeProblem(input);
    if (shape) return shape;
    const role = await grantRoleProblem(app.db, input.grant_role, app.config.managedRole);
    // Fresh news for issuance too, which otherwise trusts its last answer for a while.
    app.grantRoles.remember(input.grant_role, role);
    if (role) return role;
    // 16+ only: on 15 CREATEROLE alone may grant any non-superuser role.
    if ((await app.roleCreators()).length > 0 && !(await brokerHoldsAdmin(app.db, input.grant_role))) {
      const broker = await app.brokerRole();
      return `the broker role ${broker} holds no ADMIN OPTION on grant_role ${input.grant_role}, which PostgreSQL 16+ requires to grant it:` +
        ` GRANT ${input.grant_role} TO ${broker} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE`;
    }
    // Read afresh, and remembered for issuance like the group's answer above.
    app.grantRoles.forgetDatabase(input.database);
    return app.grantRoles.databaseProblem(app.db, input.database);
  }

  app.get(
    '/policies',
    {
      schema: { summary: 'List policies (admin)', tags: ['policies'], querystring: PolicyListQuery, response: { 200: PolicyPage, ...problemResponses(400, 401, 403, 429, 503) } },
      preParsing: beforeBody(app.requireAdmin),
    },
    async (request) => listPolicies(app.db, request.query.limit ?? 100, request.query.cursor).catch(invalidCursor),
  );

  app.get(
    '/policies/:name',
    {
      schema: { summary: 'One policy (admin)', tags: ['policies'], params: PolicyNameParams, response: { 200: Policy, ...problemResponses(400, 401, 403, 404, 429, 503) } },
      preParsing: beforeBody(app.requireAdmin),
    },
    async (request) => {
      const policy = await getPolicy(app.db, request.params.name);
      if (!policy) throw new Errors.PolicyNotFound();
      return policy;
    },
  );

  app.put(
    '/policies/:name',
    {
      schema: {
        summary: 'Create or replace a policy (admin)',
        tags: ['policies'],
        params: PolicyNameParams,
        body: PolicyInput,
        response: { 200: PolicyWritten, 201: PolicyWritten, ...problemResponses(400, 401, 403, 429, 503) },
      },
      preParsing: beforeBody(app.requireAdmin),
    },
    async (request, reply) => {
      const problem = await policyProblem(request.body);
      if (problem) throw new Errors.InvalidPolicy(problem);
      // Before the transaction: setting the creators up (once per process, remembered after)
      // runs its own transaction on another pooled connection, under the migration lock.
      const creators = await app.roleCreators();
      const ctx = requestContext(request);
      // One transaction: a lock timeout or a lost connection in the grant or the audit insert
      // must not leave a changed policy without its grant or its event (the 503 says nothing
      // changed).
      const { policy, created } = await withTransaction(app.db, async (client) => {
        const stored = await putPolicy(client, request.params.name, request.body);
        await grantToCreators(client, creators, [stored.policy.grant_role]);
        await recordAudit(client, {
          type: stored.created ? 'policy.created' : 'policy.updated',
          issuer: ctx.identity.issuer,
          subject: ctx.identity.subject,
          policy: stored.policy.name,
          request_id: ctx.requestId,
          client_ip: ctx.clientIp,
          detail: { policy: stored.policy },
        });
        return stored;
      });
      // After the commit, and never a reason to fail it: a warning for an admin, not a refusal.
      const exposure = await grantReachesBrokerDatabase(app.db, policy.grant_role).catch((err: Error) => {
        request.log.warn({ err: { message: err.message } }, 'could not check whether this policy\'s credentials can connect to the broker\'s own database');
        return null;
      });
      if (!exposure) return reply.code(created ? 201 : 200).send(policy);
      request.log.warn({ policy: policy.name, grant_role: policy.grant_role }, exposure);
      return reply.code(created ? 201 : 200).send({ ...policy, warnings: [exposure] });
    },
  );

  app.delete(
    '/policies/:name',
    {
      schema: { summary: 'Delete a policy; its active leases run until they end (admin)', tags: ['policies'], params: PolicyNameParams, response: { 204: Type.Null(), ...problemResponses(400, 401, 403, 404, 429, 503) } },
      preParsing: beforeBody(app.requireAdmin),
    },
    async (request, reply) => {
      const ctx = requestContext(request);
      // The deletion and its event commit together, as for PUT.
      await withTransaction(app.db, async (client) => {
        const deleted = await deletePolicy(client, request.params.name);
        if (!deleted) throw new Errors.PolicyNotFound();
        await recordAudit(client, {
          type: 'policy.deleted',
          issuer: ctx.identity.issuer,
          subject: ctx.identity.subject,
          policy: request.params.name,
          request_id: ctx.requestId,
          client_ip: ctx.clientIp,
          // What it admitted and granted, which nothing else keeps once it is gone.
          detail: { policy: deleted },
        });
      });
      return reply.code(204).send(null);
    },
  );

  app.post(
    '/policies/evaluate',
    {
      schema: {
        summary: 'Explain which policies admit this token, and which claims fail for the others',
        tags: ['policies'],
        response: { 200: Evaluation, ...problemResponses(401, 429, 503) },
      },
      preParsing: beforeBody(app.authenticate),
    },
    async (request) => {
      const who = request.identity!;
      // Disabled policies are listed too, so "why am I refused" has an answer when one is off.
      const evaluations = evaluatePolicies(await policiesForIssuer(app.db, who.issuer), who.claims);
      // The same checks issuance makes after choosing a policy (and the same remembered answers),
      // so "admitted" never hides the refusal a request would get.
      const policies = [];
      const held = evaluations.some((e) => e.admitted) ? await activeLeasesByPolicy(app.db, who.issuer, who.subject) : new Map<string, number>();
      for (const e of evaluations) {
        const active = held.get(e.policy.name) ?? 0;
        const cannotIssue = e.admitted
          ? (await app.grantRoles.problem(app.db, e.policy.grant_role)) ?? (await app.grantRoles.databaseProblem(app.db, e.policy.database)) ??
            // Issuance's quota check, read the same way (insertLeaseWithinQuota), without its lock:
            // a lease ending or being issued right now can change the answer.
            (active >= e.policy.max_active_leases
              ? `this identity already holds ${active} active leases under this policy, its max_active_leases (${e.policy.max_active_leases}); one must end (revoke or expiry) before another is issued`
              : null)
          : null;
        policies.push({
          name: e.policy.name, admitted: e.admitted, ...(e.reason ? { reason: e.reason } : {}),
          ...(cannotIssue ? { cannot_issue: cannotIssue } : {}), failed_claims: e.failed_claims,
        });
      }
      return { issuer: who.issuer, subject: who.subject, policies };
    },
  );
}

/** Per policy, how many leases this identity holds that count against max_active_leases. */
async function activeLeasesByPolicy(db: Queryable, issuer: string, subject: string): Promise<Map<string, number>> {
  const { rows } = await db.query<{ policy: string; n: number }>(
    `SELECT policy, count(*)::int AS n FROM broker.leases
      WHERE issuer = $1 AND subject = $2 AND state IN ('pending', 'active') AND expires_at > now() GROUP BY policy`,
    [issuer, subject]);
  return new Map(rows.map((r) => [r.policy, r.n]));
}
