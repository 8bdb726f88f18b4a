import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';

// Issuance keeps each issuer's policies between requests and has its lease INSERT check that
// broker.policies has not changed since (src/policy/cache.ts). Every change below is made with
// plain SQL as a superuser, not through the API, so nothing but that check can notice it.
let b: TestBroker;

before(async () => {
  b = await startTestBroker();
  await b.putPolicy('pc', { claims: { sub: 'pc:*' }, max_active_leases: 10, max_ttl: 3600 });
});
after(async () => b?.close());

const asSuperuser = (text: string) => b.pg.query(text, [], 'broker');
const issue = async (sub: string, body: Record<string, unknown> = {}) => b.issue(await b.token({ sub }), body);

test('kept policies are not read again for every credential', async () => {
  assert.equal((await issue('pc:warm')).status, 201);
  const reads = () => b.pg.logLines().filter((l) => l.includes('FROM broker.policy_version v LEFT JOIN')).length;
  const before = reads();
  assert.ok(before > 0, 'the first issuance read them (and the statement the test counts is the right one)');
  for (let i = 0; i < 5; i++) assert.equal((await issue(`pc:kept-${i}`)).status, 201);
  // The statement log arrives over a pipe: wait until the five INSERTs show, then count reads.
  await waitFor('the five lease INSERTs in the log', async () =>
    b.pg.logLines().filter((l) => l.includes('pc:kept-4')).length > 0 || null);
  assert.equal(reads(), before, 'no policy read while nothing changed');
});

test('a policy disabled with plain SQL refuses the next request, and admits again once enabled', async () => {
  assert.equal((await issue('pc:a')).status, 201);
  await asSuperuser(`UPDATE broker.policies SET enabled = false WHERE name = 'pc'`);
  const refused = await issue('pc:b');
  assert.equal(refused.status, 403, JSON.stringify(refused.body));
  assert.equal(refused.body.code, 'NO_POLICY');
  await asSuperuser(`UPDATE broker.policies SET enabled = true WHERE name = 'pc'`);
  assert.equal((await issue('pc:c')).status, 201);
});

test('a lowered max_ttl or max_active_leases applies to the next request', async () => {
  assert.equal((await issue('pc:limits', { ttl: 3000 })).status, 201);
  await asSuperuser(`UPDATE broker.policies SET max_ttl = 600, default_ttl = 600 WHERE name = 'pc'`);
  const tooLong = await issue('pc:limits', { ttl: 3000 });
  assert.equal(tooLong.status, 400, JSON.stringify(tooLong.body));
  assert.match(tooLong.body.detail, /exceeds the policy max_ttl of 600 seconds/);
  assert.equal((await issue('pc:limits', { ttl: 600 })).status, 201, 'within the new bound');
  // pc:limits now holds two live leases.
  await asSuperuser(`UPDATE broker.policies SET max_active_leases = 2 WHERE name = 'pc'`);
  const full = await issue('pc:limits', { ttl: 60 });
  assert.equal(full.status, 429, JSON.stringify(full.body));
  assert.equal(full.body.code, 'LEASE_QUOTA_EXCEEDED');
  await asSuperuser(`UPDATE broker.policies SET max_active_leases = 10, max_ttl = 3600 WHERE name = 'pc'`);
  assert.equal((await issue('pc:limits', { ttl: 60 })).status, 201);
});

test('a policy added with plain SQL admits at once, though the kept ones would refuse', async () => {
  assert.equal((await issue('pc:warm2')).status, 201);
  const before = await issue('late:x');
  assert.equal(before.status, 403);
  await asSuperuser(`INSERT INTO broker.policies (name, issuer, claims, grant_role, database, default_ttl, max_ttl, max_active_leases, connection_limit)
    SELECT 'late', issuer, '{"sub": "late:*"}', grant_role, database, 60, 600, 5, -1 FROM broker.policies WHERE name = 'pc'`);
  const admitted = await issue('late:y');
  assert.equal(admitted.status, 201, JSON.stringify(admitted.body));
  assert.equal(admitted.body.policy, 'late');
});

test('a change that still admits issues as usual, under the policy as it is now', async () => {
  assert.equal((await issue('pc:edit-a')).status, 201);
  await asSuperuser(`UPDATE broker.policies SET description = 'edited', default_ttl = 120 WHERE name = 'pc'`);
  const res = await issue('pc:edit-b');
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const [lease] = await b.pg.query('SELECT expires_at - created_at AS ttl FROM broker.leases WHERE id = $1', [res.body.lease_id]);
  assert.ok(lease.ttl.minutes === 2 || (lease.ttl.minutes === 1 && lease.ttl.seconds >= 59), JSON.stringify(lease.ttl));
  const events = await b.pg.query(`SELECT type FROM broker.audit_events WHERE subject = 'pc:edit-b'`);
  assert.deepEqual(events, [{ type: 'credential.issued' }], 'one lease, one event');
});

test('a change made with triggers switched off for replication still counts', async () => {
  assert.equal((await issue('pc:repl-a')).status, 201);
  await asSuperuser(`SET session_replication_role = replica; UPDATE broker.policies SET enabled = false WHERE name = 'pc'; RESET session_replication_role`);
  try {
    const refused = await issue('pc:repl-b');
    assert.equal(refused.status, 403, JSON.stringify(refused.body));
  } finally {
    await asSuperuser(`UPDATE broker.policies SET enabled = true WHERE name = 'pc'`);
  }
  assert.equal((await issue('pc:repl-c')).status, 201);
});

test('policies changing all the time never turn issuance into an error', async () => {
  let changing = true;
  const churn = (async () => {
    for (let i = 0; changing && i < 2000; i++) await asSuperuser(`UPDATE broker.policies SET description = 'churn ${i}' WHERE name = 'pc'`);
  })();
  try {
    const statuses: number[] = [];
    for (let i = 0; i < 30; i++) statuses.push((await issue(`pc:churn-${i}`, { ttl: 60 })).status);
    assert.deepEqual(statuses, Array(30).fill(201));
  } finally {
    changing = false;
    await churn;
  }
});
