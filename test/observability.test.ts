import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { createLogger } from '../src/logger.js';
import { REAPER_LOCK_KEY } from '../src/reaper/leadership.js';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

let b: TestBroker;

before(async () => {
  b = await startTestBroker();
  await b.putPolicy('obs', { claims: { sub: 'obs:*' } });
});
after(async () => b?.close());

/** Prometheus text exposition: every sample line is `name{labels} value`. */
function parseMetrics(text: string): Map<string, number> {
  const samples = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (-?[0-9.eE+-]+|NaN|\+Inf|-Inf)$/.exec(line);
    assert.ok(m, `not a Prometheus sample line: ${line}`);
    samples.set(m[1], Number(m[2]));
  }
  return samples;
}

test('/metrics parses as Prometheus text and the issued and denied counters move', async () => {
  const scrape = async () => {
    const res = await b.app.inject({ method: 'GET', url: '/metrics' });
    assert.equal(res.statusCode, 200);
    assert.match(String(res.headers['content-type']), /text\/plain/);
    return parseMetrics(res.body);
  };
  const before = await scrape();
  assert.equal((await b.issue(await b.token({ sub: 'obs:ok' }))).status, 201);
  assert.equal((await b.issue(await b.token({ sub: 'nobody' }))).status, 403);
  assert.equal((await b.issue(await b.token({ sub: 'obs:ok2' }), { ttl: 999_999 })).status, 400);
  assert.equal((await b.issue(await b.token({ sub: 'obs:ok3', aud: 'someone-else' }))).status, 401);
  // A policy name the caller made up never becomes a label (one time series per request would
  // grow without bound); the name of the policy that admitted the token, as above, does.
  assert.equal((await b.issue(await b.token({ sub: 'obs:ok4' }), { policy: 'made-up-name-1' })).status, 403);
  const afterScrape = await scrape();
  assert.ok(![...afterScrape.keys()].some((k) => k.includes('made-up-name-1')), 'no series for a made-up policy name');
  const delta = (name: string) => (afterScrape.get(name) ?? 0) - (before.get(name) ?? 0);
  assert.equal(delta('broker_credentials_issued_total{policy="obs"}'), 1);
  assert.equal(delta('broker_credentials_denied_total{policy="",reason="no_policy"}'), 2);
  assert.equal(delta('broker_credentials_denied_total{policy="obs",reason="ttl_too_long"}'), 1);
  assert.equal(delta('broker_credentials_denied_total{policy="",reason="invalid_token"}'), 1);
  assert.equal(delta('broker_issue_duration_seconds_count'), 4, 'the histogram times requests that reached issuance');
  for (const name of ['broker_active_leases', 'broker_reaper_lag_seconds', 'broker_reaper_failures_total', 'broker_leases_revoked_total', 'broker_leases_expired_total']) {
    assert.ok(afterScrape.has(name), `${name} is exported`);
  }
  await b.reaper.reap({ requireLeadership: false });
  assert.ok(((await scrape()).get('broker_active_leases') ?? 0) >= 1, 'the reaper publishes the active lease gauge');
});

test('a replica that does not lead still publishes the lease gauges after its run', async () => {
  const gauge = async () => parseMetrics((await b.app.inject({ method: 'GET', url: '/metrics' })).body).get('broker_active_leases');
  const other = new pg.Client(b.pg.superuserUrl.replace(/\/postgres$/, '/broker'));
  await other.connect();
  try {
    // Another replica leads.
    await b.reaper.leadership.release();
    const [{ taken }] = (await other.query('SELECT pg_try_advisory_lock($1) AS taken', [REAPER_LOCK_KEY])).rows;
    assert.equal(taken, true);
    await b.reaper.reap();
    assert.equal((await b.issue(await b.token({ sub: 'obs:gauge' }))).status, 201);
    const [{ active }] = await b.pg.query<{ active: number }>(`SELECT count(*)::int AS active FROM broker.leases WHERE state = 'active'`);
    assert.notEqual(await gauge(), active, 'the new lease is not counted yet');
    const stats = await b.reaper.reap();
    assert.equal(stats.leader, false);
    assert.equal(await gauge(), active);
  } finally {
    await other.end();
  }
});

test('request logs carry request ids, and no token, password or connection password', async () => {
  const token = await b.token({ sub: 'obs:logs' });
  const res = await b.issue(token);
  assert.equal(res.status, 201);
  const lines = b.logs.map((l) => JSON.parse(l));
  const issued = lines.find((l) => l.msg === 'credential issued' && l.lease_id === res.body.lease_id);
  assert.ok(issued, 'issuance is logged');
  assert.ok(issued.reqId, 'with the request id');
  // One line per request: the issuance rides in the request's own line, not a second one.
  assert.equal(issued.path, '/credentials');
  assert.equal(issued.status, 201);
  assert.deepEqual(lines.filter((l) => l.reqId === issued.reqId).map((l) => l.msg), ['credential issued']);
  const all = b.logs.join('\n');
  assert.ok(!all.includes(token) && !all.includes(token.split('.')[2]));
  assert.ok(!all.includes(res.body.password));
  assert.ok(!all.includes(decodeURIComponent(new URL(b.config.databaseUrl).password)));
});

