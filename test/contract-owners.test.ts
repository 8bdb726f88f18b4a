import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ADMIN_SUB, AUDIENCE, api, leaseRow, loginError, startTestBroker, type TestBroker } from './helpers/broker.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';

// Two allow-listed issuers that both say `sub: user:...`: ownership and filters must not confuse them.
let b: TestBroker;
let first: TestIssuer;
let second: TestIssuer;
let admin: string;

before(async () => {
  [first, second] = await Promise.all([startIssuer(), startIssuer()]);
  b = await startTestBroker({
    issuer: first,
    env: {
      BROKER_ISSUERS: JSON.stringify([first, second].map((i) => ({ issuer: i.issuer, jwks_uri: i.jwksUri }))),
      BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000',
    },
  });
  admin = await b.adminToken();
  await b.putPolicy('own-1', { claims: { sub: 'user:*' } });
  await b.putPolicy('own-2', { issuer: second.issuer, claims: { sub: 'user:*' } });
});
after(async () => {
  await b?.close();
  await Promise.all([first?.close(), second?.close()]);
});

const tokenFrom = (issuer: TestIssuer, sub: string) => issuer.sign({ aud: AUDIENCE, sub });

async function issueOk(token: string, body: Record<string, unknown> = {}): Promise<any> {
  const res = await b.issue(token, body);
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

const activeIds = async (where: string, params: unknown[]) =>
  (await b.pg.query(`SELECT id::text FROM broker.leases WHERE state = 'active' AND ${where} ORDER BY id`, params)).map((r) => r.id);

describe('lease ownership', () => {
  test('is the (iss, sub) pair: the same sub from another issuer cannot see, renew or revoke a lease; its owner can', async () => {
    const owner = await tokenFrom(first, 'user:shared');
    const twin = await tokenFrom(second, 'user:shared');
    const cred = await issueOk(owner);
    const theirs = await issueOk(twin);
    assert.deepEqual([cred.policy, theirs.policy], ['own-1', 'own-2']);
    // The admin rule names the first issuer: the same admin-looking sub from the second is nobody special.
    const fakeAdmin = await tokenFrom(second, ADMIN_SUB);
    const url = `/leases/${cred.lease_id}`;
    for (const token of [twin, fakeAdmin]) {
      for (const [method, path, body] of [['GET', url], ['POST', `${url}/renew`, { ttl: 1200 }], ['DELETE', url]] as const) {
        const res = await api(b, method, path, token, body);
        assert.equal(res.status, 404, `${method} ${path}: ${JSON.stringify(res.body)}`);
        assert.equal(res.body.code, 'LEASE_NOT_FOUND');
      }
    }
    const twinList = await api(b, 'GET', '/leases', twin);
    assert.deepEqual(twinList.body.items.map((l: any) => l.id), [theirs.lease_id], 'the twin lists only its own lease');
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.equal(row.state, 'active');
    assert.equal(row.expires_at.toISOString(), cred.expires_at, 'the refused renew changed nothing');
    assert.equal(await loginError(b.pg, cred), undefined);

    const seen = await api(b, 'GET', url, owner);
    assert.equal(seen.status, 200);
    assert.deepEqual([seen.body.issuer, seen.body.subject], [first.issuer, 'user:shared']);
    assert.deepEqual((await api(b, 'GET', '/leases', owner)).body.items.map((l: any) => l.id), [cred.lease_id]);
    const renewed = await api(b, 'POST', `${url}/renew`, owner, { ttl: 1200 });
    assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
    assert.ok(renewed.body.expires_at > cred.expires_at, renewed.body.expires_at);
    const revoked = await api(b, 'DELETE', url, owner);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal(revoked.body.state, 'revoked');
    assert.equal(await loginError(b.pg, cred), '28P01');
    assert.equal((await leaseRow(b.pg, theirs.lease_id)).state, 'active', 'the twin\'s own lease is untouched');
  });

  test('GET /leases?issuer= gives an admin exactly that issuer\'s leases', async () => {
    const fromFirst = await issueOk(await tokenFrom(first, 'user:filter'));
    const fromSecond = await issueOk(await tokenFrom(second, 'user:filter'));
    for (const [issuer, mine, other] of [[first, fromFirst, fromSecond], [second, fromSecond, fromFirst]] as const) {
      const res = await api(b, 'GET', `/leases?issuer=${encodeURIComponent(issuer.issuer)}&limit=1000`, admin);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.next_cursor, null);
      const ids: string[] = res.body.items.map((l: any) => l.id);
      const expected = (await b.pg.query('SELECT id::text FROM broker.leases WHERE issuer = $1', [issuer.issuer])).map((r) => r.id);
      assert.deepEqual([...ids].sort(), expected.sort());
      assert.ok(res.body.items.every((l: any) => l.issuer === issuer.issuer));
      assert.ok(ids.includes(mine.lease_id) && !ids.includes(other.lease_id));
    }
    const both = await api(b, 'GET', `/leases?issuer=${encodeURIComponent(second.issuer)}&subject=user:filter`, admin);
    assert.deepEqual(both.body.items.map((l: any) => l.id), [fromSecond.lease_id]);
  });
});

