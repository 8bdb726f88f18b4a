import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { assertProblem, batterySender, type Answer } from './helpers/battery.js';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

// Bad input gets an answer that says what was wrong with it, in words a caller can act on, and
// never carries the bad input back; each case sits beside the good input it must not disturb.
// input-battery*.test.ts check that no bad input is a 500 or leaks PostgreSQL's text.

let b: TestBroker;
const send = batterySender(() => b);

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '1000000', BROKER_RATE_LIMIT_IDENTITY: '1000000' } });
  await b.putPolicy('answers', { claims: { sub: 'repo:octo-org/*' }, default_ttl: 300, max_ttl: 600, max_active_leases: 1000 });
});

after(async () => b?.close());

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;

function badRequest(res: Answer, label: string, detail: string): void {
  assertProblem(res, 400, label);
  assert.equal(res.json().code, 'BAD_REQUEST', label);
  assert.equal(res.json().detail, detail, label);
}

describe('policy names in POST /credentials', () => {
  const NAME_RULE = "a policy name of 1 to 63 characters from A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit";

  test('a name no policy can have → 400 saying what a name may be, without echoing it', async () => {
    const impossible = [
      'line\nbreak', 'carriage\rreturn', 'bell\u0007', 'escape\u001b[31m', 'nul\u0000byte', 'del\u007f', 'c1\u0085',
      'p'.repeat(64), 'p'.repeat(5000), 'has space', '-dash-first', '.dot-first', "x'; DROP TABLE broker.policies; --",
      '🔥', 'caf\u00e9', 'right\u202eleft', '',
    ];
    for (const policy of impossible) {
      const label = `policy ${JSON.stringify(policy).slice(0, 40)}`;
      const res = await send(label, { payload: { policy } });
      badRequest(res, label, `body/policy must be ${NAME_RULE}`);
      assert.doesNotMatch(res.body, CONTROL, `${label}: no control character in the answer`);
      // Still recorded: the refusal of a verified caller leaves an audit event.
      const [event] = await b.pg.query('SELECT type, reason FROM broker.audit_events WHERE request_id = $1', [res.json().request_id]);
      assert.deepEqual({ ...event }, { type: 'request.denied', reason: 'BAD_REQUEST' }, label);
    }
  });

  test('the same rule, in the same words, as for the name in PUT /policies/{name}', async () => {
    const res = await send('put bad name', { method: 'PUT', url: `/policies/${encodeURIComponent('bad name')}`, token: await b.adminToken(), payload: {} });
    badRequest(res, 'put bad name', `params/name must be ${NAME_RULE}`);
  });

  test('every name a policy can have is still accepted: issued when it admits the token, NO_POLICY otherwise', async () => {
    for (const name of ['A', '9', 'Ok.name_1-x', `n${'x'.repeat(62)}`]) {
      await b.putPolicy(name, { claims: { sub: `names:${name}` }, default_ttl: 60, max_ttl: 600 });
      const res = await send(`issue under ${name}`, { token: await b.token({ sub: `names:${name}` }), payload: { policy: name, ttl: 60 } });
      assert.equal(res.status, 201, `${name}: ${res.body}`);
      assert.equal(res.json().policy, name);
    }
    // A well-formed name is echoed in the 403: it can hold nothing but the characters above.
    const refused = await send('well-formed unknown name', { payload: { policy: 'no-such.policy_1' } });
    assertProblem(refused, 403, 'well-formed unknown name');
    assert.equal(refused.json().code, 'NO_POLICY');
    assert.match(refused.json().detail, /^Policy no-such\.policy_1 does not admit this token/);
    const admitted = await send('the policy that admits it', { payload: { policy: 'answers' } });
    assert.equal(admitted.status, 201, admitted.body);
  });
});

