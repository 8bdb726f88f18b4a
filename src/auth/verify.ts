import fastifyJwt from '@fastify/jwt';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import fp from 'fastify-plugin';
import { audienceFor, type AdminRule, type Config } from '../config.js';
import { Errors } from '../errors.js';
import { matchClaims } from '../policy/match.js';
import { ALLOWED_ALGORITHMS, KeyLookupError, KeyResolver } from './keys.js';

export interface Identity {
  issuer: string;
  subject: string;
  claims: Record<string, unknown>;
  admin: boolean;
}

declare module 'fastify' {
  interface FastifyRequest {
    identity: Identity | null;
  }
  interface FastifyInstance {
    authenticate: (request: FastifyRequest, reply: FastifyReply) => Promise<void>;
    requireAdmin: (request: FastifyRequest, reply: FastifyReply) => Promise<void>;
  }
}

// Real tokens are a few KB; anything larger is refused before decoding.
export const MAX_TOKEN_BYTES = 16 * 1024;
const CLOCK_TOLERANCE_MS = 30_000;

export function isAdmin(admins: AdminRule[], issuer: string, claims: Record<string, unknown>): boolean {
  return admins.some((rule) => rule.issuer === issuer && matchClaims(rule.claims, claims).length === 0);
}

/** The unverified iss/sub of a rejected token, for the audit trail only. */
export function peekClaims(token: string | undefined): { issuer: string | null; subject: string | null } {
  try {
    const payload = JSON.parse(Buffer.from(token!.split('.')[1], 'base64url').toString('utf8')) as Record<string, unknown>;
    return {
      issuer: typeof payload.iss === 'string' ? payload.iss.slice(0, 512) : null,
      subject: typeof payload.sub === 'string' ? payload.sub.slice(0, 512) : null,
    };
  } catch {
    return { issuer: null, subject: null };
  }
}

export function bearerToken(request: FastifyRequest): string | undefined {
  const header = request.headers.authorization;
  if (!header) return undefined;
  const match = /^Bearer[ ]+([^\s]+)\s*$/i.exec(header);
  return match ? match[1] : '';
}

// A lone surrogate reaches PostgreSQL as U+FFFD, so two different subjects would share one
// identity there: their leases, quota and issuance lock.
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

const REGISTERED_CLAIMS = new Set(['exp', 'nbf', 'iat', 'iss', 'aud', 'sub', 'jti']);

const AUDIENCE_REFUSED = 'token audience is not accepted';

/**
 * The audience refusal, naming the audience the token's issuer must put in aud: a token minted for
 * another audience (GitHub's default is the repository owner's URL) is the usual first mistake.
 * Only for an allow-listed issuer, and only after its signature checked out (fast-jwt checks the
 * signature before the claims), so the name goes to holders of that issuer's tokens alone.
 */
function audienceRefusal(config: Config, issuer: string | undefined): string {
  if (issuer === undefined || !config.issuers.some((i) => i.issuer === issuer)) return AUDIENCE_REFUSED;
  return `${AUDIENCE_REFUSED}: this broker takes tokens of this issuer with aud ${audienceFor(config, issuer)}`;
}

/** The iss of a token whose signature has been checked, read without checking anything else. */
function unverifiedIssuer(token: string): string | undefined {
  try {
    const { iss } = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8')) as { iss?: unknown };
    return typeof iss === 'string' ? iss : undefined;
  } catch {
    return undefined;
  }
}

// fast-jwt and @fastify/jwt messages are not a contract, and some echo header values chosen by
// the caller; error_description only ever gets one of the fixed texts below.
function describeVerifyError(err: unknown): string {
  if (err instanceof KeyLookupError) return err.message;
  const code = (err as { code?: string }).code ?? '';
  const message = (err as { message?: string }).message ?? '';
  const claim = /The (\w+) claim/.exec(message)?.[1];
  const named = claim && REGISTERED_CLAIMS.has(claim) ? claim : null;
  if (code === 'FST_JWT_AUTHORIZATION_TOKEN_EXPIRED' || code === 'FAST_JWT_EXPIRED' || /token expired/i.test(message)) return 'token has expired';
  if (code === 'FAST_JWT_INACTIVE' || /will be active/i.test(message)) return 'token is not valid yet (nbf)';
  if (/claim is required/.test(message)) return named ? `token is missing the ${named} claim` : 'token is missing a required claim';
  if (/claim must be a/.test(message)) return named ? `token ${named} claim has the wrong type` : 'token claim has the wrong type';
  if (/\baud claim|None of aud/.test(message)) return AUDIENCE_REFUSED;
  if (/\biss claim|None of iss/.test(message)) return 'token issuer is not allowed';
  if (code === 'FAST_JWT_INVALID_CRIT_HEADER' || /crit/i.test(message)) return 'token has a critical header extension that is not supported';
  if (/algorithm/i.test(message)) return 'token algorithm is not allowed';
  if (/signature/i.test(message)) return 'token signature is invalid';
  if (code === 'FAST_JWT_MALFORMED' || code === 'FAST_JWT_INVALID_PAYLOAD' || /malformed|base64url|JSON|must be an object/i.test(message)) return 'token is malformed';
  return 'token could not be verified';
}

/** An issuer URL as an operator might have meant it: no trailing slash, default port or case. */
function looseIssuer(issuer: string): string | null {
  try {
    const url = new URL(issuer);
    return `${url.protocol}//${url.host}${url.pathname.replace(/\/+$/, '')}`.toLowerCase();
  } catch {
    return null;
  }
}