test('every refusal of a verified caller leaves one audit event with its issuer and subject', async () => {
  const call = async (method: string, url: string, token: string, payload?: Record<string, unknown>) => {
    const res = await b.app.inject({ method: method as 'POST', url, headers: { authorization: `Bearer ${token}` }, payload });
    return { status: res.statusCode, body: res.json(), requestId: res.json().request_id as string | undefined };
  };
  const events = (requestId: string) =>
    b.pg.query('SELECT type, issuer, subject, reason, detail FROM broker.audit_events WHERE request_id = $1', [requestId]);
  const user = await b.token({ sub: 'obs:audited' });
  const owner = await b.token({ sub: 'obs:owner' });
  const lease = (await b.issue(owner)).body;

  const refusals = [
    { req: await call('POST', '/leases/revoke', user, { subject: 'obs:owner' }), status: 403, reason: 'NOT_ADMIN' },
    { req: await call('POST', `/leases/${lease.lease_id}/renew`, user, { ttl: 60 }), status: 404, reason: 'LEASE_NOT_FOUND' },
    { req: await call('PUT', '/policies/obs-nope', user, { issuer: b.issuer.issuer, claims: { sub: 'x' }, grant_role: 'app_readers', database: b.pg.database }), status: 403, reason: 'NOT_ADMIN' },
    // A body that fails validation is refused too, once the caller is known.
    { req: await call('POST', '/credentials', user, { ttl: 0 }), status: 400, reason: 'BAD_REQUEST' },
    { req: await call('POST', `/leases/${lease.lease_id}/renew`, owner, { ttl: 'soon' }), status: 400, reason: 'BAD_REQUEST', subject: 'obs:owner' },
  ];
  for (const { req, status, reason, subject = 'obs:audited' } of refusals) {
    assert.equal(req.status, status, JSON.stringify(req.body));
    const rows = await events(req.body.request_id);
    assert.equal(rows.length, 1, JSON.stringify(rows));
    assert.deepEqual({ ...rows[0], detail: undefined }, { type: 'request.denied', issuer: b.issuer.issuer, subject, reason, detail: undefined });
    assert.equal(rows[0].detail.status, status);
  }
  // An issuance denial is recorded once, by issuance itself.
  const denied = await call('POST', '/credentials', user, { policy: 'made-up-name-2' });
  assert.equal(denied.status, 403);
  assert.deepEqual((await events(denied.body.request_id)).map((e) => e.type), ['credential.denied']);
  // The same requests by those allowed to make them succeed, and leave no denial.
  const renewed = await call('POST', `/leases/${lease.lease_id}/renew`, owner, { ttl: 60 });
  assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
  const revoked = await call('POST', '/leases/revoke', await b.adminToken(), { subject: 'obs:owner' });
  assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
  const [{ n }] = await b.pg.query(`SELECT count(*)::int AS n FROM broker.audit_events WHERE type = 'request.denied' AND subject NOT IN ('obs:audited', 'obs:owner')`);
  assert.equal(n, 0);
  const [{ m }] = await b.pg.query(`SELECT count(*)::int AS m FROM broker.audit_events WHERE type = 'request.denied' AND subject = 'obs:owner'`);
  assert.equal(m, 1, "the owner's bad renew only: its valid renew and the admin's revoke left no denial");
});

test('the logger censors secrets wherever they appear in a log object', () => {
  const out: string[] = [];
  const log = createLogger('info', { write: (l: string) => void out.push(l) });
  log.info({
    req: { headers: { authorization: 'Bearer eyJsecret' } },
    password: 'pw-secret',
    credential: { password: 'pw-nested', uri: 'postgresql://u:pw-uri@h/db' },
    token: 'tok-secret',
    config: { databaseUrl: 'postgres://broker:db-secret@h/broker' },
    DATABASE_URL: 'postgres://broker:db-secret2@h/broker',
  }, 'probe');
  const text = out.join('');
  for (const secret of ['eyJsecret', 'pw-secret', 'pw-nested', 'pw-uri', 'tok-secret', 'db-secret', 'db-secret2']) {
    assert.ok(!text.includes(secret), `${secret} is censored`);
  }
  assert.match(text, /\[REDACTED\]/);
  assert.match(text, /"msg":"probe"/, 'the rest of the line is kept');
});

test('/readyz answers every caller, and concurrent calls share one query', async () => {
  let checkouts = 0;
  const count = () => void checkouts++;
  b.app.db.on('acquire', count);
  try {
    const answers = await Promise.all(Array.from({ length: 30 }, () => b.app.inject({ method: 'GET', url: '/readyz' })));
    assert.deepEqual([...new Set(answers.map((a) => a.statusCode))], [200]);
    assert.deepEqual(answers[0].json(), { status: 'ready' });
    // One for the 30 readiness calls; one more only if the reaper happened to run meanwhile.
    assert.ok(checkouts >= 1 && checkouts <= 2, `${checkouts} pool checkouts for 30 concurrent readiness calls`);
    // A call after those have been answered asks PostgreSQL again.
    assert.equal((await b.app.inject({ method: 'GET', url: '/readyz' })).statusCode, 200);
    assert.ok(checkouts >= 2, 'a later call is not served from an old answer');
  } finally {
    b.app.db.off('acquire', count);
  }
});
