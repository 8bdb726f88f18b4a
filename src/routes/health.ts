import type { FastifyInstance } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { RETRY_AFTER_SECONDS } from '../problem.js';

const Status = Type.Object({ status: Type.String() });

export default async function healthRoutes(fastify: FastifyInstance): Promise<void> {
  const app = fastify.withTypeProvider<TypeBoxTypeProvider>();
  app.get('/healthz', { schema: { summary: 'Liveness: the process is up', tags: ['health'], security: [], response: { 200: Status } } }, async () => ({
    status: 'ok',
  }));
  // Anyone may call /readyz, as often as they like (probes are exempt from rate limits): calls
  // that arrive while a SELECT 1 is out wait for its answer instead of sending their own, so
  // readiness never holds more than one pooled connection.
  let inFlight: Promise<boolean> | null = null;
  const databaseAnswers = () => {
    inFlight ??= app.db.query('SELECT 1').then(() => true, () => false).finally(() => (inFlight = null));
    return inFlight;
  };
  app.get(
    '/readyz',
    { schema: { summary: 'Readiness: PostgreSQL answers', tags: ['health'], security: [], response: { 200: Status, 503: Status } } },
    async (_request, reply) => {
      if (await databaseAnswers()) return { status: 'ready' };
      reply.header('Retry-After', String(RETRY_AFTER_SECONDS));
      return reply.code(503).send({ status: 'database unavailable' });
    },
  );
  if (app.config.metricsPort === undefined) {
    app.get('/metrics', { schema: { hide: true } }, async (_request, reply) => {
      reply.type(app.metrics.registry.contentType);
      return app.metrics.registry.metrics();
    });
  }
  app.get('/openapi.yaml', { schema: { hide: true } }, async (_request, reply) => {
    reply.type('application/yaml');
    return app.swagger({ yaml: true });
  });
}
