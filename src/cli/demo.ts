import pg from 'pg';
import { loadConfig } from '../config.js';
import { startDevIssuer } from '../dev/issuer.js';
import { seedLocalCluster, type SeededCluster } from '../dev/seed.js';
import { startLocalPostgres } from '../dev/embedded-postgres.js';
import { createLogger } from '../logger.js';
import { startBroker } from '../server.js';

const GREEN = process.stdout.isTTY ? '\x1b[32m' : '';
const RED = process.stdout.isTTY ? '\x1b[31m' : '';
const DIM = process.stdout.isTTY ? '\x1b[2m' : '';
const RESET = process.stdout.isTTY ? '\x1b[0m' : '';

class Steps {
  failures = 0;
  async run<T>(title: string, fn: () => Promise<[T, string]>): Promise<T | undefined> {
    try {
      const [value, detail] = await fn();
      console.log(`${GREEN}✓${RESET} ${title}${detail ? ` ${DIM}${detail}${RESET}` : ''}`);
      return value;
    } catch (err) {
      this.failures++;
      console.log(`${RED}✗${RESET} ${title}: ${(err as Error).message}`);
      return undefined;
    }
  }
}

async function call(url: string, token: string, method: string, body?: unknown): Promise<{ status: number; json: any }> {
  const res = await fetch(url, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, json: text ? JSON.parse(text) : null };
}

function expect(cond: unknown, message: string): asserts cond {
  if (!cond) throw new Error(message);
}

/**
 * The scripted walk-through behind `npm run demo`: a throwaway PostgreSQL, a development-only
 * issuer and the broker, then issue → login → query → denial → renew → revoke.
 */
