import { Type, type Static, type TInteger } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { ConfigError, describeSchemaError, ENV_NAMES, jsonProblem, MANAGED_ROLE_RULE, quoted } from './config-errors.js';
import { isPlainHttpOverNetwork, isUrl, listenHostOrNull, plainIssuer, proxyRangeProblem, PUBLIC_HOST_RULE, publicHostOrNull, urlProblem } from './config-values.js';
import { databaseTarget, DatabaseUrlError, type DatabaseTarget } from './database-url.js';
import { validatePatterns } from './policy/match.js';

// Role names must be plain identifiers: they reach DDL through escapeIdentifier, and
// PostgreSQL reserves the pg_ prefix for its own roles.
const RoleName = Type.String({ pattern: '^(?!pg_)[a-z_][a-z0-9_]{0,58}$' });

/** BROKER_MANAGED_ROLE for commands that need no other setting (`pg-broker migrate`), checked as loadConfig checks it. */
export function managedRoleFrom(env: NodeJS.ProcessEnv): string {
  const value = env.BROKER_MANAGED_ROLE?.trim() || 'credential_broker_managed';
  if (!Value.Check(RoleName, value)) throw new ConfigError('BROKER_MANAGED_ROLE', MANAGED_ROLE_RULE);
  return value;
}
/** LOG_LEVEL for commands that need no other setting (`pg-broker migrate`), checked as loadConfig checks it. */
export function logLevelFrom(env: NodeJS.ProcessEnv, fallback: string): string {
  const value = env.LOG_LEVEL?.trim().toLowerCase() || fallback;
  if (!LOG_LEVELS.includes(value)) throw new ConfigError('LOG_LEVEL', `must be one of ${LOG_LEVELS.join(', ')}`);
  return value;
}
/** DATABASE_URL for commands that need no other setting (`pg-broker migrate`), checked as loadConfig checks it. */
export function databaseUrlFrom(env: NodeJS.ProcessEnv): string {
  const url = required(env, 'DATABASE_URL');
  if (!/^postgres(ql)?:\/\//.test(url)) throw new ConfigError('DATABASE_URL', 'must be a postgres:// or postgresql:// URL');
  databaseTargetOf(url);
  return url;
}
const Url = Type.String({ pattern: '^https?://[^\\s]+$' });
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];
const Port = Type.Integer({ minimum: 1, maximum: 65535 });
// `unit` is ours, not JSON Schema's: it words the range in start-up errors.
const Seconds = (minimum: number, maximum: number) => Type.Integer({ minimum, maximum, unit: 'seconds' });
// A billion a minute is no limit in practice (the benchmarks set that to stay out of the way);
// the bound only keeps the value a safe integer and catches a pasted run of digits.
const PerMinute = Type.Integer({ minimum: 1, maximum: 1_000_000_000, unit: 'requests per minute' });

export const IssuerSchema = Type.Object(
  {
    issuer: Url,
    jwks_uri: Type.Optional(Url),
    audience: Type.Optional(Type.String({ minLength: 1 })),
  },
  { additionalProperties: false },
);

export const AdminSchema = Type.Object(
  {
    issuer: Url,
    claims: Type.Record(Type.String({ minLength: 1 }), Type.Union([Type.String(), Type.Array(Type.String(), { minItems: 1 })])),
  },
  { additionalProperties: false },
);

export const ConfigSchema = Type.Object({
  databaseUrl: Type.String({ pattern: '^postgres(ql)?://' }),
  issuers: Type.Array(IssuerSchema, { minItems: 1 }),
  audience: Type.String({ minLength: 1 }),
  admins: Type.Array(AdminSchema),
  publicPgHost: Type.String({ minLength: 1 }),
  publicPgPort: Port,
  reaperIntervalSeconds: Seconds(1, 3600),
  grantRecheckSeconds: Seconds(0, 3600),
  managedRole: RoleName,
  metricsPort: Type.Optional(Port),
  rateLimitIp: PerMinute,
  rateLimitIdentity: PerMinute,
  // Addresses and CIDR blocks of the proxies whose X-Forwarded-For is believed; [] believes none.
  trustProxy: Type.Array(Type.String({ minLength: 1 })),
  dbPoolSize: Type.Integer({ minimum: 1, maximum: 1000 }),
  scramIterations: Type.Integer({ minimum: 1, maximum: 1_000_000 }),
  lockTimeoutSeconds: Seconds(0, 3600),
  queryTimeoutSeconds: Seconds(0, 3600),
  host: Type.String({ minLength: 1 }),
  port: Type.Integer({ minimum: 0, maximum: 65535 }),
  logLevel: Type.Union(LOG_LEVELS.map((l) => Type.Literal(l))),
});

