import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { api, startTestBroker, type TestBroker } from './helpers/broker.js';

// "Explain denials": /policies/evaluate must not say a policy would issue when issuance would
// answer LEASE_QUOTA_EXCEEDED.
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('eq', { claims: { sub: 'eq:*' }, max_active_leases: 2 });
});
after(async () => b?.close());

async function evaluate(sub: string): Promise<{ admitted: boolean; cannot_issue?: string }> {
  const res = await api(b, 'POST', '/policies/evaluate', await b.token({ sub }));
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.policies.find((p: { name: string }) => p.name === 'eq');
}

test('a policy whose max_active_leases this identity holds is admitted but flagged cannot_issue, as issuance refuses it', async () => {
  const token = await b.token({ sub: 'eq:alice' });
  assert.deepEqual(await evaluate('eq:alice'), { name: 'eq', admitted: true, failed_claims: [] }, 'nothing held: it would issue');
  const first = await b.issue(token, { policy: 'eq' });
  assert.equal(first.status, 201);
  assert.equal((await evaluate('eq:alice')).cannot_issue, undefined, 'one of two held: it would still issue');
  assert.equal((await b.issue(token, { policy: 'eq', ttl: 120 })).status, 201);

  const full = await evaluate('eq:alice');
  assert.equal(full.admitted, true, 'the claims still match');
  assert.match(full.cannot_issue ?? '', /^this identity already holds 2 active leases under this policy, its max_active_leases \(2\)/);
  const refused = await b.issue(token, { policy: 'eq' });
  assert.deepEqual([refused.status, refused.body.code], [429, 'LEASE_QUOTA_EXCEEDED'], 'and issuance agrees');
  // The refusal says what frees a place, as the explanation does, not only that none is free.
  assert.equal(refused.body.detail, 'This identity already holds 2 active leases under policy eq, its max_active_leases (2); one must end (expiry, or DELETE /leases/{id}) before another is issued');
  // Retry-After is when the sooner of the two (120 s, from a whole second rounded up) expires,
  // not the 5 s of other 429s.
  const wait = Number(refused.headers['retry-after']);
  assert.ok(wait > 100 && wait <= 121, `Retry-After ${refused.headers['retry-after']}`);
  assert.equal((await evaluate('eq:bob')).cannot_issue, undefined, 'another identity is not affected');

  // A lease past its expiry no longer counts, for issuance or for the explanation, even before
  // the reaper has ended it.
  await b.pg.query(`UPDATE broker.leases SET expires_at = now() - interval '1 second' WHERE id = $1`, [first.body.lease_id]);
  assert.equal((await evaluate('eq:alice')).cannot_issue, undefined);
  assert.equal((await b.issue(token, { policy: 'eq' })).status, 201);
});