export async function runDemo(): Promise<boolean> {
  const steps = new Steps();
  console.log('pg-credential-broker demo: everything runs locally and is thrown away at the end.\n');
  const cleanup: Array<() => Promise<unknown>> = [];
  try {
    const local = await steps.run('started an embedded PostgreSQL', async () => {
      const server = await startLocalPostgres();
      cleanup.unshift(() => server.stop());
      return [server, `(PostgreSQL ${server.version} on 127.0.0.1:${server.port})`];
    });
    if (!local) return false;
    const seeded = (await steps.run('created a least-privilege broker role, a group role and sample data', async () => {
      const s = await seedLocalCluster(local);
      return [s, `(broker role "${s.brokerRole}" has CREATEROLE, not SUPERUSER; group "${s.groupRole}" may SELECT demo.orders)`];
    })) as SeededCluster | undefined;
    const issuer = await steps.run('started a development-only OIDC issuer on 127.0.0.1', async () => {
      const i = await startDevIssuer();
      cleanup.unshift(() => i.close());
      return [i, `(${i.issuer})`];
    });
    if (!seeded || !issuer) return false;
    const config = loadConfig({
      DATABASE_URL: seeded.brokerUrl,
      BROKER_ISSUERS: JSON.stringify([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }]),
      BROKER_AUDIENCE: 'pg-broker',
      BROKER_ADMINS: JSON.stringify([{ issuer: issuer.issuer, claims: { sub: 'admin:*' } }]),
      BROKER_REAPER_INTERVAL: '2',
      HOST: '127.0.0.1',
      PORT: '0',
      LOG_LEVEL: 'silent',
    });
    const broker = await steps.run('started the broker (migrations applied, reaper running)', async () => {
      const b = await startBroker(config, { logger: createLogger('silent') });
      cleanup.unshift(() => b.close());
      return [b, `(${b.url})`];
    });
    if (!broker) return false;
    const api = broker.url;
    const admin = await issuer.mint({ sub: 'admin:demo' });
    const ciClaims = { sub: 'repo:octo-org/octo-repo:ref:refs/heads/main', repository: 'octo-org/octo-repo', ref: 'refs/heads/main' };
    await steps.run('created policy "ci-readonly" for octo-org/octo-repo on main', async () => {
      const res = await call(`${api}/policies/ci-readonly`, admin, 'PUT', {
        issuer: issuer.issuer,
        claims: { repository: 'octo-org/octo-repo', ref: 'refs/heads/main' },
        grant_role: seeded.groupRole,
        database: seeded.database,
        default_ttl: 300,
        max_ttl: 900,
      });
      expect(res.status === 201, `PUT /policies answered ${res.status}: ${JSON.stringify(res.json)}`);
      return [null, '(claims: repository=octo-org/octo-repo, ref=refs/heads/main)'];
    });
    const ciToken = await issuer.mint(ciClaims);
    const cred = await steps.run('a CI job traded its OIDC token for a credential', async () => {
      const res = await call(`${api}/credentials`, ciToken, 'POST', { ttl: 120 });
      expect(res.status === 201, `POST /credentials answered ${res.status}: ${JSON.stringify(res.json)}`);
      return [res.json, `(user ${res.json.username}, expires ${res.json.expires_at})`];
    });
    if (!cred) return false;
    const session = new pg.Client({ host: local.host, port: local.port, user: cred.username, password: cred.password, database: cred.database });
    session.on('error', () => undefined);
    await steps.run('logged in to PostgreSQL with it and ran a query', async () => {
      await session.connect();
      const { rows } = await session.query('SELECT count(*)::int AS n FROM demo.orders');
      return [null, `(SELECT count(*) FROM demo.orders → ${rows[0].n})`];
    });
    await steps.run('a write outside the grant was refused by PostgreSQL', async () => {
      const err = await session.query('DELETE FROM demo.orders').then(() => null, (e: { code?: string }) => e);
      expect(err?.code === '42501', 'DELETE was not refused');
      return [null, '(42501 permission denied)'];
    });
    await steps.run('a token from another repository was denied, and told why', async () => {
      const other = await issuer.mint({ sub: 'repo:evil-org/fork:ref:refs/heads/main', repository: 'evil-org/fork', ref: 'refs/heads/main' });
      const denied = await call(`${api}/credentials`, other, 'POST', {});
      expect(denied.status === 403, `expected 403, got ${denied.status}`);
      const why = await call(`${api}/policies/evaluate`, other, 'POST');
      const failed = why.json.policies[0]?.failed_claims[0];
      expect(failed?.claim === 'repository', 'evaluate did not name the failing claim');
      return [null, `(403; evaluate: claim "${failed.claim}" is ${JSON.stringify(failed.value)}, policy wants ${JSON.stringify(failed.patterns)})`];
    });
    await steps.run('renewed the lease', async () => {
      const res = await call(`${api}/leases/${cred.lease_id}/renew`, ciToken, 'POST', { ttl: 600 });
      expect(res.status === 200 && res.json.expires_at > cred.expires_at, `renew answered ${res.status}`);
      return [null, `(expires ${cred.expires_at} → ${res.json.expires_at})`];
    });
    await steps.run('revoked the lease while the session was still open', async () => {
      const res = await call(`${api}/leases/${cred.lease_id}`, admin, 'DELETE');
      expect(res.status === 200 && res.json.state === 'revoked', `DELETE answered ${res.status} ${res.json?.state}`);
      return [null, '(DELETE /leases/{id} → state revoked)'];
    });
    await steps.run('the live session was killed and the role is gone', async () => {
      const err = await session.query('SELECT 1').then(() => null, (e: Error) => e);
      expect(err, 'the session still works');
      const login = await new pg.Client({ host: local.host, port: local.port, user: cred.username, password: cred.password, database: cred.database });
      login.on('error', () => undefined);
      const loginErr = await login.connect().then(() => login.end().then(() => null), (e: { code?: string }) => e);
      expect(loginErr, 'a new login still works');
      return [null, `(next query: "${err.message}"; new login: ${(loginErr as { code?: string }).code})`];
    });
    await session.end().catch(() => undefined);
  } finally {
    for (const step of cleanup) await step().catch(() => undefined);
  }
  console.log(steps.failures === 0 ? `\n${GREEN}demo finished: every step behaved as expected${RESET}` : `\n${RED}demo failed: ${steps.failures} step(s) misbehaved${RESET}`);
  return steps.failures === 0;
}
