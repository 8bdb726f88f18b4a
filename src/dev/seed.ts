import pg from 'pg';
import { generatePassword, scramVerifier } from '../postgres/scram.js';
import { escapeLit } from '../postgres/sql.js';

export interface SeededCluster {
  brokerRole: string;
  brokerUrl: string;
  /** The database credentials are issued for. */
  database: string;
  groupRole: string;
}

interface SuperuserAccess {
  host: string;
  port: number;
  version: number;
  superuserUrl(database?: string): string;
}

async function asSuperuser(local: SuperuserAccess, database: string, statements: string[]): Promise<void> {
  const client = new pg.Client({ connectionString: local.superuserUrl(database) });
  client.on('error', () => undefined);
  await client.connect();
  try {
    for (const sql of statements) await client.query(sql);
  } finally {
    await client.end();
  }
}

/**
 * Prepares a local cluster the way the README tells operators to: a broker role with CREATEROLE
 * (never SUPERUSER), its own database, a NOLOGIN group role it may grant, and sample data. Safe
 * to run again on a persistent dev cluster; the broker password is rotated each time and sent
 * as a SCRAM verifier.
 */
export async function seedLocalCluster(local: SuperuserAccess): Promise<SeededCluster> {
  const password = generatePassword();
  const verifier = escapeLit(scramVerifier(password, 4096));
  // The README's least-privilege setup: ADMIN OPTION only on 16+, nothing beyond CREATEROLE on 15.
  const groupGrant = local.version >= 16 ? 'GRANT app_readers TO credential_broker WITH ADMIN OPTION, INHERIT FALSE, SET FALSE' : 'SELECT 1';
  await asSuperuser(local, 'postgres', [
    `DO $$ BEGIN
       IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'credential_broker') THEN CREATE ROLE credential_broker LOGIN CREATEROLE; END IF;
       IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_readers') THEN CREATE ROLE app_readers NOLOGIN; END IF;
     END $$`,
    `ALTER ROLE credential_broker PASSWORD ${verifier}`,
    groupGrant,
  ]);
  for (const db of [{ name: 'broker', owner: 'credential_broker' }, { name: 'app', owner: 'postgres' }]) {
    const client = new pg.Client({ connectionString: local.superuserUrl('postgres') });
    client.on('error', () => undefined);
    await client.connect();
    const { rowCount } = await client.query('SELECT 1 FROM pg_database WHERE datname = $1', [db.name]);
    if (!rowCount) await client.query(`CREATE DATABASE ${db.name} OWNER ${db.owner}`);
    await client.end();
  }
  // As the README advises: issued roles cannot reach the broker's database or its advisory locks.
  await asSuperuser(local, 'postgres', ['REVOKE CONNECT, TEMPORARY ON DATABASE broker FROM PUBLIC']);
  await asSuperuser(local, 'app', [
    'CREATE SCHEMA IF NOT EXISTS demo',
    'CREATE TABLE IF NOT EXISTS demo.orders (id int PRIMARY KEY, item text NOT NULL, placed_at timestamptz NOT NULL DEFAULT now())',
    `INSERT INTO demo.orders (id, item) VALUES (1, 'sprocket'), (2, 'gear'), (3, 'flange') ON CONFLICT DO NOTHING`,
    'GRANT USAGE ON SCHEMA demo TO app_readers',
    'GRANT SELECT ON ALL TABLES IN SCHEMA demo TO app_readers',
  ]);
  return {
    brokerRole: 'credential_broker',
    brokerUrl: `postgres://credential_broker:${encodeURIComponent(password)}@${local.host}:${local.port}/broker`,
    database: 'app',
    groupRole: 'app_readers',
  };
}
