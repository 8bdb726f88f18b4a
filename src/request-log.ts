import { LogController, type FastifyReply, type FastifyRequest } from 'fastify';

/**
 * One log line per request instead of Fastify's two ("incoming request" and "request
 * completed"): the completed line already carries the request id, method, path and status, and
 * logging costs measurable CPU per issuance (see bench/REPORT.md).
 */
export class OneLinePerRequest extends LogController {
  override incomingRequest(): void {}

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    const line = {
      method: request.method,
      // The path only: query strings may carry subjects and other filters.
      path: request.url.split('?')[0],
      status: reply.statusCode,
      ip: request.ip,
      responseTime: reply.elapsedTime,
    };
    if (error) reply.log.error({ ...line, err: error }, 'request errored');
    else reply.log.info(line, 'request completed');
  }
}
