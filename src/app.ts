import rateLimit, { normalizeIP } from '@fastify/rate-limit';
import swagger from '@fastify/swagger';
import { isIPv6 } from 'node:net';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyRequest } from 'fastify';
import type pg from 'pg';
import type { Logger } from 'pino';
import authPlugin from './auth/verify.js';
import { clientAddress } from './client-address.js';
import type { Config } from './config.js';
import { Errors } from './errors.js';
import { createLogger, type LogDestination } from './logger.js';
import { Metrics } from './metrics.js';
import { PolicyCache } from './policy/cache.js';
import { GrantRoleGuard } from './postgres/grant-guard.js';
import { prepareCreators } from './postgres/migrate.js';
import { createPool } from './postgres/pool.js';
import { clientErrorProblem, frameworkProblem, installProblemHandler } from './problem.js';
import { decorateLogNote, OneLinePerRequest } from './request-log.js';
import auditRoutes from './routes/audit.js';
import credentialRoutes from './routes/credentials.js';
import healthRoutes from './routes/health.js';
import leaseRoutes from './routes/leases.js';
import policyRoutes from './routes/policies.js';
import { Problem, problemResponses } from './schemas/common.js';
import { installJsonBodyParser, refuseNul, refuseUndeclaredInputs, schemaErrors, validatorCompiler } from './validation.js';

declare module 'fastify' {
  interface FastifyInstance {
    config: Config;
    db: pg.Pool;
    metrics: Metrics;
    /** The role the broker connects as (the policy checks and the orphan sweep need its name). */
    brokerRole(): Promise<string>;
    /** The creator roles issued roles are created as (PostgreSQL 16+), [] on 15. */
    roleCreators(): Promise<string[]>;
    /** Whether each policy's grant_role is still safe to hand out, re-checked at issuance. */
    grantRoles: GrantRoleGuard;
    /** The policies issuance decides with, kept between requests. */
    policyCache: PolicyCache;
  }
}

export interface BuildOptions {
  logger?: Logger;
  logDestination?: LogDestination;
  /** Share a pool with a caller (tests); otherwise the app owns one. */
  pool?: pg.Pool;
  metrics?: Metrics;
  /** REQUEST_TIMEOUT_MS unless given (tests shorten it). */
  requestTimeoutMs?: number;
}

export const MAX_BODY_BYTES = 64 * 1024;
// Node's default is 16 KB; tokens are capped at 16 KB too, so leave room for the other headers.
export const MAX_HEADER_BYTES = 32 * 1024;
// Time for a whole request, headers and body, to arrive. Fastify's default is none, so a client
// that announced a body and stopped sending held its socket, and held up a shutdown's drain, for
// as long as it liked. A request here is at most 64 KB; 30 s is ample on any link.
export const REQUEST_TIMEOUT_MS = 30_000;

/**
 * Fastify options that bound a request's arrival, for every listener the broker opens. Node looks
 * for timed-out requests every connectionsCheckingInterval (30 s by default), which would let one
 * run for up to twice its limit.
 */
export function arrivalLimits(requestTimeoutMs = REQUEST_TIMEOUT_MS) {
  return {
    requestTimeout: requestTimeoutMs,
    http: { headersTimeout: requestTimeoutMs, connectionsCheckingInterval: Math.min(5_000, Math.max(100, requestTimeoutMs / 4)) },
  };
}
const PROBE_PATHS = new Set(['/healthz', '/readyz', '/metrics']);
const UNCHECKED_QUERY_PATHS = new Set([...PROBE_PATHS, '/openapi.yaml']);

/**
 * After a token is verified, the same identity may make at most `max` requests a minute,
 * wherever it comes from: one leaked CI token must not be able to mint thousands of roles.
 */
