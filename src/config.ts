import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';

// Role names must be plain identifiers: they reach DDL through escapeIdentifier, and
// PostgreSQL reserves the pg_ prefix for its own roles.
const RoleName = Type.String({ pattern: '^(?!pg_)[a-z_][a-z0-9_]{0,62}$' });
const Url = Type.String({ pattern: '^https?://[^\\s]+$' });
const Port = Type.Integer({ minimum: 1, maximum: 65535 });

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
  reaperIntervalSeconds: Type.Integer({ minimum: 1, maximum: 3600 }),
  managedRole: RoleName,
  metricsPort: Type.Optional(Port),
  rateLimitIp: Type.Integer({ minimum: 1 }),
  rateLimitIdentity: Type.Integer({ minimum: 1 }),
  scramIterations: Type.Integer({ minimum: 1, maximum: 1_000_000 }),
  host: Type.String({ minLength: 1 }),
  port: Type.Integer({ minimum: 0, maximum: 65535 }),
  logLevel: Type.Union(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'].map((l) => Type.Literal(l))),
});

export type Config = Static<typeof ConfigSchema>;
export type IssuerConfig = Static<typeof IssuerSchema>;
export type AdminRule = Static<typeof AdminSchema>;

export class ConfigError extends Error {
  constructor(readonly variable: string, reason: string) {
    super(`${variable}: ${reason}`);
    this.name = 'ConfigError';
  }
}

type Env = Record<string, string | undefined>;

// Which environment variable feeds each config field, so errors name what the operator set.
const ENV_NAMES: Record<keyof Config, string> = {
  databaseUrl: 'DATABASE_URL',
  issuers: 'BROKER_ISSUERS',
  audience: 'BROKER_AUDIENCE',
  admins: 'BROKER_ADMINS',
  publicPgHost: 'BROKER_PUBLIC_PG_HOST',
  publicPgPort: 'BROKER_PUBLIC_PG_PORT',
  reaperIntervalSeconds: 'BROKER_REAPER_INTERVAL',
  managedRole: 'BROKER_MANAGED_ROLE',
  metricsPort: 'BROKER_METRICS_PORT',
  rateLimitIp: 'BROKER_RATE_LIMIT_IP',
  rateLimitIdentity: 'BROKER_RATE_LIMIT_IDENTITY',
  scramIterations: 'BROKER_SCRAM_ITERATIONS',
  host: 'HOST',
  port: 'PORT',
  logLevel: 'LOG_LEVEL',
};

function required(env: Env, name: string): string {
  const value = env[name]?.trim();
  if (!value) throw new ConfigError(name, 'is required');
  return value;
}

function integer(env: Env, name: string, fallback?: number): number | undefined {
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  if (!/^-?\d+$/.test(raw)) throw new ConfigError(name, `must be a whole number, got ${JSON.stringify(raw)}`);
  return Number(raw);
}

function json(env: Env, name: string, raw: string): unknown {
  try {
    return JSON.parse(raw);
  } catch {
    throw new ConfigError(name, 'is not valid JSON');
  }
}

function parseIssuers(env: Env): unknown {
  const raw = required(env, 'BROKER_ISSUERS');
  if (raw.startsWith('[')) return json(env, 'BROKER_ISSUERS', raw);
  return raw.split(',').map((s) => s.trim()).filter(Boolean).map((issuer) => ({ issuer }));
}

function databaseHostPort(url: string): { host: string; port: number } {
  try {
    const parsed = new URL(url);
    return { host: parsed.hostname || 'localhost', port: parsed.port ? Number(parsed.port) : 5432 };
  } catch {
    throw new ConfigError('DATABASE_URL', 'is not a valid URL');
  }
}

function describeError(path: string, message: string): ConfigError {
  const field = path.split('/')[1] as keyof Config | undefined;
  const variable = (field && ENV_NAMES[field]) || 'configuration';
  const where = path.split('/').slice(2).join('/');
  return new ConfigError(variable, where ? `${where} ${message}` : message);
}

export function loadConfig(env: Env = process.env): Config {
  const databaseUrl = required(env, 'DATABASE_URL');
  const dbTarget = databaseHostPort(databaseUrl);
  const candidate = {
    databaseUrl,
    issuers: parseIssuers(env),
    audience: required(env, 'BROKER_AUDIENCE'),
    admins: env.BROKER_ADMINS?.trim() ? json(env, 'BROKER_ADMINS', env.BROKER_ADMINS) : [],
    publicPgHost: env.BROKER_PUBLIC_PG_HOST?.trim() || dbTarget.host,
    publicPgPort: integer(env, 'BROKER_PUBLIC_PG_PORT', dbTarget.port),
    reaperIntervalSeconds: integer(env, 'BROKER_REAPER_INTERVAL', 10),
    managedRole: env.BROKER_MANAGED_ROLE?.trim() || 'credential_broker_managed',
    metricsPort: integer(env, 'BROKER_METRICS_PORT'),
    rateLimitIp: integer(env, 'BROKER_RATE_LIMIT_IP', 600),
    rateLimitIdentity: integer(env, 'BROKER_RATE_LIMIT_IDENTITY', 120),
    scramIterations: integer(env, 'BROKER_SCRAM_ITERATIONS', 4096),
    host: env.HOST?.trim() || '0.0.0.0',
    port: integer(env, 'PORT', 8080),
    logLevel: env.LOG_LEVEL?.trim() || 'info',
  };
  if (candidate.metricsPort === undefined) delete candidate.metricsPort;
  const first = Value.Errors(ConfigSchema, candidate).First();
  if (first) throw describeError(first.path, first.message);
  const config = candidate as Config;
  const seen = new Set<string>();
  for (const entry of config.issuers) {
    if (seen.has(entry.issuer)) throw new ConfigError('BROKER_ISSUERS', `lists ${entry.issuer} twice`);
    seen.add(entry.issuer);
  }
  for (const admin of config.admins) {
    if (!seen.has(admin.issuer)) throw new ConfigError('BROKER_ADMINS', `issuer ${admin.issuer} is not in BROKER_ISSUERS`);
    if (Object.keys(admin.claims).length === 0) throw new ConfigError('BROKER_ADMINS', 'every entry must bind at least one claim');
  }
  return config;
}

/** The audience a token from this issuer must carry. */
export function audienceFor(config: Config, issuer: string): string {
  return config.issuers.find((i) => i.issuer === issuer)?.audience ?? config.audience;
}
