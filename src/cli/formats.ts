import type { CredentialBody } from '../schemas/lease.js';

export const FORMATS = ['env', 'json', 'uri', 'pgpass', 'dotenv'] as const;
export type Format = (typeof FORMATS)[number];

/** The libpq environment a credential maps to. */
export function pgEnvironment(c: CredentialBody): Record<string, string> {
  return {
    PGHOST: c.host,
    PGPORT: String(c.port),
    PGUSER: c.username,
    PGPASSWORD: c.password,
    PGDATABASE: c.database,
    DATABASE_URL: c.uri,
  };
}

export function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

// pgpass fields escape ':' and '\' with a backslash.
function pgpassField(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/:/g, '\\:');
}

export function formatCredential(c: CredentialBody, format: Format): string {
  switch (format) {
    case 'json':
      return `${JSON.stringify(c, null, 2)}\n`;
    case 'uri':
      return `${c.uri}\n`;
    case 'pgpass':
      return `${[c.host, String(c.port), c.database, c.username, c.password].map(pgpassField).join(':')}\n`;
    case 'env':
      return Object.entries({ ...pgEnvironment(c), PG_BROKER_LEASE_ID: c.lease_id, PG_BROKER_EXPIRES_AT: c.expires_at })
        .map(([k, v]) => `export ${k}=${shellQuote(v)}\n`).join('');
    case 'dotenv':
      return Object.entries({ ...pgEnvironment(c), PG_BROKER_LEASE_ID: c.lease_id, PG_BROKER_EXPIRES_AT: c.expires_at })
        .map(([k, v]) => `${k}=${JSON.stringify(v)}\n`).join('');
  }
}
