import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Reaper } from '../src/reaper/reaper.js';
import { leaseRow, roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';

// The reaper's pauses between role statements (reaper.ts): only for expired leases, and never
// holding up stop(). Its schedule is pushed out of the way; each test drives a Reaper of its own.
let b: TestBroker;
before(async () => {
  b = await startTestBroker({ env: { BROKER_REAPER_INTERVAL: '3600' } });
  await b.putPolicy('paced', { claims: { sub: 'pace:*' }, max_active_leases: 100 });
});
after(async () => {
  await b?.close();
  await b?.pg.stop();
});

type Pausing = { pause(ms: number): Promise<void> };

function reaperRecordingPauses(): { reaper: Reaper; pauses: number[] } {
  const reaper = new Reaper({ pool: b.app.db, config: b.config, log: b.app.log });
  const pauses: number[] = [];
  (reaper as unknown as Pausing).pause = async (ms: number) => {
    pauses.push(ms);
  };
  return { reaper, pauses };
}

async function issue(sub: string): Promise<{ lease_id: string; username: string }> {
  const res = await b.issue(await b.token({ sub }));
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

test('ending expired leases pauses after role statements; a revocation the reaper retries does not', async () => {
  const expired = [await issue('pace:expired:1'), await issue('pace:expired:2')];
  await b.pg.query(`UPDATE broker.leases SET expires_at = now() - interval '1 second' WHERE id = ANY($1)`, [expired.map((c) => c.lease_id)], 'broker');
  const first = reaperRecordingPauses();
  try {
    assert.equal((await first.reaper.reap({ requireLeadership: false })).ended, 2);
  } finally {
    await first.reaper.stop();
  }
  assert.ok(first.pauses.length >= 2, `paused ${first.pauses.length} times`);
  for (const c of expired) assert.equal(await roleExists(b.pg, c.username), false);

  // A revocation left for the reaper (its login may still work): no pause at all.
  const revoking = [await issue('pace:revoked:1'), await issue('pace:revoked:2')];
  await b.pg.query(`UPDATE broker.leases SET state = 'revoking', ended_at = now(), ended_by = 'admin:test', end_reason = 'test', next_attempt_at = now()
                     WHERE id = ANY($1)`, [revoking.map((c) => c.lease_id)], 'broker');
  const second = reaperRecordingPauses();
  try {
    assert.equal((await second.reaper.reap({ requireLeadership: false })).ended, 2);
  } finally {
    await second.reaper.stop();
  }
  assert.deepEqual(second.pauses, []);
  for (const c of revoking) {
    assert.equal(await roleExists(b.pg, c.username), false);
    assert.equal((await leaseRow(b.pg, c.lease_id)).state, 'revoked');
  }
});

test('stop() ends a pause in progress, and a pause asked for after it returns at once', async () => {
  const reaper = new Reaper({ pool: b.app.db, config: b.config, log: b.app.log });
  const pausing = reaper as unknown as Pausing;
  const settled = (p: Promise<void>) => Promise.race([p.then(() => 'ended'), new Promise((r) => setTimeout(() => r('still pausing'), 200))]);
  const long = pausing.pause(60_000);
  assert.equal(await settled(long), 'still pausing');
  await reaper.stop();
  assert.equal(await settled(long), 'ended');
  assert.equal(await settled(pausing.pause(60_000)), 'ended');
});
