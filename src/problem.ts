import type { FastifyBaseLogger, FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Socket } from 'node:net';
import { STATUS_CODES } from 'node:http';
import { recordAudit } from './audit/repository.js';
import { bearerToken, peekClaims, TokenRejected } from './auth/verify.js';
import { Errors } from './errors.js';
import { isCancelledWait, isConnectionError } from './postgres/pool.js';
import type { ProblemBody } from './schemas/common.js';

export const RETRY_AFTER_SECONDS = 5;

function problemBody(status: number, code: string, detail: string, instance?: string, requestId?: string): ProblemBody {
  return {
    type: `https://pg-credential-broker.dev/problems/${code.toLowerCase().replace(/_/g, '-')}`,
    title: STATUS_CODES[status] ?? 'Error',
    status,
    detail,
    code,
    ...(instance === undefined ? {} : { instance }),
    ...(requestId === undefined ? {} : { request_id: requestId }),
  };
}

// A path can be some 32 KB long (the header limit); an answer need not carry all of it back.
const MAX_ECHOED_PATH = 200;

function requestPath(request: FastifyRequest): string {
  const path = request.url.split('?')[0];
  return path.length > MAX_ECHOED_PATH ? `${path.slice(0, MAX_ECHOED_PATH)}…` : path;
}

function sendProblem(reply: FastifyReply, status: number, code: string, detail: string): FastifyReply {
  const body = problemBody(status, code, detail, requestPath(reply.request), String(reply.request.id));
  return reply.code(status).type('application/problem+json').send(body);
}

// RFC 6750 limits error_description to printable ASCII without `"` and `\`; anything else could
// break the header or, with CR/LF, make Node refuse to send it at all.
function bearerChallenge(description: string): string {
  return `Bearer realm="pg-credential-broker", error="invalid_token", error_description="${description.replace(/[^\x20\x21\x23-\x5B\x5D-\x7E]/g, '')}"`;
}

/**
 * Fastify's own answers for a URL its router cannot take (a path parameter over maxParamLength,
 * a malformed percent-escape) are plain JSON that echo the whole path; these are problem+json.
 * They are answered before any hook runs: no rate limit, no token check, no audit event.
 */
export function frameworkProblem(error: FastifyError, request: FastifyRequest, reply: FastifyReply): FastifyReply {
  // No onResponse runs for these, so this is the request's one log line.
  request.log.info({ method: request.method, path: requestPath(request), code: error.code }, 'router refused the request');
  if (error.code === 'FST_ERR_BAD_URL') return sendProblem(reply, 400, 'BAD_REQUEST', 'The path holds a malformed percent-encoding');
  // 400 rather than Fastify's 414: no path parameter of ours is valid at that length (a lease id
  // is a uuid, a policy name at most 63 characters), so this is the schema failure it would be.
  if (error.code === 'FST_ERR_MAX_PARAM_LENGTH') return sendProblem(reply, 400, 'BAD_REQUEST', 'A path parameter is too long');
  request.log.error({ err: error }, 'request failed');
  return sendProblem(reply, 500, 'INTERNAL', 'Internal error; see the broker log for this request_id');
}

/**
 * Node's HTTP parser refuses some requests before Fastify sees them (headers over the limit, a
 * malformed request line, Content-Length with Transfer-Encoding). Fastify's default answer is plain
 * JSON; this one is problem+json, written by hand since there is no request to reply through.
 */
