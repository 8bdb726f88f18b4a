import type { FastifyInstance } from 'fastify';
import pg from 'pg';
import { buildApp } from '../../src/app.js';
import { loadConfig, type Config } from '../../src/config.js';
import { createLogger } from '../../src/logger.js';
import { migrate } from '../../src/postgres/migrate.js';
import { Reaper } from '../../src/reaper/reaper.js';
import { startIssuer, type TestIssuer } from './issuer.js';
import { startPostgres, type TestPostgres } from './postgres.js';

export const AUDIENCE = 'pg-broker';
export const ADMIN_SUB = 'admin:root';

export interface TestBroker {
  app: FastifyInstance;
  pg: TestPostgres;
  issuer: TestIssuer;
  config: Config;
  reaper: Reaper;
  /** Every JSON log line the broker wrote. */
  logs: string[];
  token(claims?: Record<string, unknown>, opts?: Parameters<TestIssuer['sign']>[1]): Promise<string>;
  adminToken(): Promise<string>;
  /** POST /credentials through app.inject. */
  issue(token: string, body?: Record<string, unknown>): Promise<{ status: number; body: any; headers: Record<string, unknown> }>;
  /** PUT /policies/{name} as admin, asserting success. */
  putPolicy(name: string, policy: Record<string, unknown>): Promise<any>;
  close(): Promise<void>;
}

export interface TestBrokerOptions {
  pg?: TestPostgres;
  issuer?: TestIssuer;
  env?: Record<string, string>;
}

export function brokerEnv(pgs: TestPostgres, issuer: TestIssuer, extra: Record<string, string> = {}): Record<string, string> {
  return {
    DATABASE_URL: pgs.brokerUrl,
    BROKER_ISSUERS: JSON.stringify([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }]),
    BROKER_AUDIENCE: AUDIENCE,
    BROKER_ADMINS: JSON.stringify([{ issuer: issuer.issuer, claims: { sub: 'admin:*' } }]),
    BROKER_SCRAM_ITERATIONS: '16',
    LOG_LEVEL: 'debug',
    ...extra,
  };
}

/** A broker app on app.inject over a real PostgreSQL and a real JWKS server. */
export async function startTestBroker(opts: TestBrokerOptions = {}): Promise<TestBroker> {
  const pgs = opts.pg ?? (await startPostgres());
  const issuer = opts.issuer ?? (await startIssuer());
  const config = loadConfig(brokerEnv(pgs, issuer, opts.env));
  const logs: string[] = [];
  const logger = createLogger(config.logLevel, { write: (line: string) => void logs.push(line) });
  await migrate(config.databaseUrl, config.managedRole, logger);
  const app = await buildApp(config, { logger });
  await app.ready();
  const reaper = new Reaper({ pool: app.db, config, log: logger.child({ component: 'reaper' }), metrics: app.metrics, brokerRole: () => app.brokerRole() });
  const token = (claims: Record<string, unknown> = {}, signOpts?: Parameters<TestIssuer['sign']>[1]) =>
    issuer.sign({ aud: AUDIENCE, sub: 'repo:octo-org/octo-repo:ref:refs/heads/main', ...claims }, signOpts);
  const broker: TestBroker = {
    app, pg: pgs, issuer, config, reaper, logs, token,
    adminToken: () => token({ sub: ADMIN_SUB }),
    async issue(tok, body = {}) {
      const res = await app.inject({ method: 'POST', url: '/credentials', headers: { authorization: `Bearer ${tok}` }, payload: body });
      return { status: res.statusCode, body: res.json(), headers: res.headers };
    },
    async putPolicy(name, policy) {
      const res = await app.inject({
        method: 'PUT', url: `/policies/${name}`, headers: { authorization: `Bearer ${await broker.adminToken()}` },
        payload: { issuer: issuer.issuer, database: pgs.database, grant_role: 'app_readers', ...policy },
      });
      if (res.statusCode !== 200 && res.statusCode !== 201) throw new Error(`PUT /policies/${name}: ${res.statusCode} ${res.body}`);
      return res.json();
    },
    async close() {
      await reaper.stop();
      await app.close();
      if (!opts.issuer) await issuer.close();
      if (!opts.pg) await pgs.stop();
    },
  };
  return broker;
}

/** Logs in with an issued credential; the caller must end() the client. */
export async function connectAs(pgs: TestPostgres, cred: { username: string; password: string; database?: string }): Promise<pg.Client> {
  const client = new pg.Client({ host: pgs.host, port: pgs.port, user: cred.username, password: cred.password, database: cred.database ?? pgs.database });
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

/** Expects a login to fail and returns the SQLSTATE it failed with. */
export async function loginError(pgs: TestPostgres, cred: { username: string; password: string; database?: string }): Promise<string | undefined> {
  try {
    const client = await connectAs(pgs, cred);
    await client.end();
    return undefined;
  } catch (err) {
    return (err as { code?: string }).code ?? 'ERROR';
  }
}