describe('POST /leases/revoke', () => {
  test('by issuer alone ends exactly that issuer\'s active leases', async () => {
    const kept = await issueOk(await tokenFrom(first, 'user:rv-a'));
    const ending = [await issueOk(await tokenFrom(second, 'user:rv-a')), await issueOk(await tokenFrom(second, 'user:rv-b'))];
    const expected = await activeIds('issuer = $1', [second.issuer]);
    const othersBefore = await activeIds('issuer <> $1', [second.issuer]);
    assert.ok(othersBefore.includes(kept.lease_id));
    const res = await api(b, 'POST', '/leases/revoke', admin, { issuer: second.issuer });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.revoked, expected.length);
    assert.deepEqual([...res.body.lease_ids].sort(), expected);
    for (const cred of ending) {
      const row = await leaseRow(b.pg, cred.lease_id);
      assert.deepEqual([row.state, row.end_reason, row.ended_by], ['revoked', 'bulk revocation', `${first.issuer} ${ADMIN_SUB}`]);
      assert.equal(await loginError(b.pg, cred), '28P01');
    }
    assert.deepEqual(await activeIds('issuer <> $1', [second.issuer]), othersBefore, 'the other issuer keeps every active lease');
    assert.equal(await loginError(b.pg, kept), undefined, 'the same sub from the other issuer still logs in');
  });

  test('by policy alone ends exactly that policy\'s active leases', async () => {
    await b.putPolicy('rv-pol-a', { claims: { sub: 'rv:*' } });
    await b.putPolicy('rv-pol-b', { claims: { sub: 'rv:*' } });
    const ending = [await issueOk(await tokenFrom(first, 'rv:one'), { policy: 'rv-pol-a' }), await issueOk(await tokenFrom(first, 'rv:two'), { policy: 'rv-pol-a' })];
    const kept = await issueOk(await tokenFrom(first, 'rv:one'), { policy: 'rv-pol-b' });
    const othersBefore = await activeIds('policy <> $1', ['rv-pol-a']);
    assert.ok(othersBefore.includes(kept.lease_id));
    const res = await api(b, 'POST', '/leases/revoke', admin, { policy: 'rv-pol-a', reason: 'policy retired' });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual([...res.body.lease_ids].sort(), ending.map((c) => c.lease_id).sort());
    assert.equal(res.body.revoked, 2);
    for (const cred of ending) {
      const row = await leaseRow(b.pg, cred.lease_id);
      assert.deepEqual([row.state, row.end_reason], ['revoked', 'policy retired']);
      assert.equal(await loginError(b.pg, cred), '28P01');
    }
    assert.deepEqual(await activeIds('policy <> $1', ['rv-pol-a']), othersBefore, 'leases of other policies stay active');
    assert.equal(await loginError(b.pg, kept), undefined, 'the same subject under another policy still logs in');
  });
});
