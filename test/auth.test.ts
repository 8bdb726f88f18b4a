import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { AUDIENCE, startTestBroker, type TestBroker } from './helpers/broker.js';
import { startCountingServer, startIssuer, unsignedToken, type TestIssuer } from './helpers/issuer.js';

let b: TestBroker;
let issuer: TestIssuer;
// Listed with its own audience, to prove the per-issuer override.
let second: TestIssuer;
let counting: Awaited<ReturnType<typeof startCountingServer>>;

const SECOND_AUDIENCE = 'second-audience';
const SUB = 'repo:octo-org/octo-repo:ref:refs/heads/main';
const now = () => Math.floor(Date.now() / 1000);

type Res = { status: number; headers: Record<string, unknown>; body: string; json: () => any };

async function call(method: 'GET' | 'POST' | 'PUT' | 'DELETE', url: string, token?: string, payload?: unknown): Promise<Res> {
  const res = await b.app.inject({ method, url, headers: token === undefined ? {} : { authorization: `Bearer ${token}` }, ...(payload === undefined ? {} : { payload: payload as object }) });
  return { status: res.statusCode, headers: res.headers, body: res.body, json: () => res.json() };
}

function assertUnauthorized(res: Res, label: string, code = 'INVALID_TOKEN'): void {
  assert.equal(res.status, 401, `${label}: ${res.status} ${res.body}`);
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/, label);
  assert.match(String(res.headers['www-authenticate']), /^Bearer .*error="invalid_token", error_description="[^"]+"$/, label);
  assert.equal(res.json().code, code, label);
}

before(async () => {
  counting = await startCountingServer();
  issuer = await startIssuer({ discovery: false });
  second = await startIssuer({ discovery: false });
  b = await startTestBroker({
    issuer,
    env: {
      BROKER_ISSUERS: JSON.stringify([
        { issuer: issuer.issuer, jwks_uri: issuer.jwksUri },
        { issuer: second.issuer, jwks_uri: second.jwksUri, audience: SECOND_AUDIENCE },
      ]),
    },
  });
  await b.putPolicy('ci', { claims: { sub: 'repo:octo-org/*' }, max_active_leases: 50 });
});

after(async () => {
  await b?.close();
  await issuer?.close();
  await second?.close();
  await counting?.close();
});

