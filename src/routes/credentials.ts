import type { FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { issueCredential, IssueDenied } from '../leases/issue.js';
import { problemResponses } from '../schemas/common.js';
import { Credential, CredentialRequest } from '../schemas/lease.js';
import { requestContext } from './context.js';
import { beforeBody, noBodyMeansNoOptions } from '../validation.js';

export default async function credentialRoutes(fastify: FastifyInstance): Promise<void> {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>();
  app.post(
    '/credentials',
    {
      schema: {
        summary: 'Issue a short-lived PostgreSQL login for the bearer token',
        tags: ['credentials'],
        body: CredentialRequest,
        response: { 201: Credential, ...problemResponses(400, 401, 403, 409, 429, 503) },
      },
      preParsing: beforeBody(app.authenticate),
      preValidation: noBodyMeansNoOptions,
    },
    async (request, reply) => {
      const stopTimer = app.metrics.issueSeconds.startTimer();
      try {
        const credential = await issueCredential(
          {
            pool: app.db, config: app.config, creators: app.roleCreators, grantRoles: app.grantRoles, policies: app.policyCache, log: request.log,
            noteIssued: (fields) => (request.logNote = { msg: 'credential issued', fields }),
          },
          requestContext(request),
          request.body ?? {},
        );
        app.metrics.issued.inc({ policy: credential.policy });
        reply.header('Cache-Control', 'no-store').header('Pragma', 'no-cache');
        return reply.code(201).send(credential);
      } catch (err) {
        // issueCredential has recorded credential.denied or credential.failed for it, or, with
        // PostgreSQL unreachable, left the 503's log line as the record.
        request.audited = true;
        const denial = (err as { denial?: IssueDenied }).denial;
        // A no_policy denial's name is whatever the caller asked for: as a label it would add a
        // time series per made-up name. The other denials name the policy that admitted the token.
        const policy = denial && denial.reason !== 'no_policy' ? denial.policy ?? '' : '';
        app.metrics.denied.inc({ policy, reason: denial?.reason ?? 'error' });
        throw err;
      } finally {
        stopTimer();
      }
    },
  );
}