describe('timestamps in lease and audit filters', () => {
  const TIME_RULE = 'an RFC 3339 date-time with a time zone (e.g. 2026-01-01T00:00:00Z), years 0001 to 9999';
  const FILTERS = [['/leases', 'since'], ['/leases', 'until'], ['/audit', 'since'], ['/audit', 'until']] as const;

  test('a timestamp out of range, or no real date, → 400 naming the field and the accepted form', async () => {
    const admin = await b.adminToken();
    const bad = [
      // Well-formed RFC 3339 that PostgreSQL cannot store: it has no year 0.
      '0000-01-01T00:00:00Z', '0000-12-31T23:59:59.999999+00:00',
      '99999-01-01T00:00:00Z', '2026-02-30T00:00:00Z', '2026-13-01T00:00:00Z', '2026-01-01T24:00:01Z',
      '2026-01-01T00:00:00+25:00', '2026-01-01T00:00:00', '2026-01-01', '-0001-01-01T00:00:00Z', 'yesterday',
    ];
    for (const [path, field] of FILTERS) {
      for (const value of bad) {
        const label = `${path} ${field}=${value}`;
        const res = await send(label, { method: 'GET', url: `${path}?${field}=${encodeURIComponent(value)}`, token: admin });
        badRequest(res, label, `querystring/${field} must be ${TIME_RULE}`);
      }
    }
  });

  test('in-range timestamps, in any offset, still filter', async () => {
    const admin = await b.adminToken();
    const issued = await send('lease to filter', { payload: { policy: 'answers' } });
    assert.equal(issued.status, 201, issued.body);
    const id = issued.json().lease_id;
    const [{ created_at: createdAt }] = await b.pg.query('SELECT created_at FROM broker.leases WHERE id = $1', [id]);
    const at = new Date(createdAt);
    const plus2h = (d: Date) => new Date(d.getTime() + 2 * 3600_000).toISOString().replace(/\.\d+Z$/, '');
    const listed = async (path: string, query: string, pick: (item: any) => boolean) => {
      const res = await send(`${path}?${query}`, { method: 'GET', url: `${path}?${query}&limit=1000`, token: admin });
      assert.equal(res.status, 200, `${path}?${query}: ${res.body}`);
      return res.json().items.some(pick);
    };
    const isLease = (l: { id: string }) => l.id === id;
    const isIssue = (e: { lease_id: string; type: string }) => e.lease_id === id && e.type === 'credential.issued';
    for (const [path, pick] of [['/leases', isLease], ['/audit', isIssue]] as const) {
      assert.ok(await listed(path, 'since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59Z', pick), `${path}: the widest range holds it`);
      // Offsets can carry the range's ends past year 0001 or 9999 in UTC; PostgreSQL stores both.
      const edges = `since=${encodeURIComponent('0001-01-01T00:00:00+14:00')}&until=${encodeURIComponent('9999-12-31T23:59:59-14:00')}`;
      assert.ok(await listed(path, edges, pick), `${path}: the range's ends in far offsets`);
      assert.ok(await listed(path, `since=${encodeURIComponent(new Date(at.getTime() - 1000).toISOString())}`, pick), `${path}: since just before`);
      assert.ok(!(await listed(path, `since=${encodeURIComponent(new Date(at.getTime() + 1000).toISOString())}`, pick)), `${path}: since just after`);
      assert.ok(!(await listed(path, `until=${encodeURIComponent(new Date(at.getTime() - 1000).toISOString())}`, pick)), `${path}: until just before`);
      // The same instants written with a +02:00 offset.
      const before = encodeURIComponent(`${plus2h(new Date(at.getTime() - 1000))}+02:00`);
      const afterIt = encodeURIComponent(`${plus2h(new Date(at.getTime() + 1000))}+02:00`);
      assert.ok(await listed(path, `since=${before}&until=${afterIt}`, pick), `${path}: offsets are honoured`);
    }
  });
});

describe('JSON bodies with prototype keys', () => {
  const FORBIDDEN = 'The body contains a forbidden property name (__proto__, or constructor.prototype); '
    + 'such keys are refused so that no object prototype can be altered';

  test('__proto__ or constructor.prototype anywhere in a body → 400 saying so, not "not valid JSON"', async () => {
    const admin = await b.adminToken();
    const bodies = [
      '{"__proto__": {"x": 1}}', '{"constructor": {"prototype": {}}}', '{"policy": "answers", "__proto__": null}',
      '{"ttl": 60, "nested": {"deeper": [{"__proto__": {"admin": true}}]}}', '[{"constructor": {"prototype": {"x": 1}}}]',
      '\ufeff{"__proto__": {}}',
    ];
    const routes = [['POST', '/credentials', undefined], ['PUT', '/policies/answers', admin], ['POST', '/leases/revoke', admin]] as const;
    for (const [method, url, token] of routes) {
      for (const raw of bodies) {
        const label = `${method} ${url} ${raw}`;
        badRequest(await send(label, { method, url, token, raw }), label, FORBIDDEN);
      }
    }
  });

  test('ordinary JSON bodies are still read, and malformed ones still called malformed', async () => {
    const admin = await b.adminToken();
    for (const raw of ['{"policy": "answers", "ttl": 60}', '\ufeff{"policy": "answers"}']) {
      const issued = await send(`normal body ${raw}`, { raw });
      assert.equal(issued.status, 201, issued.body);
    }
    // The words are data, not keys; and a constructor without a prototype is an ordinary field.
    const policy = {
      issuer: b.issuer.issuer, database: b.pg.database, grant_role: 'app_readers',
      description: 'mentions __proto__ and constructor.prototype', claims: { sub: 'repo:octo-org/*', constructor: 'x' },
    };
    const put = await send('policy naming the words', { method: 'PUT', url: '/policies/words', token: admin, raw: JSON.stringify(policy) });
    assert.equal(put.status, 201, put.body);
    assert.equal(put.json().description, policy.description);
    assert.deepEqual(put.json().claims, policy.claims);
    const malformed = await send('malformed', { raw: '{"policy": "answers",' });
    assertProblem(malformed, 400, 'malformed');
    assert.match(malformed.json().detail, /not valid JSON/);
  });
});