describe('token rejection (issue 2 acceptance)', () => {
  test('each bad token is a 401 with a Bearer challenge, a good one sent alongside is accepted, and no unlisted host is contacted', async () => {
    const kid = issuer.publicJwk().kid as string;
    const base = { iss: issuer.issuer, aud: AUDIENCE, sub: SUB, iat: now() };
    const bad: Record<string, string> = {
      'alg none': unsignedToken({ alg: 'none', typ: 'JWT', kid }, { ...base, exp: now() + 300 }),
      'HS256 signed with the issuer public key': await issuer.sign({ ...base }, { alg: 'HS256' }),
      expired: await issuer.sign({ ...base, iat: now() - 7200, exp: now() - 3600 }),
      'no exp': await issuer.sign({ ...base }, { omitDefaults: true }),
      'wrong aud': await issuer.sign({ ...base, aud: 'somebody-else' }),
      'unlisted issuer': await issuer.sign({ ...base, iss: counting.url }),
      'unknown kid': await issuer.sign({ ...base }, { header: { kid: 'no-such-kid' } }),
      'nbf in the future': await issuer.sign({ ...base, nbf: now() + 3600 }),
    };
    const good = await b.token();
    const [goodRes, ...badRes] = await Promise.all([b.issue(good), ...Object.values(bad).map((t) => call('POST', '/credentials', t, {}))]);
    assert.equal(goodRes.status, 201, JSON.stringify(goodRes.body));
    Object.keys(bad).forEach((label, i) => assertUnauthorized(badRes[i], label));
    // The same through the endpoint that needs no policy.
    for (const [label, token] of Object.entries(bad)) assertUnauthorized(await call('POST', '/policies/evaluate', token), `${label} (evaluate)`);
    assert.equal((await call('POST', '/policies/evaluate', good)).status, 200);
    assert.deepEqual(counting.requests, []);
  });

  test('a missing Authorization header is a 401 problem with a Bearer challenge', async () => {
    const res = await call('POST', '/credentials', undefined, {});
    assert.equal(res.status, 401);
    assert.equal(res.json().code, 'MISSING_TOKEN');
    assert.match(String(res.headers['www-authenticate']), /^Bearer /);
    assert.match(String(res.headers['content-type']), /^application\/problem\+json/);
  });

  test('other authorization schemes and empty bearer values are 401', async () => {
    for (const authorization of ['Basic dXNlcjpwYXNz', 'Bearer', 'Bearer ', `Token ${await b.token()}`, `Bearer ${await b.token()} extra`]) {
      const res = await b.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization } });
      assert.equal(res.statusCode, 401, `${authorization.slice(0, 20)}: ${res.body}`);
      assert.match(String(res.headers['www-authenticate']), /^Bearer /);
    }
  });

  test('the Bearer scheme name is case-insensitive (RFC 7235)', async () => {
    const res = await b.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `bearer ${await b.token()}` } });
    assert.equal(res.statusCode, 200, res.body);
  });

  test('a rejected token leaves a token.rejected audit event with its unverified iss and sub', async () => {
    const sub = `audit-${Date.now()}`;
    assertUnauthorized(await call('POST', '/credentials', await issuer.sign({ aud: AUDIENCE, sub, exp: now() - 3600 }), {}), 'expired');
    const rows = await b.pg.query(`SELECT issuer, subject, actor_verified, reason, detail FROM broker.audit_events WHERE type = 'token.rejected' AND subject = $1`, [sub]);
    assert.equal(rows.length, 1);
    assert.equal(rows[0].issuer, issuer.issuer);
    assert.equal(rows[0].actor_verified, false);
    assert.match(rows[0].reason, /expired/);
    assert.equal(rows[0].detail.path, '/credentials');

    // Unreadable tokens are still recorded, with nothing claimed about who sent them. The event
    // keeps the path without its query string, so the request_id of the answer is what finds it.
    const res = await call('POST', '/policies/evaluate?unreadable=1', 'not.a.jwt');
    assertUnauthorized(res, 'garbage');
    const requestId = res.json().request_id;
    assert.equal(typeof requestId, 'string');
    const garbage = await b.pg.query(`SELECT issuer, subject, actor_verified, detail FROM broker.audit_events WHERE type = 'token.rejected' AND request_id = $1`, [requestId]);
    assert.deepEqual(garbage, [{ issuer: null, subject: null, actor_verified: false, detail: { method: 'POST', path: '/policies/evaluate' } }]);
  });
});