export type Config = Static<typeof ConfigSchema>;
export type IssuerConfig = Static<typeof IssuerSchema>;
export type AdminRule = Static<typeof AdminSchema>;
export { ConfigError };

type Env = Record<string, string | undefined>;

function required(env: Env, name: string): string {
  const value = env[name]?.trim();
  if (!value) throw new ConfigError(name, 'is required');
  return value;
}

type WholeNumberField = {
  [K in keyof typeof ConfigSchema.properties]: (typeof ConfigSchema.properties)[K] extends TInteger ? K : never;
}[keyof typeof ConfigSchema.properties];

/** A whole number in the schema's range, or an error that states the range instead of the schema rule. */
function wholeNumber(env: Env, field: WholeNumberField, fallback?: number): number | undefined {
  const name = ENV_NAMES[field];
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  const { minimum, maximum, unit } = ConfigSchema.properties[field] as { minimum: number; maximum: number; unit?: string };
  const value = /^-?\d+$/.test(raw) ? Number(raw) : NaN;
  if (value >= minimum && value <= maximum) return value;
  const number = (n: number) => (n >= 100_000 ? n.toLocaleString('en-US') : String(n));
  const range = `from ${number(minimum)} to ${number(maximum)}`;
  throw new ConfigError(name, `must be a whole number ${unit ? `of ${unit} ` : ''}${range} (got ${quoted(raw)})`);
}

function json(name: string, raw: string): unknown {
  try {
    return JSON.parse(raw);
  } catch (err) {
    throw new ConfigError(name, `is not valid JSON: ${jsonProblem((err as Error).message, raw)}`);
  }
}

function parseIssuers(env: Env): unknown {
  const raw = required(env, 'BROKER_ISSUERS');
  // A JSON object is a common slip for the array form; splitting it on commas would only
  // produce a confusing URL error.
  if (raw.startsWith('[') || raw.startsWith('{')) {
    // Untrimmed, so that the line and column of a JSON error are the operator's own.
    const parsed = json('BROKER_ISSUERS', env.BROKER_ISSUERS!);
    if (!Array.isArray(parsed)) throw new ConfigError('BROKER_ISSUERS', 'must be a JSON array of {"issuer", "jwks_uri"?, "audience"?} objects, or a comma-separated list of issuer URLs');
    return parsed;
  }
  return raw.split(',').map((s) => s.trim()).filter(Boolean).map((issuer) => ({ issuer }));
}

function publicHost(env: Env, database: DatabaseTarget): string {
  const set = env.BROKER_PUBLIC_PG_HOST?.trim();
  // The value is not echoed: a `user:password@host` typo would put a secret in the log.
  if (set) return publicHostOrNull(set) ?? fail('BROKER_PUBLIC_PG_HOST', `must be ${PUBLIC_HOST_RULE} (the port goes in BROKER_PUBLIC_PG_PORT)`);
  // A socket directory is no address for clients elsewhere, and localhost would send them to
  // their own machine.
  if (database.host === null) fail('BROKER_PUBLIC_PG_HOST', 'is required when DATABASE_URL connects through a Unix socket: set it to the host name clients should connect to');
  // A name outside RFC 1123 may still resolve for the broker's own connection, but is nothing
  // to hand to clients.
  return publicHostOrNull(database.host) ?? fail('DATABASE_URL', `its host is not ${PUBLIC_HOST_RULE}, so clients cannot be given it; set BROKER_PUBLIC_PG_HOST`);
}

function listenHost(env: Env): string {
  const host = env.HOST?.trim() || '0.0.0.0';
  // Checked before anything starts: a bad HOST would otherwise surface only after the migrations ran.
  // Quoted unless it has a user part, which might hold a password.
  const got = host.includes('@') ? '' : ` (got ${JSON.stringify(host)})`;
  return listenHostOrNull(host) ?? fail('HOST', `must be an IP address (such as 0.0.0.0, :: or 127.0.0.1) or a host name to listen on, with no port, scheme or path${got}`);
}

const TRUST_PROXY_RULE = 'must list the addresses or CIDR blocks of the proxies in front of the broker (such as 10.0.0.0/8,fd00::/8)';

