import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { Reaper, type ReapStats } from '../src/reaper/reaper.js';
import { leaseRow, loginError, roleExists, startTestBroker, untilPast, type TestBroker } from './helpers/broker.js';

// The reaper's pauses between role statements (reaper.ts): only for expired leases, and never
// holding up stop(); and what stop() finishes. Its schedule is pushed out of the way; each test
// drives a Reaper of its own.
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

test('graceful shutdown: stop() during a run finishes the batch in hand and resolves; a later run picks up the rest', async () => {
  await b.reaper.reap(); // leftovers of earlier tests would otherwise share the batches below
  const creds = [];
  for (let i = 0; i < 10; i++) {
    const res = await b.issue(await b.token({ sub: `pace:shutdown-${i}` }), { ttl: 1 });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    creds.push(res.body);
  }
  await untilPast(creds[creds.length - 1].expires_at);
  await b.reaper.stop(); // hand leadership over to the reapers below
  const deps = { pool: b.app.db, config: b.config, log: b.app.log, brokerRole: () => b.app.brokerRole() };
  const first = new Reaper({ ...deps, batchSize: 2 });
  let runDone = false;
  let stopping: Promise<void> | undefined;
  first.once('batch', () => {
    assert.equal(runDone, false);
    stopping = first.stop();
  });
  const stats: ReapStats = await first.reap().finally(() => (runDone = true));
  assert.ok(stopping, 'stop() was called while the run was in progress');
  await stopping;
  assert.equal(stats.ended, 2, JSON.stringify(stats));
  const ids = creds.map((c) => c.lease_id);
  const left = await b.pg.query(`SELECT count(*)::int AS n FROM broker.leases WHERE id = ANY($1) AND state <> 'expired'`, [ids]);
  assert.equal(left[0].n, 8);

  const later = new Reaper(deps);
  try {
    const again = await later.reap();
    assert.equal(again.leader, true, 'the stopped reaper released leadership');
    assert.equal(again.ended, 8, JSON.stringify(again));
  } finally {
    await later.stop();
  }
  const counts = await b.pg.query(
    `SELECT l.id, l.state, (SELECT count(*)::int FROM broker.audit_events a WHERE a.lease_id = l.id AND a.type = 'lease.expired') AS n
       FROM broker.leases l WHERE l.id = ANY($1)`, [ids]);
  assert.deepEqual(counts.map((c) => [c.state, c.n]), ids.map(() => ['expired', 1]));
  for (const c of creds) {
    assert.equal(await roleExists(b.pg, c.username), false);
    assert.equal(await loginError(b.pg, c), '28P01');
  }
});
