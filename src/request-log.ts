import { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';

declare module 'fastify' {
  interface FastifyRequest {
    /** What a route has to say about the request, written in its one log line instead of a line of its own. */
    logNote: LogNote | null;
  }
}

export interface LogNote {
  msg: string;
  fields: Record<string, unknown>;
}

export function decorateLogNote(app: FastifyInstance): void {
  app.decorateRequest('logNote', null);
}

/**
 * One log line per request instead of Fastify's two ("incoming request" and "request
 * completed"): the completed line already carries the request id, method, path and status, and
 * logging costs measurable CPU per issuance (see bench/REPORT.md). A route's note (an issued
 * lease, say) rides in the same line rather than a second one.
 */
export class OneLinePerRequest extends LogController {
  override incomingRequest(): void {}

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    const line = {
      method: request.method,
      // The path only: query strings may carry subjects and other filters.
      path: request.url.split('?')[0],
      status: reply.statusCode,
      ip: request.clientIp,
      responseTime: reply.elapsedTime,
    };
    const note = request.logNote;
    if (error) reply.log.error({ ...line, ...note?.fields, err: error }, 'request errored');
    else if (note) reply.log.info({ ...line, ...note.fields }, note.msg);
    else reply.log.info(line, 'request completed');
  }
}
