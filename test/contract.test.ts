import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type pg from 'pg';
import { REQUEST_TIMEOUT_MS } from '../src/app.js';
import { loadConfig } from '../src/config.js';
import { createLogger } from '../src/logger.js';
import { policiesRefusedNow } from '../src/policy/repository.js';
import { brokerDatabaseOpenTo } from '../src/postgres/exposure.js';
import { startBroker, type RunningBroker } from '../src/server.js';
import { AUDIENCE, api, brokerEnv, connectAs, leaseRow, loginError, roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';
import { freePort } from './helpers/ports.js';

let b: TestBroker;
let admin: string;
const UNLIMITED = { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' };

before(async () => {
  b = await startTestBroker({ env: UNLIMITED });
  admin = await b.adminToken();
});
after(async () => b?.close());

async function issueOk(sub: string, body: Record<string, unknown> = {}): Promise<any> {
  const res = await b.issue(await b.token({ sub }), body);
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

const pick = (o: Record<string, unknown>, keys: string[]) => Object.fromEntries(keys.map((k) => [k, o[k]]));
// Computed here rather than with the broker's own rounding (leases/expiry.ts), so a wrong one there fails. PostgreSQL's clock is this host's here.
const ceilSecond = (ms: number) => Math.ceil(ms / 1000) * 1000;

describe('policies', () => {
  test('connection_limit becomes the role\'s CONNECTION LIMIT, enforced by PostgreSQL; omitted it is -1 (none)', async () => {
    await b.putPolicy('conn-limited', { claims: { sub: 'conn:limited' }, connection_limit: 2 });
    await b.putPolicy('conn-default', { claims: { sub: 'conn:default' } });
    const limited = await issueOk('conn:limited');
    const open = await issueOk('conn:default');
    const limitOf = async (name: string) => (await b.pg.query('SELECT rolconnlimit FROM pg_roles WHERE rolname = $1', [name]))[0].rolconnlimit;
    assert.equal(await limitOf(limited.username), 2);
    assert.equal(await limitOf(open.username), -1);
    const sessions: pg.Client[] = [];
    try {
      sessions.push(await connectAs(b.pg, limited), await connectAs(b.pg, limited));
      await assert.rejects(connectAs(b.pg, limited), { code: '53300' }, 'a third session is refused');
      for (let i = 0; i < 3; i++) sessions.push(await connectAs(b.pg, open));
    } finally {
      await Promise.all(sessions.map((s) => s.end().catch(() => undefined)));
    }
  });

  test('PUT answers 201 on create and 200 on replace; omitted fields take their defaults, on a replace too', async () => {
    const put = (body: Record<string, unknown>) =>
      api(b, 'PUT', '/policies/put-defaults', admin, { issuer: b.issuer.issuer, database: b.pg.database, grant_role: 'app_readers', ...body });
    const get = async () => {
      const res = await api(b, 'GET', '/policies/put-defaults', admin);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      return res.body;
    };
    const defaults = { description: '', audience: null, default_ttl: 900, max_ttl: 3600, max_active_leases: 10, connection_limit: -1, assume_role: false, enabled: true };
    const keys = Object.keys(defaults);
    const created = await put({ claims: { sub: 'put:*' } });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const first = await get();
    // Plus its warnings: the test cluster leaves CONNECT on the broker's database to PUBLIC.
    const { warnings, ...stored } = created.body;
    assert.deepEqual(first, stored, 'PUT answers with the policy as GET shows it');
    assert.equal(warnings.length, 1);
    assert.deepEqual(pick(first, keys), defaults);
    assert.deepEqual(first.claims, { sub: 'put:*' });

    const custom = { description: 'nightly reports', audience: 'reports', default_ttl: 60, max_ttl: 120, max_active_leases: 2, connection_limit: 5, assume_role: true, enabled: false };
    const replaced = await put({ claims: { sub: ['put:a', 'put:b'] }, ...custom });
    assert.equal(replaced.status, 200, JSON.stringify(replaced.body));
    const second = await get();
    assert.deepEqual(pick(second, keys), custom);
    assert.deepEqual(second.claims, { sub: ['put:a', 'put:b'] });
    assert.equal(second.created_at, first.created_at, 'a replace keeps created_at');

    assert.equal((await put({ claims: { sub: 'put:*' } })).status, 200);
    assert.deepEqual(pick(await get(), keys), defaults, 'a replace is not a merge: what it omits returns to the default');
    const events = await b.pg.query(`SELECT type FROM broker.audit_events WHERE policy = 'put-defaults' ORDER BY id`);
    assert.deepEqual(events.map((e) => e.type), ['policy.created', 'policy.updated', 'policy.updated']);
  });

  test('DELETE answers 204, then 404; a lease issued under it keeps working, and can still be revoked', async () => {
    await b.putPolicy('retiring', { claims: { sub: 'retire:*' } });
    const owner = await b.token({ sub: 'retire:svc' });
    const cred = await issueOk('retire:svc');
    const del = await api(b, 'DELETE', '/policies/retiring', admin);
    assert.equal(del.status, 204);
    assert.equal(del.body, null);
    const again = await api(b, 'DELETE', '/policies/retiring', admin);
    assert.equal(again.status, 404);
    assert.equal(again.body.code, 'POLICY_NOT_FOUND');
    assert.equal((await api(b, 'GET', '/policies/retiring', admin)).status, 404);
    assert.equal((await b.issue(owner)).status, 403, 'nothing new is issued under it');

    assert.equal(await loginError(b.pg, cred), undefined, 'the issued role still logs in');
    const listed = await api(b, 'GET', '/leases?policy=retiring', admin);
    assert.deepEqual(listed.body.items.map((l: any) => [l.id, l.state]), [[cred.lease_id, 'active']]);
    assert.equal((await api(b, 'GET', `/leases/${cred.lease_id}`, owner)).body.state, 'active');
    const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal(revoked.body.state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
  });

  test('GET /policies pages by name with {items, next_cursor}, every policy exactly once', async () => {
    for (let i = 0; i < 7; i++) await b.putPolicy(`walk-${i}`, { claims: { sub: 'walk:never' } });
    const expected = (await b.pg.query('SELECT name FROM broker.policies ORDER BY name')).map((r) => r.name);
    assert.ok(expected.length >= 9, `enough policies for several pages (${expected.length})`);
    const names: string[] = [];
    let cursor: string | null = null;
    let pages = 0;
    do {
      const res = await api(b, 'GET', `/policies?limit=3${cursor ? `&cursor=${cursor}` : ''}`, admin);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.deepEqual(Object.keys(res.body).sort(), ['items', 'next_cursor']);
      assert.ok(res.body.items.length <= 3);
      names.push(...res.body.items.map((p: any) => p.name));
      cursor = res.body.next_cursor;
      assert.ok(++pages <= expected.length, 'the walk terminates');
    } while (cursor);
    assert.deepEqual(names, expected, 'in name order, none twice, none left out');
    assert.equal(pages, Math.ceil(expected.length / 3), 'only the last page has next_cursor null');
    assert.equal((await api(b, 'GET', '/policies?cursor=garbage', admin)).status, 400);
    assert.equal((await api(b, 'GET', '/policies', await b.token({ sub: 'walk:never' }))).status, 403);
  });

  test('a policy audience must be in the token aud besides BROKER_AUDIENCE, which stays required', async () => {
    await b.putPolicy('aud-reports', { claims: { sub: 'aud:*' }, audience: 'reports' });
    const both = await b.issue(await b.token({ sub: 'aud:job', aud: [AUDIENCE, 'reports'] }));
    assert.equal(both.status, 201, JSON.stringify(both.body));
    assert.equal(both.body.policy, 'aud-reports');

    const globalOnly = await b.token({ sub: 'aud:job' });
    const refused = await b.issue(globalOnly);
    assert.equal(refused.status, 403);
    assert.equal(refused.body.code, 'NO_POLICY');
    const why = await api(b, 'POST', '/policies/evaluate', globalOnly);
    assert.deepEqual(why.body.policies.find((p: any) => p.name === 'aud-reports'),
      { name: 'aud-reports', admitted: false, reason: 'token audience does not include reports', failed_claims: [] });

    // The policy audience narrows, it does not replace: without BROKER_AUDIENCE the token is not verified at all.
    const policyOnly = await b.issue(await b.token({ sub: 'aud:job', aud: 'reports' }));
    assert.equal(policyOnly.status, 401);
    assert.match(String(policyOnly.headers['www-authenticate']), /token audience is not accepted/);
  });
});

describe('credentials', () => {
  test('without ttl the policy default_ttl applies; max_expires_at is issue time + max_ttl rounded up to a whole second', async () => {
    await b.putPolicy('ttl-defaults', { claims: { sub: 'ttl:*' }, default_ttl: 120, max_ttl: 700 });
    const token = await b.token({ sub: 'ttl:job' });
    const before = Date.now();
    const res = await b.issue(token);
    const after = Date.now();
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const cred = res.body;
    for (const [field, ttl] of [['expires_at', 120], ['max_expires_at', 700]] as const) {
      const at = Date.parse(cred[field]);
      assert.equal(at % 1000, 0, `${field} is a whole second`);
      assert.ok(at >= ceilSecond(before + ttl * 1000) && at <= ceilSecond(after + ttl * 1000), `${field} ${cred[field]} within [${before}, ${after}] + ${ttl} s`);
    }
    assert.equal(Date.parse(cred.max_expires_at) - Date.parse(cred.expires_at), 580_000, 'both counted from the same instant');
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.equal(row.expires_at.toISOString(), cred.expires_at);
    assert.equal(row.max_expires_at.toISOString(), cred.max_expires_at);
    const [issued] = await b.pg.query(`SELECT detail FROM broker.audit_events WHERE lease_id = $1 AND type = 'credential.issued'`, [cred.lease_id]);
    assert.equal(issued.detail.ttl, 120);
  });

  test('the lease records client_ip, user_agent, request_id and only the claims the policy matched', async () => {
    await b.putPolicy('meta', { claims: { sub: 'meta:*', '/ctx/team': 'data-*', groups: 'dba' } });
    const token = await b.token({ sub: 'meta:job', ctx: { team: 'data-eng', office: 'x' }, groups: ['dev', 'dba'], email: 'a@example.test' });
    const res = await b.app.inject({
      method: 'POST', url: '/credentials', payload: {}, remoteAddress: '203.0.113.7',
      // BROKER_TRUST_PROXY is unset here, so X-Forwarded-For must not be believed (README, Behind a proxy).
      headers: { authorization: `Bearer ${token}`, 'user-agent': 'contract-test/1.0 (ci)', 'x-forwarded-for': '198.51.100.9', 'x-request-id': 'chosen-by-client' },
    });
    assert.equal(res.statusCode, 201, res.body);
    const cred = res.json();
    const lease = (await api(b, 'GET', `/leases/${cred.lease_id}`, token)).body;
    assert.equal(lease.client_ip, '203.0.113.7');
    assert.equal(lease.user_agent, 'contract-test/1.0 (ci)');
    assert.match(lease.request_id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/, 'the broker names the request, not the client');
    const logged = b.logs.map((l) => JSON.parse(l)).find((l) => l.msg === 'credential issued' && l.lease_id === cred.lease_id);
    assert.equal(logged?.reqId, lease.request_id, 'the id of this request in the broker log');
    assert.deepEqual(lease.claims, { sub: 'meta:job', '/ctx/team': 'data-eng', groups: ['dev', 'dba'] });
    assert.deepEqual(pick(await leaseRow(b.pg, cred.lease_id), ['client_ip', 'user_agent', 'request_id', 'claims']),
      pick(lease, ['client_ip', 'user_agent', 'request_id', 'claims']));
    const [audit] = await b.pg.query(`SELECT request_id, client_ip FROM broker.audit_events WHERE lease_id = $1`, [cred.lease_id]);
    assert.deepEqual(audit, { request_id: lease.request_id, client_ip: '203.0.113.7' });

    const long = await b.app.inject({ method: 'POST', url: '/credentials', payload: {}, headers: { authorization: `Bearer ${token}`, 'user-agent': 'u'.repeat(600) } });
    assert.equal(long.statusCode, 201, long.body);
    assert.equal((await leaseRow(b.pg, long.json().lease_id)).user_agent, 'u'.repeat(512), 'cut to 512 characters');
  });
});

describe('configuration', () => {
  test('BROKER_PUBLIC_PG_HOST and _PORT are what the credential names; unset, those of DATABASE_URL', async () => {
    await b.putPolicy('pub', { claims: { sub: 'pub:*' } });
    const plain = await issueOk('pub:default');
    assert.deepEqual([plain.host, plain.port], [b.pg.host, b.pg.port]);
    assert.equal(new URL(plain.uri).host, `${b.pg.host}:${b.pg.port}`);
    for (const [host, port, uriHost] of [['db.example.internal', 6543, 'db.example.internal'], ['2001:db8::5', 5433, '[2001:db8::5]']] as const) {
      const other = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { ...UNLIMITED, BROKER_PUBLIC_PG_HOST: host, BROKER_PUBLIC_PG_PORT: String(port) } });
      try {
        const res = await other.issue(await other.token({ sub: 'pub:elsewhere' }));
        assert.equal(res.status, 201, JSON.stringify(res.body));
        const cred = res.body;
        assert.deepEqual([cred.host, cred.port], [host, port]);
        const uri = new URL(cred.uri);
        assert.deepEqual([uri.hostname, uri.port, uri.pathname, uri.username], [uriHost, String(port), `/${b.pg.database}`, cred.username]);
        assert.equal(decodeURIComponent(uri.password), cred.password);
        assert.equal(await loginError(b.pg, cred), undefined, 'only the advertised address differs');
      } finally {
        await other.close();
      }
    }
  });

  test('BROKER_METRICS_PORT moves /metrics off the API port onto a listener of its own', async () => {
    // The test helper serves through app.inject only, so this starts the real listeners as `serve` does.
    assert.equal((await b.app.inject({ method: 'GET', url: '/metrics' })).statusCode, 200, 'unset, the API serves /metrics');
    const logs: string[] = [];
    let served: RunningBroker | undefined;
    let metricsPort = 0;
    for (let attempt = 1; !served; attempt++) {
      metricsPort = await freePort();
      const config = loadConfig(brokerEnv(b.pg, b.issuer, { ...UNLIMITED, HOST: '127.0.0.1', PORT: '0', BROKER_METRICS_PORT: String(metricsPort) }));
      served = await startBroker(config, { logger: createLogger('warn', { write: (line: string) => void logs.push(line) }) }).catch((err) => {
        // freePort's port was free a moment ago; someone may have taken it since.
        if (attempt < 3 && (err as { code?: string }).code === 'EADDRINUSE') return undefined;
        throw err;
      });
    }
    try {
      const issued = await fetch(`${served.url}/credentials`, {
        method: 'POST', body: '{}', headers: { authorization: `Bearer ${await b.token({ sub: 'pub:metrics' })}`, 'content-type': 'application/json' },
      });
      assert.equal(issued.status, 201, await issued.text());
      const scraped = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
      assert.equal(scraped.status, 200);
      // A request there must arrive in time too, or a stalled client would hold close() as on the API.
      assert.equal(served.metricsServer?.server.requestTimeout, REQUEST_TIMEOUT_MS);
      assert.equal(served.metricsServer?.server.headersTimeout, REQUEST_TIMEOUT_MS);
      assert.equal(served.app.server.requestTimeout, REQUEST_TIMEOUT_MS);
      assert.match(await scraped.text(), /^broker_credentials_issued_total\{policy="pub"\} 1$/m, 'the API app\'s own registry');
      const onApi = await fetch(`${served.url}/metrics`);
      assert.equal(onApi.status, 404, await onApi.text());
      assert.equal((await fetch(`${served.url}/healthz`)).status, 200);
    } finally {
      await served.close();
    }
    assert.deepEqual(logs.filter((l) => JSON.parse(l).level >= 50), [], 'no errors logged');
    // The test cluster issues credentials for the broker's own database, which start-up flags.
    const exposed = logs.map((l) => JSON.parse(l)).filter((l) => /can connect to the broker's own database/.test(l.msg));
    assert.deepEqual(exposed.map((l) => l.connect), [['public']]);
  });

  test('what start-up checks: PUBLIC or the marker role holding CONNECT on the broker\'s database', async () => {
    const managed = b.app.config.managedRole;
    const db = b.pg.database;
    assert.deepEqual(await brokerDatabaseOpenTo(b.app.db, managed), ['public']);
    // The broker owns its database, so it keeps CONNECT whatever PUBLIC loses.
    await b.pg.query(`REVOKE CONNECT ON DATABASE ${db} FROM PUBLIC`, [], 'postgres');
    try {
      assert.deepEqual(await brokerDatabaseOpenTo(b.app.db, managed), [], 'closed to issued roles');
      await b.pg.query(`GRANT CONNECT ON DATABASE ${db} TO ${managed}`, [], 'postgres');
      // On 15 every issued role inherits the marker's grants; on 16+ none does (WITH INHERIT FALSE).
      assert.deepEqual(await brokerDatabaseOpenTo(b.app.db, managed), b.pg.version < 16 ? [managed] : [], 'through the marker on 15 only');
      await b.pg.query(`REVOKE CONNECT ON DATABASE ${db} FROM ${managed}; GRANT CONNECT ON DATABASE ${db} TO app_readers`, [], 'postgres');
      assert.deepEqual(await brokerDatabaseOpenTo(b.app.db, managed), ['app_readers'], 'open to the group a policy hands out');
    } finally {
      await b.pg.query(`REVOKE CONNECT ON DATABASE ${db} FROM ${managed}; REVOKE CONNECT ON DATABASE ${db} FROM app_readers`, [], 'postgres');
      await b.pg.query(`GRANT CONNECT ON DATABASE ${db} TO PUBLIC`, [], 'postgres');
    }
    assert.deepEqual(await brokerDatabaseOpenTo(b.app.db, 'no_such_role'), ['public'], 'a marker role not created yet is no error');
  });

  test('PUT /policies stores a policy whose credentials could connect to the broker\'s database, with a warning saying why', async () => {
    const db = b.pg.database;
    const put = async () => {
      const res = await b.app.inject({
        method: 'PUT', url: '/policies/zz-exposed', headers: { authorization: `Bearer ${await b.adminToken()}` },
        payload: { issuer: b.issuer.issuer, database: db, grant_role: 'app_readers', claims: { sub: 'exposed:*' } },
      });
      assert.ok([200, 201].includes(res.statusCode), res.body);
      return res.json() as { name: string; warnings?: string[] };
    };
    const warned = () => b.logs.map((l) => JSON.parse(l)).filter((l) => l.policy === 'zz-exposed' && /can connect to the broker's own database/.test(l.msg));
    try {
      // The test cluster leaves CONNECT on every database to PUBLIC, as CREATE DATABASE does.
      const open = await put();
      assert.equal(open.name, 'zz-exposed', 'stored all the same');
      assert.deepEqual(open.warnings?.map((w) => w.replace(/ \([^)]*\)/, ' (…)')), [
        `credentials issued under this policy can connect to the broker's own database ${db} (…), where a login can take the broker's advisory locks and stall issuance or reaping: revoke that CONNECT (README, Least-privilege setup)`,
      ]);
      assert.match(open.warnings![0], /\(PUBLIC holds CONNECT there\)/);
      assert.equal(warned().length, 1, 'and logged');
      const got = await b.app.inject({ method: 'GET', url: '/policies/zz-exposed', headers: { authorization: `Bearer ${await b.adminToken()}` } });
      assert.equal(got.json().warnings, undefined, 'GET answers the policy alone');

      await b.pg.query(`REVOKE CONNECT ON DATABASE ${db} FROM PUBLIC`, [], 'postgres');
      assert.equal((await put()).warnings, undefined, 'closed as the README says: no warning');
      await b.pg.query(`GRANT CONNECT ON DATABASE ${db} TO app_readers`, [], 'postgres');
      assert.match((await put()).warnings?.[0] ?? '', /\(grant_role app_readers holds CONNECT there, itself or through a group\)/);
      assert.equal(warned().length, 2);
    } finally {
      await b.pg.query(`REVOKE CONNECT ON DATABASE ${db} FROM app_readers; GRANT CONNECT ON DATABASE ${db} TO PUBLIC`, [], 'postgres');
      await b.pg.query(`DELETE FROM broker.policies WHERE name = 'zz-exposed'`);
    }
  });

  test('what start-up checks: stored policies whose claims today\'s rules refuse', async () => {
    assert.deepEqual(await policiesRefusedNow(b.app.db), [], 'every policy stored through the API passes');
    await b.putPolicy('zz-legacy', { claims: { sub: 'legacy:*' } });
    try {
      // As a release before the pointer check let it be stored: every token of the issuer matches.
      await b.pg.query(`UPDATE broker.policies SET claims = $1 WHERE name = 'zz-legacy'`, [{ '/iss': b.issuer.issuer }]);
      const refused = await policiesRefusedNow(b.app.db);
      assert.deepEqual(refused.map((r) => r.policy), ['zz-legacy']);
      assert.match(refused[0].problem, /no claim narrows the match/);
      // Or stored before connection_limit 0 was refused.
      await b.pg.query(`UPDATE broker.policies SET claims = '{"sub": "legacy:*"}', connection_limit = 0 WHERE name = 'zz-legacy'`);
      assert.match((await policiesRefusedNow(b.app.db))[0]?.problem ?? '', /connection_limit 0/);
    } finally {
      await b.pg.query(`DELETE FROM broker.policies WHERE name = 'zz-legacy'`);
    }
  });
});
