import { ValueErrorType, type ValueError } from '@sinclair/typebox/value';
import type { Config } from './config.js';

// How a bad setting is reported: one line that names the variable and says what to write.

export class ConfigError extends Error {
  constructor(readonly variable: string, reason: string) {
    super(`${variable}: ${reason}`);
    this.name = 'ConfigError';
  }
}

// Which environment variable feeds each config field, so errors name what the operator set.
export const ENV_NAMES: Record<keyof Config, string> = {
  databaseUrl: 'DATABASE_URL',
  issuers: 'BROKER_ISSUERS',
  audience: 'BROKER_AUDIENCE',
  admins: 'BROKER_ADMINS',
  publicPgHost: 'BROKER_PUBLIC_PG_HOST',
  publicPgPort: 'BROKER_PUBLIC_PG_PORT',
  reaperIntervalSeconds: 'BROKER_REAPER_INTERVAL',
  grantRecheckSeconds: 'BROKER_GRANT_RECHECK_INTERVAL',
  managedRole: 'BROKER_MANAGED_ROLE',
  metricsPort: 'BROKER_METRICS_PORT',
  rateLimitIp: 'BROKER_RATE_LIMIT_IP',
  rateLimitIdentity: 'BROKER_RATE_LIMIT_IDENTITY',
  trustProxy: 'BROKER_TRUST_PROXY',
  dbPoolSize: 'BROKER_DB_POOL_SIZE',
  scramIterations: 'BROKER_SCRAM_ITERATIONS',
  lockTimeoutSeconds: 'BROKER_LOCK_TIMEOUT',
  queryTimeoutSeconds: 'BROKER_QUERY_TIMEOUT',
  host: 'HOST',
  port: 'PORT',
  logLevel: 'LOG_LEVEL',
};

/** The value as the operator wrote it, cut short: for settings that hold no secret. */
export function quoted(raw: string): string {
  return JSON.stringify(raw.length > 40 ? `${raw.slice(0, 40)}…` : raw);
}

export const MANAGED_ROLE_RULE = 'must be a lowercase identifier ([a-z_][a-z0-9_]*, at most 59 characters, leaving room for the _cNN suffix of its creator roles) not starting with pg_, which PostgreSQL reserves';

// What one entry of each list looks like, for errors about the list or an entry's shape.
const ENTRY_SHAPES: Partial<Record<keyof Config, string>> = {
  issuers: '{"issuer": "https://…", "jwks_uri"?: "https://…", "audience"?: "…"}',
  admins: '{"issuer": "https://…", "claims": {"sub": "pattern", …}}',
};

function jsonType(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`;
}

/**
 * TypeBox's messages name the schema rule ("Expected string length greater or equal to 1",
 * "Expected union value"), not what the operator should write; `leaf` is the path inside an entry.
 */
function reasonFor(field: keyof Config, leaf: string, error: ValueError): string {
  const shape = ENTRY_SHAPES[field];
  switch (true) {
    case field === 'databaseUrl':
      return 'must be a postgres:// or postgresql:// URL';
    case field === 'managedRole':
      return MANAGED_ROLE_RULE;
    case field === 'logLevel':
      return `must be one of ${(error.schema.anyOf as Array<{ const: string }>).map((s) => s.const).join(', ')}`;
    case field === 'issuers' && error.type === ValueErrorType.ArrayMinItems:
      return 'must list at least one issuer';
    case shape !== undefined && leaf === '' && error.type === ValueErrorType.Array:
      return `must be a JSON array of ${shape} objects, not ${jsonType(error.value)}`;
    case shape !== undefined && leaf === '':
      return `must be an object ${shape}, not ${jsonType(error.value)}`;
    case error.type === ValueErrorType.ObjectAdditionalProperties:
      return `unknown field ${JSON.stringify(leaf)} (an entry is ${shape})`;
    case error.type === ValueErrorType.ObjectRequiredProperty:
      return `${leaf} is required`;
    case leaf === 'issuer' || leaf === 'jwks_uri':
      return `${leaf} must be an http(s) URL`;
    case leaf === 'audience':
      return 'audience must be a non-empty string';
    case leaf === 'claims':
      return `claims must be an object mapping claim names to patterns, not ${jsonType(error.value)}`;
    case leaf.startsWith('claims/'): {
      const claim = leaf.slice('claims/'.length).replace(/~1/g, '/').replace(/~0/g, '~');
      return `claim ${JSON.stringify(claim)} must be a pattern or a non-empty list of patterns (strings)`;
    }
    default:
      return leaf ? `${leaf}: ${error.message}` : error.message;
  }
}

/** The first schema error as the operator should read it: which variable, which entry, what to write. */
export function describeSchemaError(error: ValueError): ConfigError {
  const parts = error.path.split('/');
  const field = parts[1] as keyof Config;
  const variable = ENV_NAMES[field] ?? 'configuration';
  const index = parts[2] !== undefined && /^\d+$/.test(parts[2]) ? Number(parts[2]) : null;
  const leaf = parts.slice(index === null ? 2 : 3).join('/');
  const text = reasonFor(field, leaf, error);
  return new ConfigError(variable, index === null ? text : `entry ${index + 1}: ${text}`);
}

/**
 * JSON.parse's complaint, with V8's character offset given as a line and column: a JSON value
 * in a ConfigMap is often a block of several lines.
 */
export function jsonProblem(message: string, text: string): string {
  const lowered = (m: string) => m.charAt(0).toLowerCase() + m.slice(1);
  const positioned = /^(.*?)(?: in JSON)? at position (\d+)/.exec(message);
  if (!positioned) return lowered(message.replace(/ is not valid JSON$/, ''));
  const lines = text.slice(0, Number(positioned[2])).split('\n');
  return `${lowered(positioned[1])} at line ${lines.length}, column ${lines[lines.length - 1].length + 1}`;
}
