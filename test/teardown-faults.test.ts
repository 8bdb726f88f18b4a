import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { api, connectAs, leaseRow, loginError, roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';
import { addGroupRole } from './helpers/postgres.js';

let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('faults', { claims: { sub: 'faults:*' }, grant_role: 'app_migrators', max_active_leases: 50 });
});
after(async () => b?.close());

describe('teardown with one database refusing connections', () => {
  test('only the role owning something there waits; the batch\'s other roles are dropped, and the reaper finishes once the database accepts connections', async () => {
    const creds = [];
    for (let i = 0; i < 6; i++) {
      const res = await b.issue(await b.token({ sub: `faults:u${i}` }), { ttl: 300 });
      assert.equal(res.status, 201, JSON.stringify(res.body));
      creds.push(res.body);
    }
    // A database at its connection limit answers every new connection with 53300, which is a
    // connection error, but says nothing about the cluster.
    await b.pg.query('CREATE DATABASE faults_full CONNECTION LIMIT 0', [], 'postgres');
    const [stuck, ...rest] = creds;
    await b.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO "${stuck.username}"`, [], 'faults_full');

    const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { policy: 'faults' });
    assert.equal(res.status, 500, JSON.stringify(res.body));
    assert.equal(res.body.code, 'REVOKE_INCOMPLETE');
    for (const cred of rest) {
      assert.equal(await roleExists(b.pg, cred.username), false, cred.username);
      assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked', cred.username);
    }
    const row = await leaseRow(b.pg, stuck.lease_id);
    assert.equal(row.state, 'revoking');
    assert.match(row.last_error, /faults_full: 53300/);
    assert.ok(await loginError(b.pg, stuck), 'its login is already refused');

    await b.pg.query('ALTER DATABASE faults_full CONNECTION LIMIT -1', [], 'postgres');
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [stuck.lease_id]);
    const stats = await b.reaper.reap({ requireLeadership: false });
    assert.equal(stats.failed, 0, JSON.stringify(stats));
    assert.equal(await roleExists(b.pg, stuck.username), false);
    const [owner] = await b.pg.query(`SELECT tableowner FROM pg_tables WHERE tablename = 'kept'`, [], 'faults_full');
    assert.deepEqual(owner, { tableowner: 'app_migrators' });
  });
});

describe('teardown of a lease whose grant_role was dropped', () => {
  test('what its role owns goes to the broker\'s own role, as for an orphan, and the revocation completes', async () => {
    await addGroupRole(b.pg, 'faults_gone');
    await b.putPolicy('gone', { claims: { sub: 'gone:*' }, grant_role: 'faults_gone' });
    const owner = await b.token({ sub: 'gone:owner' });
    const cred = (await b.issue(owner, { ttl: 300 })).body;
    const session = await connectAs(b.pg, cred);
    await session.query('CREATE TABLE public.gone_kept (id int)');
    await session.end();
    await b.pg.query('DROP ROLE faults_gone', [], 'postgres');

    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 200, JSON.stringify({ ...res.body, last_error: (await leaseRow(b.pg, cred.lease_id)).last_error }));
    assert.equal(res.body.state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    // The table outlives the lease, as it would have with its group.
    const [kept] = await b.pg.query(`SELECT tableowner FROM pg_tables WHERE tablename = 'gone_kept'`);
    assert.deepEqual(kept, { tableowner: 'broker' });
  });
});