function trustedProxies(env: Env): string[] {
  const raw = env.BROKER_TRUST_PROXY?.trim();
  if (!raw) return [];
  // Trusting every peer would let any client name its own address in X-Forwarded-For, and so
  // dodge BROKER_RATE_LIMIT_IP and write what it likes into the audit's client_ip.
  if (/^(true|yes|on|all|\*)$/i.test(raw)) fail('BROKER_TRUST_PROXY', `${TRUST_PROXY_RULE}; trusting every peer would let any client choose its own address`);
  // Fastify 5 trusts no one on a hop count alone: it cannot tell a proxy from a client that
  // sends its own X-Forwarded-For.
  if (/^\d+$/.test(raw)) fail('BROKER_TRUST_PROXY', `${TRUST_PROXY_RULE}, not a hop count`);
  if (/^(false|no|off|none)$/i.test(raw)) fail('BROKER_TRUST_PROXY', `${TRUST_PROXY_RULE}; leave it unset or empty to trust no proxy`);
  return raw.split(',').map((s) => s.trim()).filter(Boolean).map((entry, i) => {
    const problem = proxyRangeProblem(entry);
    return problem ? fail('BROKER_TRUST_PROXY', `entry ${i + 1}: ${quoted(entry)} ${problem}`) : entry;
  });
}

function fail(variable: string, reason: string): never {
  throw new ConfigError(variable, reason);
}

/**
 * A claim name with a space at either end is looked up as written, and no token has it; an empty
 * pattern matches only an empty value, which no admin's sub or group is. Both are typos.
 */
function adminClaimsProblem(claims: AdminRule['claims']): string | null {
  for (const [name, patterns] of Object.entries(claims)) {
    if (name.trim() !== name) return `claim name ${JSON.stringify(name)} has a space at its start or end, so no token would carry that claim`;
    if ([patterns].flat().includes('')) return `claim ${JSON.stringify(name)} has an empty pattern, which matches no real value`;
  }
  return null;
}

function databaseTargetOf(url: string): DatabaseTarget {
  try {
    return databaseTarget(url);
  } catch (err) {
    if (err instanceof DatabaseUrlError) throw new ConfigError('DATABASE_URL', err.message);
    throw err;
  }
}