describe('admins', () => {
  const adminOnly: Array<['GET' | 'POST' | 'PUT' | 'DELETE', string, unknown?]> = [
    ['GET', '/policies'],
    ['GET', '/policies/ci'],
    ['GET', '/audit'],
    ['PUT', '/policies/sneaky', { issuer: '', claims: { sub: 'sneaky:*' }, grant_role: 'app_readers', database: 'broker' }],
    ['DELETE', '/policies/ci'],
    ['POST', '/leases/revoke', { subject: SUB }],
  ];

  test('admin-only endpoints are 403 for tokens that do not match BROKER_ADMINS', async () => {
    const lookalikes = {
      'ordinary subject': await b.token(),
      'admin prefix not anchored': await b.token({ sub: 'xadmin:root' }),
      'admin sub from another issuer': await second.sign({ aud: SECOND_AUDIENCE, sub: 'admin:root' }),
    };
    for (const [label, token] of Object.entries(lookalikes)) {
      for (const [method, url, payload] of adminOnly) {
        const body = payload && typeof payload === 'object' && 'issuer' in payload ? { ...payload, issuer: issuer.issuer } : payload;
        const res = await call(method, url, token, body);
        assert.equal(res.status, 403, `${label} ${method} ${url}: ${res.status} ${res.body}`);
        assert.equal(res.json().code, 'NOT_ADMIN');
      }
    }
    const stillThere = await call('GET', '/policies/ci', await b.adminToken());
    assert.equal(stillThere.status, 200, 'DELETE as non-admin did nothing');
  });

  test('who is asking is settled before the body is: no token is 401 and a non-admin 403, whatever the body', async () => {
    const badBodies: Array<['POST' | 'PUT', string, unknown]> = [
      ['POST', '/credentials', { ttl: 0, surprise: true }],
      ['PUT', '/policies/ci', { claims: 'not an object' }],
      ['POST', '/leases/revoke', { nothing: 'to match' }],
      ['GET' as 'POST', '/audit?limit=0', undefined],
    ];
    for (const [method, url, payload] of badBodies) {
      assertUnauthorized(await call(method, url, undefined, payload), `${method} ${url} without a token`, 'MISSING_TOKEN');
    }
    const user = await b.token();
    for (const [method, url, payload] of badBodies.slice(1)) {
      const res = await call(method, url, user, payload);
      assert.equal(res.status, 403, `${method} ${url} as a non-admin: ${res.body}`);
      assert.equal(res.json().code, 'NOT_ADMIN');
    }
    // The caller allowed to ask gets the 400 that explains the body.
    const admin = await b.adminToken();
    for (const [method, url, payload] of badBodies.slice(1)) {
      const res = await call(method, url, admin, payload);
      assert.equal(res.status, 400, `${method} ${url} as an admin: ${res.body}`);
      assert.equal(res.json().code, 'BAD_REQUEST');
    }
    const res = await call('POST', '/credentials', user, badBodies[0][2]);
    assert.equal(res.status, 400, res.body);
  });

  test('the token is checked before the body is read: no token is 401 even for a body that cannot be parsed', async () => {
    const big = JSON.stringify({ pad: 'x'.repeat(70_000) });
    const bodies: Array<[string, Record<string, string>, string, number, string]> = [
      ['malformed JSON', { 'content-type': 'application/json' }, '{"ttl": ', 400, 'BAD_REQUEST'],
      ['a body over the 64 KB limit', { 'content-type': 'application/json' }, big, 413, 'BODY_TOO_LARGE'],
      ['an unsupported content type', { 'content-type': 'application/xml' }, '<ttl/>', 415, 'UNSUPPORTED_MEDIA_TYPE'],
    ];
    const user = await b.token({ sub: 'body-first' });
    for (const [label, headers, payload, status, code] of bodies) {
      const anonymous = await b.app.inject({ method: 'POST', url: '/credentials', headers, payload });
      assertUnauthorized({ status: anonymous.statusCode, headers: anonymous.headers, body: anonymous.body, json: () => anonymous.json() }, `${label} without a token`, 'MISSING_TOKEN');
      // With a verified token the same body meets the body checks.
      const verified = await b.app.inject({ method: 'POST', url: '/credentials', headers: { ...headers, authorization: `Bearer ${user}` }, payload });
      assert.equal(verified.statusCode, status, `${label} with a token: ${verified.body}`);
      assert.equal(verified.json().code, code);
      // The 415 says what to send instead, not only Fastify's "Unsupported Media Type".
      if (status === 415) assert.match(verified.json().detail, /^The body.s Content-Type is not accepted: send it as JSON \(Content-Type: application\/json\)$/);
    }
  });

  test('the same endpoints answer an admin token', async () => {
    const admin = await b.adminToken();
    for (const url of ['/policies', '/policies/ci', '/audit']) {
      const res = await call('GET', url, admin);
      assert.equal(res.status, 200, `${url}: ${res.body}`);
    }
    const revoke = await call('POST', '/leases/revoke', admin, { subject: 'nobody-holds-leases' });
    assert.equal(revoke.status, 200, revoke.body);
  });

  test('an admin may PUT and DELETE the policy a non-admin may not', async () => {
    const admin = await b.adminToken();
    const [, url, payload] = adminOnly.find(([method, path]) => method === 'PUT' && path === '/policies/sneaky')!;
    // The non-admin attempt in the test above stored nothing.
    assert.equal((await call('GET', url, admin)).status, 404);
    const put = await call('PUT', url, admin, { ...(payload as object), issuer: issuer.issuer, database: b.pg.database });
    assert.equal(put.status, 201, put.body);
    assert.equal((await call('GET', url, admin)).status, 200);
    const deleted = await call('DELETE', url, admin);
    assert.equal(deleted.status, 204, deleted.body);
    assert.equal(deleted.body, '');
    const gone = await call('GET', url, admin);
    assert.equal(gone.status, 404, gone.body);
    assert.equal(gone.json().code, 'POLICY_NOT_FOUND');
    const [row] = await b.pg.query(`SELECT count(*)::int AS n FROM broker.policies WHERE name = 'sneaky'`);
    assert.equal(row.n, 0);
    const [event] = await b.pg.query(`SELECT detail FROM broker.audit_events WHERE type = 'policy.deleted' AND policy = 'sneaky'`);
    const { warnings: _warnings, ...stored } = put.json();
    assert.deepEqual(event.detail.policy, stored, 'its event keeps what was deleted');
    const again = await call('DELETE', url, admin);
    assert.equal(again.status, 404, 'a second DELETE finds nothing');
  });
});

