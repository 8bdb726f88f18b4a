import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { api, connectAs, leaseRow, loginError, roleExists, startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';
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

describe('PostgreSQL lost during a synchronous revocation\'s teardown, and back when it is recorded', () => {
  // The teardown's REASSIGN OWNED waits on a lock held here; its connection is then terminated
  // as in a server restart (57P01), while the pool's connections that record the attempt live on.
  async function revokeDuringOutage(sub: string, send: (owner: string, leaseId: string) => Promise<{ statusCode: number; headers: Record<string, unknown>; json(): any }>) {
    const owner = await b.token({ sub });
    const cred = (await b.issue(owner, { ttl: 300 })).body;
    const table = `outage_${sub.replace(/\W/g, '_')}`;
    const session = await connectAs(b.pg, cred);
    await session.query(`CREATE TABLE public.${table} (id int)`);
    await session.end();
    const holder = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/postgres$/, '/broker') });
    holder.on('error', () => undefined);
    await holder.connect();
    try {
      await holder.query(`BEGIN; LOCK TABLE public.${table} IN ACCESS EXCLUSIVE MODE`);
      const answer = send(owner, cred.lease_id);
      const { pid } = await waitFor('the teardown waiting on the lock', async () => (await b.pg.query(
        `SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-credential-broker reaper' AND wait_event_type = 'Lock'`))[0]);
      await b.pg.query('SELECT pg_terminate_backend($1)', [pid]);
      const res = await answer;
      assert.equal(res.statusCode, 503, JSON.stringify(res.json()));
      assert.equal(res.json().code, 'DATABASE_UNAVAILABLE');
      assert.equal(res.headers['retry-after'], '5');
    } finally {
      await holder.end();
    }
    // The failed attempt is recorded, and the reaper finishes the teardown.
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.equal(row.state, 'revoking');
    assert.equal(row.attempts, 1);
    assert.match(row.last_error, /57P01/);
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 0);
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
  }

  test('DELETE /leases/{id} answers 503 DATABASE_UNAVAILABLE with Retry-After, not 500', async () => {
    await revokeDuringOutage('faults:outage1', (owner, id) => b.app.inject({ method: 'DELETE', url: `/leases/${id}`, headers: { authorization: `Bearer ${owner}` } }));
  });

  test('POST /leases/revoke answers 503 DATABASE_UNAVAILABLE with Retry-After, not 500', async () => {
    const admin = await b.adminToken();
    await revokeDuringOutage('faults:outage2', () => b.app.inject({
      method: 'POST', url: '/leases/revoke', headers: { authorization: `Bearer ${admin}` }, payload: { subject: 'faults:outage2' } }));
  });
});
