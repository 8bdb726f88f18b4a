import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { createLogger } from '../src/logger.js';
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