describe('issuers', () => {
  test('an issuer entry with its own audience accepts only that audience', async () => {
    const ok = await call('POST', '/policies/evaluate', await second.sign({ aud: SECOND_AUDIENCE, sub: 'svc-a' }));
    assert.equal(ok.status, 200, ok.body);
    assert.equal(ok.json().issuer, second.issuer);
    // Each refusal names the audience that issuer's tokens need, whether the token's aud is another
    // issuer's (checked by the broker) or nobody's (checked by the verifier).
    const refusals: Array<[string, Promise<string>, string]> = [
      ['global audience on an overriding issuer', second.sign({ aud: AUDIENCE, sub: 'svc-a' }), SECOND_AUDIENCE],
      ['other issuer audience', issuer.sign({ aud: SECOND_AUDIENCE, sub: 'svc-a' }), AUDIENCE],
      ['an audience nobody takes', issuer.sign({ aud: 'https://github.com/octo-org', sub: 'svc-a' }), AUDIENCE],
      ['an audience nobody takes, overriding issuer', second.sign({ aud: ['x', 'y'], sub: 'svc-a' }), SECOND_AUDIENCE],
    ];
    for (const [label, token, expected] of refusals) {
      const res = await call('POST', '/policies/evaluate', await token);
      assertUnauthorized(res, label);
      assert.equal(res.json().detail, `token audience is not accepted: this broker takes tokens of this issuer with aud ${expected}`, label);
    }
    const both = await call('POST', '/policies/evaluate', await second.sign({ aud: ['unrelated', SECOND_AUDIENCE], sub: 'svc-a' }));
    assert.equal(both.status, 200, 'an array aud containing ours');
  });

  test('ES256 tokens verify', async () => {
    const res = await b.issue(await b.token({}, { alg: 'ES256' }));
    assert.equal(res.status, 201, JSON.stringify(res.body));
  });

  test('a token signed with a newly published key triggers a JWKS refetch and is accepted', async () => {
    const warm = await call('POST', '/policies/evaluate', await b.token());
    assert.equal(warm.status, 200);
    const before = issuer.requests.length;
    const kid = await issuer.addKey('RS256');
    const token = await b.token();
    assert.equal(JSON.parse(Buffer.from(token.split('.')[0], 'base64url').toString()).kid, kid);
    const res = await call('POST', '/policies/evaluate', token);
    assert.equal(res.status, 200, res.body);
    assert.equal(issuer.requests.length, before + 1, 'one refetch');
    // Now cached: no further fetch.
    assert.equal((await call('POST', '/policies/evaluate', await b.token())).status, 200);
    assert.equal(issuer.requests.length, before + 1);
  });
});
