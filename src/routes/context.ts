import type { FastifyRequest } from 'fastify';
import type { RequestContext } from '../leases/issue.js';

export function requestContext(request: FastifyRequest): RequestContext {
  if (!request.identity) throw new Error('route used without authentication');
  const ua = request.headers['user-agent'];
  return {
    identity: request.identity,
    requestId: String(request.id),
    clientIp: request.clientIp ?? null,
    userAgent: typeof ua === 'string' ? ua.slice(0, 512) : null,
  };
}
