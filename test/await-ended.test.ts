import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { awaitEnded } from '../src/leases/claims.js';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

// awaitEnded is what DELETE /leases/{id} waits with while another teardown holds the lease.
let b: TestBroker;
let db: pg.Client;

before(async () => {
  b = await startTestBroker();
  await b.putPolicy('ae', { claims: { sub: 'ae:*' } });
  db = new pg.Client({ connectionString: b.pg.brokerUrl });
  await db.connect();
});
after(async () => {
  await db?.end();
  await b?.close();
});

/** The broker's own connection, counting the polls awaitEnded makes. */
function counting(): { queries: number; query: pg.Client['query'] } {
  const counter = { queries: 0, query: ((...args: Parameters<pg.Client['query']>) => {
    counter.queries++;
    return (db.query as (...a: unknown[]) => unknown)(...args);
  }) as pg.Client['query'] };
  return counter;
}

async function leaseIn(sub: string, state: string, claimedByPid: number | null): Promise<string> {
  const res = await b.issue(await b.token({ sub }));
  assert.equal(res.status, 201, JSON.stringify(res.body));
  await b.pg.query('UPDATE broker.leases SET state = $2, claimed_by_pid = $3 WHERE id = $1', [res.body.lease_id, state, claimedByPid]);
  return res.body.lease_id;
}

test('a teardown nobody holds any more ends the wait at the first look; a held one is waited for', async () => {
  // Unclaimed: the other claimer recorded its failure and let go, so waiting changes nothing.
  const released = await leaseIn('ae:released', 'revoking', null);
  const first = counting();
  assert.equal(await awaitEnded(first, released, 2000), null);
  assert.equal(first.queries, 1, 'stopped after one look, not at the deadline');

  // Claimed by a live teardown: polled until the deadline, as long as it stays unfinished.
  const held = await leaseIn('ae:held', 'revoking', 12345);
  const second = counting();
  assert.equal(await awaitEnded(second, held, 2000), null);
  assert.ok(second.queries > 1, `polled ${second.queries} times`);
});

test('a held teardown that finishes during the wait gives its final state', async () => {
  const held = await leaseIn('ae:finishes', 'revoking', 12345);
  // Kept and awaited, so a failing UPDATE fails the test with its own error.
  const finished = new Promise((r) => setTimeout(r, 300)).then(() =>
    b.pg.query(`UPDATE broker.leases SET state = 'revoked', claimed_by_pid = NULL WHERE id = $1`, [held]));
  const [ended] = await Promise.all([awaitEnded(counting(), held, 30_000), finished]);
  assert.equal(ended, 'revoked');
  // And a lease already expired answers at once.
  const expired = await leaseIn('ae:expired', 'expired', null);
  const c = counting();
  assert.equal(await awaitEnded(c, expired, 30_000), 'expired');
  assert.equal(c.queries, 1);
});