/**
 * The refusal of a token whose iss is not allowed. Issuers are compared exactly, as OIDC requires,
 * so one listed with a trailing slash, another letter case or an explicit default port refuses
 * every token of the issuer while the broker looks healthy; such a near miss is named, so the
 * operator reading the 401 or the audit event knows what to fix. Nothing is fetched for it.
 */
export function issuerRefusal(iss: unknown, allowed: string[]): string {
  const loose = typeof iss === 'string' && iss.length <= 2048 ? looseIssuer(iss) : null;
  if (loose === null || !allowed.some((a) => looseIssuer(a) === loose)) return 'token issuer is not allowed';
  return 'token issuer is not allowed: it differs from an issuer in BROKER_ISSUERS only by a trailing slash, letter case or a default port, '
    + 'and issuers must match the token\'s iss exactly';
}

export class TokenRejected extends Error {
  constructor(readonly description: string) {
    super(description);
  }
}

async function authPlugin(app: FastifyInstance, opts: { config: Config; onFetchError?: (issuer: string, err: unknown) => void }): Promise<void> {
  const { config } = opts;
  const resolver = new KeyResolver(config.issuers, { onFetchError: opts.onFetchError });
  app.addHook('onClose', async () => resolver.close());
  const audiences = [...new Set([config.audience, ...config.issuers.flatMap((i) => (i.audience ? [i.audience] : []))])];

  await app.register(fastifyJwt, {
    decode: { complete: true },
    // Runs before any signature check: only an allow-listed issuer, an asymmetric alg and a kid
    // may lead to a key lookup, so a forged iss can never make us fetch from its host.
    secret: async (_request: FastifyRequest, token: unknown) => {
      const { header, payload } = token as { header: Record<string, unknown>; payload: Record<string, unknown> };
      if (typeof header?.alg !== 'string' || !ALLOWED_ALGORITHMS.includes(header.alg)) throw new KeyLookupError('token algorithm is not allowed');
      if (!resolver.isAllowed(payload?.iss)) throw new KeyLookupError(issuerRefusal(payload?.iss, config.issuers.map((i) => i.issuer)));
      if (typeof header.kid !== 'string' || header.kid.length === 0 || header.kid.length > 256) throw new KeyLookupError('token header has no usable kid');
      return resolver.publicKeyPem(payload.iss, header.kid, header.alg);
    },
    verify: {
      algorithms: ALLOWED_ALGORITHMS as never,
      allowedIss: config.issuers.map((i) => i.issuer),
      allowedAud: audiences,
      requiredClaims: ['exp', 'iss', 'aud', 'sub'],
      clockTolerance: CLOCK_TOLERANCE_MS,
      // The same parser authenticate() uses, so both agree on what the token is.
      extractToken: (request: FastifyRequest) => bearerToken(request),
    },
  });

  app.decorateRequest('identity', null);

  app.decorate('authenticate', async (request: FastifyRequest) => {
    const token = bearerToken(request);
    if (token === undefined) throw new Errors.MissingToken();
    if (!token) throw new TokenRejected('authorization header is not a bearer token');
    if (Buffer.byteLength(token) > MAX_TOKEN_BYTES) throw new TokenRejected('token is too large');
    let payload: Record<string, unknown>;
    try {
      payload = (await request.jwtVerify()) as Record<string, unknown>;
    } catch (err) {
      const description = describeVerifyError(err);
      throw new TokenRejected(description === AUDIENCE_REFUSED ? audienceRefusal(config, unverifiedIssuer(token)) : description);
    }
    const issuer = payload.iss as string;
    const subject = payload.sub;
    if (typeof subject !== 'string' || subject.length === 0) throw new TokenRejected('token sub must be a non-empty string');
    if (subject.includes('\0')) throw new TokenRejected('token sub holds a NUL character');
    if (subject.length > 1024) throw new TokenRejected('token sub is longer than 1024 UTF-16 code units');
    if (LONE_SURROGATE.test(subject)) throw new TokenRejected('token sub holds an unpaired UTF-16 surrogate');
    if (typeof payload.exp !== 'number') throw new TokenRejected('token exp must be a number');
    // fast-jwt only looks at iat when maxAge is set; DESIGN asks for it with the same leeway.
    if (payload.iat !== undefined && (typeof payload.iat !== 'number' || !Number.isFinite(payload.iat))) throw new TokenRejected('token iat claim has the wrong type');
    if (typeof payload.iat === 'number' && payload.iat * 1000 > Date.now() + CLOCK_TOLERANCE_MS) throw new TokenRejected('token was issued in the future (iat)');
    // allowedAud admits any configured audience; each issuer only its own.
    const aud = Array.isArray(payload.aud) ? payload.aud : [payload.aud];
    if (!aud.includes(audienceFor(config, issuer))) throw new TokenRejected(audienceRefusal(config, issuer));
    request.identity = { issuer, subject, claims: payload, admin: isAdmin(config.admins, issuer, payload) };
  });

  app.decorate('requireAdmin', async (request: FastifyRequest, reply: FastifyReply) => {
    await app.authenticate(request, reply);
    if (!request.identity?.admin) throw new Errors.NotAdmin();
  });
}

export default fp(authPlugin, { name: 'auth' });