export function loadConfig(env: Env = process.env): Config {
  const databaseUrl = required(env, 'DATABASE_URL');
  const dbTarget = databaseTargetOf(databaseUrl);
  const candidate = {
    databaseUrl,
    issuers: parseIssuers(env),
    audience: required(env, 'BROKER_AUDIENCE'),
    admins: env.BROKER_ADMINS?.trim() ? json('BROKER_ADMINS', env.BROKER_ADMINS) : [],
    publicPgHost: publicHost(env, dbTarget),
    publicPgPort: wholeNumber(env, 'publicPgPort', dbTarget.port),
    reaperIntervalSeconds: wholeNumber(env, 'reaperIntervalSeconds', 10),
    grantRecheckSeconds: wholeNumber(env, 'grantRecheckSeconds', 60),
    managedRole: env.BROKER_MANAGED_ROLE?.trim() || 'credential_broker_managed',
    metricsPort: wholeNumber(env, 'metricsPort'),
    rateLimitIp: wholeNumber(env, 'rateLimitIp', 600),
    rateLimitIdentity: wholeNumber(env, 'rateLimitIdentity', 120),
    trustProxy: trustedProxies(env),
    dbPoolSize: wholeNumber(env, 'dbPoolSize', 10),
    scramIterations: wholeNumber(env, 'scramIterations', 4096),
    lockTimeoutSeconds: wholeNumber(env, 'lockTimeoutSeconds', 10),
    queryTimeoutSeconds: wholeNumber(env, 'queryTimeoutSeconds', 30),
    host: listenHost(env),
    port: wholeNumber(env, 'port', 8080),
    logLevel: env.LOG_LEVEL?.trim().toLowerCase() || 'info',
  };
  if (candidate.metricsPort === undefined) delete candidate.metricsPort;
  const first = Value.Errors(ConfigSchema, candidate).First();
  if (first) throw describeSchemaError(first);
  const config = candidate as Config;
  const seen = new Set<string>();
  config.issuers.forEach((entry, i) => {
    // The schema's pattern only checks the shape; new URL() is what fetch will call later.
    if (!isUrl(entry.issuer)) throw new ConfigError('BROKER_ISSUERS', `entry ${i + 1}: issuer must be an http(s) URL`);
    // OIDC: an issuer identifier has no query, fragment or user part, and discovery appends
    // /.well-known/openid-configuration to it, which such parts would break.
    if (!plainIssuer(entry.issuer)) throw new ConfigError('BROKER_ISSUERS', `entry ${i + 1}: issuer must have no query, fragment or user part`);
    if (entry.jwks_uri !== undefined && !isUrl(entry.jwks_uri)) throw new ConfigError('BROKER_ISSUERS', `entry ${i + 1}: jwks_uri must be an http(s) URL`);
    // fetch refuses a URL with credentials, and would put them in the log with its error.
    if (entry.jwks_uri !== undefined && (new URL(entry.jwks_uri).username || new URL(entry.jwks_uri).password)) {
      throw new ConfigError('BROKER_ISSUERS', `entry ${i + 1}: jwks_uri must have no user part (user:password@); fetch sends no credentials from a URL`);
    }
    const problem = urlProblem('issuer', entry.issuer) ?? (entry.jwks_uri === undefined ? null : urlProblem('jwks_uri', entry.jwks_uri));
    if (problem) throw new ConfigError('BROKER_ISSUERS', `entry ${i + 1}: ${problem}`);
    if (seen.has(entry.issuer)) throw new ConfigError('BROKER_ISSUERS', `lists ${entry.issuer} twice`);
    seen.add(entry.issuer);
  });
  config.admins.forEach((admin, i) => {
    if (!seen.has(admin.issuer)) throw new ConfigError('BROKER_ADMINS', `entry ${i + 1}: issuer ${admin.issuer} is not in BROKER_ISSUERS`);
    if (Object.keys(admin.claims).length === 0) throw new ConfigError('BROKER_ADMINS', `entry ${i + 1}: must bind at least one claim`);
    // The same rules as a policy's claims, and two typos more, so that an admin rule cannot
    // silently never match.
    const problem = adminClaimsProblem(admin.claims) ?? validatePatterns(admin.claims);
    if (problem) throw new ConfigError('BROKER_ADMINS', `entry ${i + 1}: ${problem}`);
  });
  // A lock wait that reaches the query timeout first fails as "unavailable" on a discarded
  // connection instead of as DATABASE_BUSY on a healthy one.
  if (config.queryTimeoutSeconds > 0 && config.lockTimeoutSeconds > 0 && config.queryTimeoutSeconds <= config.lockTimeoutSeconds) {
    throw new ConfigError('BROKER_QUERY_TIMEOUT', `must be longer than BROKER_LOCK_TIMEOUT (${config.lockTimeoutSeconds} s), or 0 to wait without limit`);
  }
  if (config.metricsPort !== undefined && config.metricsPort === config.port) {
    throw new ConfigError('BROKER_METRICS_PORT', `must differ from PORT (${config.port}); leave it unset to serve /metrics on the API port`);
  }
  return config;
}

/**
 * Issuer entries whose keys would be fetched over plain http from another machine: the jwks_uri,
 * or without one the issuer itself (discovery reads its /.well-known/openid-configuration). The
 * key set is the root of trust, so whoever can alter that fetch can sign any token, an admin's
 * included. Allowed, with a warning at start-up, for the compose trial's dev issuer, which the
 * broker reaches as http://dev-issuer:9000 over the compose network.
 */
export function plainHttpKeySources(config: Config): Array<{ entry: number; field: 'issuer' | 'jwks_uri'; origin: string }> {
  return config.issuers.flatMap((entry, i) => {
    const field = entry.jwks_uri === undefined ? 'issuer' : 'jwks_uri';
    const url = entry.jwks_uri ?? entry.issuer;
    // Only the origin: a jwks_uri may carry a user part or a query with a token in it.
    return isPlainHttpOverNetwork(url) ? [{ entry: i + 1, field, origin: new URL(url).origin }] : [];
  });
}

/** The audience a token from this issuer must carry. */
export function audienceFor(config: Config, issuer: string): string {
  return config.issuers.find((i) => i.issuer === issuer)?.audience ?? config.audience;
}

/**
 * Audiences that read like a list ("pg-broker, sts.amazonaws.com"): each is one audience, matched
 * whole against the token's aud, so such a value refuses every token, while BROKER_ISSUERS, right
 * beside it, does take a comma-separated list. Warned about at start-up, not refused: a comma is
 * legal in an audience.
 */
export function listLikeAudiences(config: Config): Array<{ variable: string; audience: string }> {
  const entries = [{ variable: 'BROKER_AUDIENCE', audience: config.audience }, ...config.issuers.flatMap((i, n) =>
    i.audience === undefined ? [] : [{ variable: `BROKER_ISSUERS entry ${n + 1}`, audience: i.audience }])];
  return entries.filter((e) => e.audience.includes(','));
}
