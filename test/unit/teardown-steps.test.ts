import assert from 'node:assert/strict';
import { test } from 'node:test';
import { stepEach, type RoleToDrop, type TeardownResult, type TeardownRun } from '../../src/leases/teardown.js';

const roles: RoleToDrop[] = ['lease_a', 'lease_b', 'lease_c'].map((username) => ({ username, reassign_to: 'app' }));
const fresh = (): TeardownResult => new Map(roles.map((r) => [r.username, null]));

test('a batch that fails for one role is retried role by role, so the others still get through', async () => {
  const calls: string[][] = [];
  const result = fresh();
  const ok = await stepEach(roles, result, 'drop', async (batch) => {
    calls.push(batch.map((r) => r.username));
    if (batch.some((r) => r.username === 'lease_b')) throw Object.assign(new Error('role "lease_b" cannot be dropped'), { code: '2BP01' });
  });
  assert.deepEqual(ok.map((r) => r.username), ['lease_a', 'lease_c']);
  assert.deepEqual(calls, [['lease_a', 'lease_b', 'lease_c'], ['lease_a'], ['lease_b'], ['lease_c']]);
  assert.match(result.get('lease_b')!, /^drop: 2BP01: role "lease_b" cannot be dropped/);
  assert.equal(result.get('lease_a'), null);
});

test('a batch that fails because PostgreSQL is unreachable or silent is not retried role by role: each retry would cost another timeout', async () => {
  for (const err of [new Error('Query read timeout'), Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' })]) {
    const calls: string[][] = [];
    const result = fresh();
    const ok = await stepEach(roles, result, 'drop', async (batch) => {
      calls.push(batch.map((r) => r.username));
      throw err;
    });
    assert.deepEqual(ok, []);
    assert.equal(calls.length, 1, err.message);
    for (const r of roles) assert.equal(result.get(r.username), `drop: ${(err as { code?: string }).code ? `${(err as { code?: string }).code}: ` : ''}${err.message}`);
  }
});

test('once a step found PostgreSQL unreachable, the later steps of the same teardown fail at once without trying', async () => {
  const progress: TeardownRun = { unreachable: null };
  const result = fresh();
  let tries = 0;
  const down = async () => {
    tries += 1;
    throw new Error('Query read timeout');
  };
  assert.deepEqual(await stepEach(roles.slice(0, 2), result, 'NOLOGIN', down, progress), []);
  assert.equal(progress.unreachable, 'NOLOGIN: Query read timeout');
  // Another creator's roles, in the same teardown.
  assert.deepEqual(await stepEach(roles.slice(2), result, 'NOLOGIN', down, progress), []);
  assert.equal(tries, 1);
  assert.equal(result.get('lease_c'), 'NOLOGIN: Query read timeout');
  // An ordinary failure leaves the next step free to try.
  const healthy: TeardownRun = { unreachable: null };
  await stepEach(roles.slice(0, 1), fresh(), 'DROP ROLE', async () => { throw Object.assign(new Error('in use'), { code: '2BP01' }); }, healthy);
  assert.equal(healthy.unreachable, null);
});