export function clientErrorProblem(log: FastifyBaseLogger): (err: Error & { code?: string }, socket: Socket) => void {
  return (err, socket) => {
    // A client that closed its side mid-request (EOF before the announced body ended) has gone
    // away; the request, if one was under way, logs that itself. It is no malformed request.
    if (err.code === 'ECONNRESET' || err.code === 'HPE_INVALID_EOF_STATE' || socket.destroyed) {
      socket.destroy();
      return;
    }
    const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
    const detail = status === 431 ? 'The request headers are too large'
      : status === 408 ? 'The request did not arrive in full in time; send its headers and body without pausing' : 'The request is not valid HTTP';
    const requestId = crypto.randomUUID();
    log.debug({ err: { message: err.message, code: err.code }, request_id: requestId }, 'HTTP parser refused a request');
    const body = JSON.stringify(problemBody(status, 'BAD_REQUEST', detail, undefined, requestId));
    // As Node's own handler: no answer on a socket where a response has already begun.
    const inFlight = (socket as Socket & { _httpMessage?: { headersSent?: boolean } })._httpMessage;
    if (socket.writable && !inFlight?.headersSent) {
      socket.write(`HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\nContent-Type: application/problem+json\r\n`
        + `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
    }
    socket.destroy(err);
  };
}

/** Turns every error into RFC 9457 problem+json; 5xx details stay in the log. */
export function installProblemHandler(app: FastifyInstance): void {
  app.decorateRequest('audited', false);
  app.setNotFoundHandler((request, reply) => sendProblem(reply, 404, 'NOT_FOUND', `No route for ${request.method} ${requestPath(request)}`));

  app.setErrorHandler(async (error: FastifyError, request: FastifyRequest, reply: FastifyReply) => {
    if (error instanceof TokenRejected || error.code === 'MISSING_TOKEN') {
      const description = error instanceof TokenRejected ? error.description : 'a bearer token is required';
      if (request.routeOptions.url === '/credentials') app.metrics.denied.inc({ policy: '', reason: 'invalid_token' });
      await auditRejectedToken(app, request, description);
      reply.header('WWW-Authenticate', bearerChallenge(description));
      return sendProblem(reply, 401, error instanceof TokenRejected ? 'INVALID_TOKEN' : 'MISSING_TOKEN', description);
    }
    if (error === request.raw.errored) {
      // The request stream itself failed: the client hung up before its body was complete. Node
      // gives that error code ECONNRESET, as it does a PostgreSQL connection reset, but nothing is
      // wrong on our side and nobody is left to answer, so it is no outage and no audited refusal.
      request.log.info({ err: { message: error.message, code: error.code } }, 'client went away before its request was read');
      return sendProblem(reply, 400, 'BAD_REQUEST', 'The request ended before its body was complete');
    }
    if (isConnectionError(error)) {
      // Nothing can be audited with PostgreSQL down; this log line is the record.
      request.log.warn({ err: { message: error.message, code: error.code } }, 'PostgreSQL unavailable');
      reply.header('Retry-After', String(RETRY_AFTER_SECONDS));
      return sendProblem(reply, 503, 'DATABASE_UNAVAILABLE', 'PostgreSQL is unavailable, retry shortly');
    }
    const cancelled = isCancelledWait(error);
    if (cancelled) {
      // Logged with PostgreSQL's text, which names no lock holder; pg_locks at the time would.
      request.log.warn({ err: { message: error.message, code: error.code } }, 'PostgreSQL cancelled a statement');
      const { lockTimeoutSeconds: lock, queryTimeoutSeconds: query } = app.config;
      error = new Errors.DatabaseBusy(cancelled === '55P03'
        ? `Another PostgreSQL session held a lock this request needed for over ${lock} s (BROKER_LOCK_TIMEOUT); the statement was rolled back, retry shortly`
        : `PostgreSQL cancelled a statement of this request (statement timeout of ${query} s, BROKER_QUERY_TIMEOUT, or an operator's cancel); the statement was rolled back, retry shortly`);
    }
    const { status, code, detail } = answerFor(error, request);
    // An error may know better when a retry can succeed (a quota: the soonest lease's expiry).
    const wait = (error as { retryAfterSeconds?: unknown }).retryAfterSeconds;
    if (status === 429 && typeof wait === 'number' && !reply.getHeader('Retry-After')) reply.header('Retry-After', String(wait));
    if ((status === 429 || status === 503) && !reply.getHeader('Retry-After')) reply.header('Retry-After', String(RETRY_AFTER_SECONDS));
    // A verified caller refused (a bad body, not an admin, rate-limited, not their lease, an ended
    // lease) or failed leaves an audit event like every other outcome, unless the route recorded its own.
    if (request.identity && !request.audited) await auditOutcome(app, request, status, code);
    return sendProblem(reply, status, code, detail);
  });
}

function answerFor(error: FastifyError, request: FastifyRequest): { status: number; code: string; detail: string } {
  if (error.validation) {
    return { status: 400, code: 'BAD_REQUEST', detail: `${error.validationContext ?? 'request'}${error.message.replace(/^(body|querystring|params|headers)/, '')}` };
  }
  if (isRejectedInput(error)) {
    // Logged in full for the operator; the client gets no PostgreSQL text.
    request.log.warn({ err: { message: error.message, code: error.code } }, 'PostgreSQL refused a value from the request');
    return { status: 400, code: 'BAD_REQUEST', detail: 'The request holds a value that cannot be used (for example a NUL character or a malformed cursor)' };
  }
  const status = error.statusCode ?? 500;
  if (error.code === 'REVOKE_INCOMPLETE') {
    request.log.error({ err: error }, 'revocation incomplete');
    return { status: 500, code: error.code, detail: error.message };
  }
  if (error.code === 'DATABASE_BUSY' || error.code === 'DATABASE_UNAVAILABLE') return { status, code: error.code, detail: error.message };
  if (status >= 500) {
    request.log.error({ err: error }, 'request failed');
    return { status: 500, code: 'INTERNAL', detail: 'Internal error; see the broker log for this request_id' };
  }
  // Fastify's own text, "Unsupported Media Type", only repeats the status; the header is not
  // echoed (it is the client's, up to the header limit long).
  if (error.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') {
    return { status, code: fastifyCode(status), detail: "The body's Content-Type is not accepted: send it as JSON (Content-Type: application/json)" };
  }
  // Errors of our catalogue and of Fastify itself (body too large, bad JSON) carry safe texts.
  return { status, code: error.code?.startsWith('FST_') ? fastifyCode(status) : (error.code ?? 'ERROR'), detail: error.message };
}

declare module 'fastify' {
  interface FastifyRequest {
    /** Set by a route that recorded its own audit event for this request's failure. */
    audited: boolean;
  }
}

async function auditOutcome(app: FastifyInstance, request: FastifyRequest, status: number, code: string): Promise<void> {
  try {
    await recordAudit(app.db, {
      type: status >= 500 ? 'request.failed' : 'request.denied',
      issuer: request.identity!.issuer,
      subject: request.identity!.subject,
      // The lease or policy the path names, so a lease's history (GET /audit?lease_id=) shows
      // the attempts on it that were refused too.
      ...targetOf(request),
      reason: code,
      request_id: String(request.id),
      client_ip: request.clientIp,
      detail: { method: request.method, path: request.url.split('?')[0], status },
    });
  } catch (err) {
    request.log.warn({ err: { message: (err as Error).message } }, 'could not record audit event');
  }
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function targetOf(request: FastifyRequest): { lease_id?: string; policy?: string } {
  const { id, name } = (request.params ?? {}) as { id?: unknown; name?: unknown };
  const route = request.routeOptions.url ?? '';
  if (route.startsWith('/leases/:id') && typeof id === 'string' && UUID.test(id)) return { lease_id: id };
  if (route === '/policies/:name' && typeof name === 'string') return { policy: name };
  return {};
}

// Data exceptions PostgreSQL raises for values that came from the request as bind parameters: NUL
// or invalid UTF-8 (22021, 22P05), text that is no uuid or timestamp, e.g. a forged cursor (22P02,
// 22007, 22008), numbers out of range (22003) and strings too long (22001). They are the
// caller's mistake, not ours, and must not become a 500.
const INPUT_SQLSTATES = new Set(['22021', '22P05', '22P02', '22007', '22008', '22003', '22001']);

function isRejectedInput(error: unknown): boolean {
  const { code, severity } = error as { code?: unknown; severity?: unknown };
  return typeof severity === 'string' && typeof code === 'string' && INPUT_SQLSTATES.has(code);
}

function fastifyCode(status: number): string {
  if (status === 413) return 'BODY_TOO_LARGE';
  if (status === 415) return 'UNSUPPORTED_MEDIA_TYPE';
  if (status === 429) return 'RATE_LIMITED';
  return 'BAD_REQUEST';
}

async function auditRejectedToken(app: FastifyInstance, request: FastifyRequest, reason: string): Promise<void> {
  const unverified = peekClaims(bearerToken(request));
  try {
    await recordAudit(app.db, {
      type: 'token.rejected',
      issuer: unverified.issuer,
      subject: unverified.subject,
      actor_verified: false,
      reason,
      request_id: String(request.id),
      client_ip: request.clientIp,
      detail: { method: request.method, path: request.url.split('?')[0] },
    });
  } catch (err) {
    request.log.warn({ err: { message: (err as Error).message } }, 'could not record audit event');
  }
}
