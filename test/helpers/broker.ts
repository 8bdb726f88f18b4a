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
  /** Every bearer token received and password issued so far; close() fails if any reached a log. */
  secrets: Set<string>;
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
  requestTimeoutMs?: number;
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

/** The reaper suites' settings: reaping every second, the rate limits out of the way. */
export const REPLICA_ENV = { BROKER_REAPER_INTERVAL: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' };

/**
 * Two replicas of one deployment, each its own app, pool and reaper, over one PostgreSQL and one
 * issuer, with REPLICA_ENV and a policy `bulk` admitting `rep:*`. The second closes first.
 */
export async function startReplicas(): Promise<{ b1: TestBroker; b2: TestBroker; close(): Promise<void> }> {
  const b1 = await startTestBroker({ env: REPLICA_ENV });
  const b2 = await startTestBroker({ pg: b1.pg, issuer: b1.issuer, env: REPLICA_ENV });
  await b1.putPolicy('bulk', { claims: { sub: 'rep:*' }, max_active_leases: 100 });
  return { b1, b2, close: async () => { await b2.close(); await b1.close(); } };
}

/** A broker app on app.inject over a real PostgreSQL and a real JWKS server. */
export async function startTestBroker(opts: TestBrokerOptions = {}): Promise<TestBroker> {
  const pgs = opts.pg ?? (await startPostgres());
  const issuer = opts.issuer ?? (await startIssuer());
  const config = loadConfig(brokerEnv(pgs, issuer, opts.env));
  const logs: string[] = [];
  const logger = createLogger(config.logLevel, { write: (line: string) => void logs.push(line) });
  await migrate(config.databaseUrl, config.managedRole, logger);
  const app = await buildApp(config, { logger, requestTimeoutMs: opts.requestTimeoutMs });
  const secrets = trackSecrets(app);
  secrets.add(decodeURIComponent(new URL(config.databaseUrl).password));
  await app.ready();
  const reaper = new Reaper({ pool: app.db, config, log: logger.child({ component: 'reaper' }), metrics: app.metrics });
  const token = (claims: Record<string, unknown> = {}, signOpts?: Parameters<TestIssuer['sign']>[1]) =>
    issuer.sign({ aud: AUDIENCE, sub: 'repo:octo-org/octo-repo:ref:refs/heads/main', ...claims }, signOpts);
  const broker: TestBroker = {
    app, pg: pgs, issuer, config, reaper, logs, token, secrets,
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
      // The policy as GET shows it. Its warnings (the test cluster leaves CONNECT on the broker's
      // database to PUBLIC) are checked in contract.test.ts, where the cluster is closed too.
      const { warnings: _warnings, ...stored } = res.json();
      return stored;
    },
    async close() {
      await reaper.stop();
      await app.close();
      // Every file that uses this helper also proves the secrets invariant for all it did.
      const leaks = findLeaks(secrets, logs, pgs.logLines());
      if (secrets.missed > 0) leaks.push(`${secrets.missed} issued credentials' passwords were not captured, so nobody looked for them`);
      if (!opts.issuer) await issuer.close();
      if (!opts.pg) await pgs.stop();
      if (leaks.length) throw new Error(`secrets check failed: ${leaks.join('; ')}`);
    },
  };
  return broker;
}

/**
 * Records every bearer token the app received and every password it handed out, whether the
 * test went through app.inject or a real socket.
 */
function trackSecrets(app: FastifyInstance): Set<string> & { missed: number } {
  const seen = Object.assign(new Set<string>(), { missed: 0 });
  app.addHook('onRequest', async (request) => {
    const match = /^Bearer\s+(\S+)/i.exec(request.headers.authorization ?? '');
    if (match && match[1].length >= 16) seen.add(match[1]);
  });
  app.addHook('onSend', async (request, reply, payload) => {
    let captured = false;
    if (typeof payload === 'string' && payload.includes('"password"')) {
      const password = (JSON.parse(payload) as { password?: unknown }).password;
      if (typeof password === 'string') captured = !!seen.add(password);
    }
    // A credential handed out that this hook could not read would go unchecked: counted, and
    // close() fails on it rather than passing without having looked.
    if (!captured && request.method === 'POST' && request.url.split('?')[0] === '/credentials' && reply.statusCode === 201) seen.missed++;
    return payload;
  });
  return seen;
}

/** Which secrets (abbreviated) appear in the broker's or PostgreSQL's log. */
export function findLeaks(secrets: Set<string>, brokerLogs: string[], serverLogs: string[]): string[] {
  const broker = brokerLogs.join('\n');
  const server = serverLogs.join('\n');
  const leaks: string[] = [];
  for (const secret of secrets) {
    // A JWT's signature alone is as good as a leak of the token.
    const parts = secret.split('.');
    const needles = [secret, ...(parts.length === 3 && parts[2].length > 20 ? [parts[2]] : [])];
    for (const needle of needles) {
      if (broker.includes(needle)) leaks.push(`broker log holds ${needle.slice(0, 8)}…`);
      if (server.includes(needle)) leaks.push(`server log holds ${needle.slice(0, 8)}…`);
    }
  }
  return [...new Set(leaks)];
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

/** Polls `fn` until it returns something truthy; fails naming `what` after `timeoutMs`. */
export async function waitFor<T>(what: string, fn: () => Promise<T>, timeoutMs = 10_000, everyMs = 50): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value) return value as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** Resolves just after an RFC 3339 expiry has passed on this clock (and PostgreSQL's, same host). */
export async function untilPast(expiresAt: string, slackMs = 150): Promise<void> {
  const wait = new Date(expiresAt).getTime() - Date.now() + slackMs;
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
}

/** One API call through app.inject; `body` is the parsed JSON (null when empty). */
export async function api(
  b: TestBroker, method: 'GET' | 'POST' | 'PUT' | 'DELETE', url: string, token?: string, payload?: unknown,
): Promise<{ status: number; body: any }> {
  const res = await b.app.inject({
    method, url, payload: payload as any,
    headers: token ? { authorization: `Bearer ${token}` } : {},
  });
  return { status: res.statusCode, body: res.body ? res.json() : null };
}

export async function roleExists(pgs: TestPostgres, name: string): Promise<boolean> {
  const rows = await pgs.query('SELECT 1 FROM pg_roles WHERE rolname = $1', [name]);
  return rows.length === 1;
}

/** The lease row as stored, read as superuser from `database` (default: the broker database). */
export async function leaseRow(pgs: TestPostgres, id: string, database = pgs.database): Promise<any> {
  const [row] = await pgs.query('SELECT * FROM broker.leases WHERE id = $1', [id], database);
  return row;
}

/** Audit event types recorded for one lease, oldest first. */
export async function auditTypes(pgs: TestPostgres, leaseId: string, database = pgs.database): Promise<string[]> {
  const rows = await pgs.query<{ type: string }>('SELECT type FROM broker.audit_events WHERE lease_id = $1 ORDER BY id', [leaseId], database);
  return rows.map((r) => r.type);
}

/** broker_credentials_denied_total for one policy and reason, as /metrics shows it (0 when absent). */
export async function deniedCount(b: TestBroker, policy: string, reason: string): Promise<number> {
  const res = await b.app.inject({ method: 'GET', url: '/metrics' });
  const line = res.body.split('\n').find((l) => l.startsWith(`broker_credentials_denied_total{policy="${policy}",reason="${reason}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}
