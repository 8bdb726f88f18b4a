import type { FastifyInstance } from 'fastify';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { listAudit } from '../audit/repository.js';
import { problemResponses } from '../schemas/common.js';
import { AuditPage, AuditQuery } from '../schemas/audit.js';
import { invalidCursor } from './leases.js';
import { beforeBody } from '../validation.js';

export default async function auditRoutes(fastify: FastifyInstance): Promise<void> {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>();
  app.get(
    '/audit',
    {
      schema: {
        summary: 'Audit events, newest first (admin)',
        tags: ['audit'],
        querystring: AuditQuery,
        response: { 200: AuditPage, ...problemResponses(400, 401, 403, 429, 503) },
      },
      preParsing: beforeBody(app.requireAdmin),
    },
    async (request) => listAudit(app.db, request.query).catch(invalidCursor),
  );
}
