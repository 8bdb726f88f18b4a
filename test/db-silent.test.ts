import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { startTestBroker, type TestBroker } from './helpers/broker.js';
import { startRelayedPostgres, type RelayedPostgres } from './helpers/relay.js';

// A PostgreSQL that stops answering without closing anything, as a failover that leaves the old
// address silent does: TCP stays up, bytes go nowhere. Without BROKER_QUERY_TIMEOUT a request
// then waits until the kernel gives up on the connection, many minutes later (here: until the
// test's hang guard fails it).
const HANG_GUARD = { timeout: 60_000 };

let db: RelayedPostgres;
let b: TestBroker;

before(async () => {
  db = await startRelayedPostgres();
  b = await startTestBroker({
    pg: db.pgs,
    env: { DATABASE_URL: db.url, BROKER_LOCK_TIMEOUT: '1', BROKER_QUERY_TIMEOUT: '2', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' },
  });
  await b.putPolicy('silent', { claims: { sub: 'silent:*' } });
});
after(async () => {
  await b?.close();
  await db?.stop();
});

describe('a PostgreSQL that goes silent', () => {
  test('requests on open connections answer 503 DATABASE_UNAVAILABLE instead of hanging; those connections are discarded, and issuance works once it answers', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'silent:a' });
    const first = await b.issue(token);
    assert.equal(first.status, 201, JSON.stringify(first.body));
    // Idle pooled connections, so the requests below go out on connections that were open
    // before the silence (new ones would fail at connecting, which the pool bounded already).
    await Promise.all(Array.from({ length: 4 }, () => b.app.db.query('SELECT pg_sleep(0.05)')));
    assert.ok(b.app.db.idleCount >= 2, `idle connections: ${b.app.db.idleCount}`);
    const logged = b.logs.length;

    db.relay.silent = true;
    let during;
    let ready;
    try {
      [during, ready] = await Promise.all([b.issue(token), b.app.inject({ method: 'GET', url: '/readyz' })]);
    } finally {
      db.relay.silent = false;
    }
    assert.equal(during.status, 503, JSON.stringify(during.body));
    assert.equal(during.body.code, 'DATABASE_UNAVAILABLE');
    assert.ok(Number(during.headers['retry-after']) > 0);
    assert.equal(ready.statusCode, 503, ready.body);
    const unavailable = b.logs.slice(logged).filter((l) => l.includes('PostgreSQL unavailable'));
    assert.ok(unavailable.some((l) => l.includes('Query read timeout')), `the issuance gave up on its silent connection: ${unavailable.join('\n')}`);
    assert.ok(!b.logs.slice(logged).some((l) => l.includes('could not record audit event')), 'no audit write was tried against the silent server');

    // The connections that went silent were discarded, not handed to the next request.
    const again = await b.issue(token);
    assert.equal(again.status, 201, JSON.stringify(again.body));
    const leases = await db.pgs.query('SELECT id::text FROM broker.leases WHERE subject = $1 ORDER BY created_at', ['silent:a']);
    assert.deepEqual(leases.map((l) => l.id), [first.body.lease_id, again.body.lease_id], 'the request that got 503 left no lease');
  });
});