function limitPerIdentity(app: FastifyInstance, max: number): void {
  const check = app.createRateLimit({
    max,
    timeWindow: 60_000,
    keyGenerator: (request) => `${request.identity?.issuer}\u001f${request.identity?.subject}`,
  });
  const authenticate = app.authenticate;
  app.authenticate = async (request, reply) => {
    await authenticate(request, reply);
    // Admins page through leases and audit events in bulk; minting credentials is limited for
    // everyone, since a leaked admin token must not be able to mint thousands of roles either.
    if (request.identity?.admin && request.routeOptions.url !== '/credentials') return;
    const limit = await check(request);
    if (!limit.isAllowed && limit.isExceeded) {
      reply.header('Retry-After', String(limit.ttlInSeconds));
      throw new Errors.RateLimited(`More than ${max} requests a minute for this identity; retry in ${limit.ttlInSeconds} s`);
    }
  };
}

const OPTIONAL_BODIES = [['/credentials', 'post'], ['/leases/{id}/renew', 'post']] as const;

export async function buildApp(config: Config, options: BuildOptions = {}): Promise<FastifyInstance> {
  const logger = options.logger ?? createLogger(config.logLevel, options.logDestination);
  const limits = arrivalLimits(options.requestTimeoutMs);
  const app = Fastify({
    loggerInstance: logger as FastifyBaseLogger,
    logController: new OneLinePerRequest(),
    bodyLimit: MAX_BODY_BYTES,
    requestTimeout: limits.requestTimeout,
    http: { ...limits.http, maxHeaderSize: MAX_HEADER_BYTES },
    requestIdHeader: false,
    genReqId: () => crypto.randomUUID(),
    frameworkErrors: frameworkProblem,
    clientErrorHandler: clientErrorProblem(logger as FastifyBaseLogger),
    schemaErrorFormatter: schemaErrors,
    // request.ip, behind the per-IP limit, the audit's client_ip and the request log (through
    // request.clientIp), is the client X-Forwarded-For names only when the connection came from a
    // listed proxy. An empty list is `false`, which keeps Fastify from consulting X-Forwarded-For at all.
    trustProxy: config.trustProxy.length > 0 ? config.trustProxy : false,
  });
  // Unknown body fields are errors, not silently dropped; bodies are not type-coerced.
  app.setValidatorCompiler(validatorCompiler);
  installJsonBodyParser(app);

  const pool = options.pool ?? createPool(config.databaseUrl, logger, config.dbPoolSize, config);
  app.decorateRequest('clientIp', { getter(this: FastifyRequest) { return clientAddress(this); } });
  app.decorate('config', config);
  app.decorate('db', pool);
  app.decorate('metrics', options.metrics ?? new Metrics());
  let brokerRole: string | null = null;
  app.decorate('brokerRole', async () => {
    brokerRole ??= (await pool.query<{ current_user: string }>('SELECT current_user')).rows[0].current_user;
    return brokerRole;
  });
  let creators: Promise<string[]> | null = null;
  app.decorate('roleCreators', () => {
    // Usually a no-op check, since migrate() set them up; a failure (database down) is retried
    // on the next call rather than remembered.
    creators ??= prepareCreators(pool, config.managedRole).catch((err) => {
      creators = null;
      throw err;
    });
    return creators;
  });
  app.decorate('grantRoles', new GrantRoleGuard(config.managedRole, config.grantRecheckSeconds * 1000));
  app.decorate('policyCache', new PolicyCache());
  if (!options.pool) app.addHook('onClose', async () => pool.end());
  // A request refused before its body was read (per-IP limit, token check) leaves the body
  // unread; on a kept-alive connection those bytes would stall the next request. Such an answer
  // closes the connection, as Fastify's own answer does when it refuses a body.
  app.addHook('onSend', async (request, reply) => {
    const { 'content-length': length, 'transfer-encoding': chunked } = request.headers;
    if (reply.statusCode >= 400 && request.body === undefined && (chunked || (length !== undefined && length !== '0'))) {
      reply.header('connection', 'close');
    }
  });
  // Fastify reads a body on every method but GET and HEAD, whatever the route's schema says, so
  // each such route can answer 400 (malformed JSON), 413 (over 64 KB) and 415 (neither JSON nor
  // text/plain). Added here rather than route by route, so no route's document can leave them out.
  // Every route but the probes and the API document also answers 400 for a query parameter it
  // does not declare (a tool fetching the document may add one to bust a cache).
  app.addHook('onRoute', (route) => {
    refuseUndeclaredInputs(route, UNCHECKED_QUERY_PATHS);
    if (!route.schema?.response) return;
    const bodyless = [route.method].flat().every((m) => m === 'GET' || m === 'HEAD');
    const answers = bodyless ? (PROBE_PATHS.has(route.url) ? {} : problemResponses(400)) : problemResponses(400, 413, 415);
    route.schema.response = { ...answers, ...(route.schema.response as object) };
  });
  app.addHook('preHandler', refuseNul(UNCHECKED_QUERY_PATHS));
  app.addSchema(Problem);
  decorateLogNote(app);

  installProblemHandler(app);
  await app.register(swagger, {
    refResolver: { buildLocalReference: (json, _base, _fragment, i) => String(json.$id ?? `def-${i}`) },
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'pg-credential-broker',
        version: '0.1.0',
        description: 'Trade a verified OIDC token for a short-lived PostgreSQL login.',
      },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer', bearerFormat: 'JWT' } } },
      security: [{ bearer: [] }],
    },
    // @fastify/swagger marks every body required; these POSTs also take none (noBodyMeansNoOptions).
    transformObject: (doc) => {
      if (!('openapiObject' in doc)) return doc.swaggerObject;
      for (const [path, method] of OPTIONAL_BODIES) {
        const body = doc.openapiObject.paths?.[path]?.[method]?.requestBody;
        if (body && !('$ref' in body)) body.required = false;
      }
      return doc.openapiObject;
    },
  });
  // Per client IP before anything else, so floods are refused before token verification.
  await app.register(rateLimit, {
    global: true,
    max: config.rateLimitIp,
    timeWindow: 60_000,
    hook: 'onRequest',
    allowList: (request) => PROBE_PATHS.has(request.url.split('?')[0]),
    // The plugin's own key, of the address the audit records rather than request.ip as it stands.
    keyGenerator: (request) => normalizeIP(request.clientIp ?? ''),
    // Our catalogue error, so the answer carries code RATE_LIMITED like the per-identity limit's.
    // The plugin counts an IPv6 client by its /64 (one host may send from any address in it) and
    // an IPv4-mapped address as its IPv4 one; the answer says which it counted.
    errorResponseBuilder: (request, context) => {
      const ip = request.clientIp ?? '';
      const block = isIPv6(ip) && !/^::ffff:\d+\.\d+\.\d+\.\d+$/i.test(ip) ? 'this address\'s /64' : 'this address';
      return new Errors.RateLimited(`More than ${context.max} requests a minute from ${block}; retry in ${Math.max(1, Math.ceil(context.ttl / 1000))} s`);
    },
  });
  // Callers only see "token could not be verified"; the reason is for the operator.
  await app.register(authPlugin, {
    config,
    onFetchError: (issuer, err) => {
      app.metrics.jwksFetchErrors.inc({ issuer });
      // undici says only "fetch failed"; why (ECONNREFUSED, a certificate) is in its cause.
      const { message, cause } = (err ?? {}) as { message?: string; cause?: { code?: string; message?: string } };
      app.log.warn({ issuer, err: { message: message ?? String(err), cause: cause?.code ?? cause?.message } }, 'could not fetch the issuer\'s signing keys');
    },
  });
  limitPerIdentity(app, config.rateLimitIdentity);
  await app.register(healthRoutes);
  await app.register(credentialRoutes);
  await app.register(leaseRoutes);
  await app.register(policyRoutes);
  await app.register(auditRoutes);
  return app;
}