describe('input a route does not take', () => {
  test('a query parameter a route does not declare → 400 naming it; the same request without it succeeds', async () => {
    const leases = async () => (await b.pg.query(`SELECT count(*)::int AS n FROM broker.leases`))[0].n;
    const before = await leases();
    const ttlInQuery = await send('ttl in the query', { url: '/credentials?ttl=5' });
    badRequest(ttlInQuery, 'ttl in the query', 'querystring must NOT have additional properties: "ttl" is not one of its fields');
    assert.equal(await leases(), before, 'no lease for the refused request');
    const issued = await send('no query', {});
    assert.equal(issued.status, 201, issued.body);
    const admin = await b.adminToken();
    const force = await send('force in the query', { method: 'DELETE', url: '/policies/answers?force=1', token: admin });
    badRequest(force, 'force in the query', 'querystring must NOT have additional properties: "force" is not one of its fields');
    const kept = await send('policy still there', { method: 'GET', url: '/policies/answers', token: admin });
    assert.equal(kept.status, 200, kept.body);
    // Declared parameters still work where a route has them, once each.
    const listed = await send('declared query', { method: 'GET', url: '/leases?limit=1', token: admin });
    assert.equal(listed.status, 200, listed.body);
    // Probes and the API document take any query, as tools calling them may add one.
    for (const url of ['/healthz?probe=1', '/openapi.yaml?v=2', '/healthz?x=%00', '/metrics?x=%00']) {
      const res = await send(url, { method: 'GET', url, token: null });
      assert.equal(res.status, 200, `${url}: ${res.body}`);
    }
    // No route is a 404, whatever the query holds.
    assert.equal((await send('no route', { method: 'GET', url: '/nope?x=%00', token: null })).status, 404);
    const twice = await send('declared query twice', { method: 'GET', url: '/leases?limit=1&limit=2', token: admin });
    badRequest(twice, 'declared query twice', 'querystring/limit is given more than once');
  });

  test('a body on a route that takes none → 400, and nothing is done; an empty one is no input', async () => {
    const owner = await b.token({ sub: 'repo:octo-org/no-body' });
    const cred = await send('issue', { token: owner });
    assert.equal(cred.status, 201, cred.body);
    const leaseId = cred.json().lease_id;
    const withReason = await send('revoke with a reason', { method: 'DELETE', url: `/leases/${leaseId}`, token: owner, payload: { reason: 'key leaked' } });
    badRequest(withReason, 'revoke with a reason', 'DELETE /leases/{id} takes no request body');
    const [lease] = await b.pg.query(`SELECT state FROM broker.leases WHERE id = $1`, [leaseId]);
    assert.equal(lease.state, 'active', 'the refused revocation did nothing');
    const withClaims = await send('evaluate with claims', { url: '/policies/evaluate', token: owner, payload: { claims: { sub: 'someone-else' } } });
    badRequest(withClaims, 'evaluate with claims', 'POST /policies/evaluate takes no request body');
    const evaluated = await send('evaluate with {}', { url: '/policies/evaluate', token: owner, payload: {} });
    assert.equal(evaluated.status, 200, evaluated.body);
    const revoked = await send('revoke without a body', { method: 'DELETE', url: `/leases/${leaseId}`, token: owner });
    assert.equal(revoked.status, 200, revoked.body);
    assert.equal(revoked.json().state, 'revoked');
  });
});
