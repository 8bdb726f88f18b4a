import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { identityLockKey, LEASE_COLUMNS } from '../src/leases/repository.js';
import {
  ADMIN_SUB, api, auditTypes, connectAs, leaseRow, loginError, roleExists, startTestBroker, untilPast, waitFor, type TestBroker,
} from './helpers/broker.js';

let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_REAPER_INTERVAL: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  // Two policies admitting the same people: bulk revocation must cross policy boundaries.
  await b.putPolicy('app', { claims: { sub: 'user:*' }, max_active_leases: 10 });
  await b.putPolicy('app2', { claims: { sub: 'user:*' }, max_active_leases: 10 });
});
after(async () => b?.close());

async function issueOk(sub: string, policy = 'app', ttl = 300): Promise<any> {
  const res = await b.issue(await b.token({ sub }), { policy, ttl });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

describe('DELETE /leases/{id}', () => {
  test('ends the open session, the role and future logins before answering 200 revoked', async () => {
    const owner = await b.token({ sub: 'user:alice' });
    const cred = await issueOk('user:alice');
    const session = await connectAs(b.pg, cred);
    try {
      assert.equal((await session.query('SELECT count(*)::int AS n FROM public.widgets')).rows[0].n, 3);
      const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.id, cred.lease_id);
      assert.equal(res.body.state, 'revoked');
      assert.equal(res.body.ended_by, `${b.issuer.issuer} user:alice`);
      assert.equal(res.body.end_reason, 'revoked by request');
      assert.ok(res.body.ended_at);
      await assert.rejects(session.query('SELECT 1'), 'the very next query on the open session fails');
    } finally {
      await session.end().catch(() => undefined);
    }
    assert.equal(await loginError(b.pg, cred), '28P01');
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'lease.revoked']);

    const again = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(again.status, 200, 'revoking twice is harmless');
    assert.equal(again.body.state, 'revoked');
    assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'lease.revoked', 'revocation.requested'],
      'and records the request, but no second lease.revoked');
  });

  test('takes a reason in its query, kept as end_reason and in its event; another parameter is refused, revoking nothing', async () => {
    const owner = await b.token({ sub: 'user:leaked' });
    const cred = await issueOk('user:leaked');
    const other = await api(b, 'DELETE', `/leases/${cred.lease_id}?why=leaked`, owner);
    assert.equal(other.status, 400, JSON.stringify(other.body));
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'active');
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}?reason=${encodeURIComponent('password pasted in a ticket')}`, owner);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual([res.body.state, res.body.end_reason], ['revoked', 'password pasted in a ticket']);
    const [event] = await b.pg.query(`SELECT reason FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.revoked'`, [cred.lease_id]);
    assert.equal(event.reason, 'password pasted in a ticket');
  });

  test('a teardown that cannot finish answers 500 REVOKE_INCOMPLETE, audited under the caller; a retry finishes it', async () => {
    const cred = await issueOk('user:sealed');
    // An object in a database the broker may not connect to: REASSIGN/DROP OWNED cannot reach it.
    await b.pg.query('CREATE DATABASE revoke_sealed', [], 'postgres');
    await b.pg.query('REVOKE CONNECT ON DATABASE revoke_sealed FROM PUBLIC', [], 'postgres');
    await b.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO "${cred.username}"`, [], 'revoke_sealed');
    const admin = await b.adminToken();
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, admin);
    assert.equal(res.status, 500, JSON.stringify(res.body));
    assert.equal(res.body.code, 'REVOKE_INCOMPLETE');
    assert.equal(await loginError(b.pg, cred), '28000', 'the role is NOLOGIN all the same');
    const events = await b.pg.query('SELECT type, issuer, subject, reason FROM broker.audit_events WHERE request_id = $1 ORDER BY id', [res.body.request_id]);
    const { last_error } = await leaseRow(b.pg, cred.lease_id);
    // The failed attempt, with the error the lease row holds, then the request's own failure.
    assert.deepEqual(events, [
      { type: 'lease.teardown_failed', issuer: b.issuer.issuer, subject: ADMIN_SUB, reason: last_error },
      { type: 'request.failed', issuer: b.issuer.issuer, subject: ADMIN_SUB, reason: 'REVOKE_INCOMPLETE' },
    ]);

    await b.pg.query('GRANT CONNECT ON DATABASE revoke_sealed TO broker', [], 'postgres');
    const retried = await api(b, 'DELETE', `/leases/${cred.lease_id}`, admin);
    assert.equal(retried.status, 200, JSON.stringify(retried.body));
    assert.equal(retried.body.state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    const [{ n }] = await b.pg.query(`SELECT count(*)::int AS n FROM broker.audit_events WHERE request_id = $1`, [retried.body.request_id]);
    assert.equal(n, 1, 'the successful retry records its lease.revoked only');
  });

  test('a non-owner gets 404 and changes nothing; an admin can revoke anyone\'s lease', async () => {
    const cred = await issueOk('user:carol');
    const session = await connectAs(b.pg, cred);
    try {
      const stranger = await api(b, 'DELETE', `/leases/${cred.lease_id}`, await b.token({ sub: 'user:mallory' }));
      assert.equal(stranger.status, 404);
      assert.equal(stranger.body.code, 'LEASE_NOT_FOUND');
      const unknown = await api(b, 'DELETE', '/leases/00000000-0000-4000-8000-000000000000', await b.token({ sub: 'user:carol' }));
      assert.equal(unknown.status, 404, 'the same answer as for a lease that does not exist');
      assert.equal((await session.query('SELECT 1 AS one')).rows[0].one, 1, 'the session survived');
      assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'active');

      const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, await b.adminToken());
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.state, 'revoked');
      assert.equal(res.body.ended_by, `${b.issuer.issuer} ${ADMIN_SUB}`);
      await assert.rejects(session.query('SELECT 1'));
    } finally {
      await session.end().catch(() => undefined);
    }
    assert.equal(await roleExists(b.pg, cred.username), false);
    const [event] = await b.pg.query(`SELECT subject, detail FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.revoked'`, [cred.lease_id]);
    assert.equal(event.subject, ADMIN_SUB, 'the audit event names the admin who acted');
    assert.equal(event.detail.owner_subject, 'user:carol');
  });
});

describe('a lease already past its expiry', () => {
  test('revoked before the reaper reached it, it ends as expired, at its expiry, and says so in its event', async () => {
    const owner = await b.token({ sub: 'user:late' });
    const cred = await issueOk('user:late', 'app', 1);
    await untilPast(cred.expires_at);
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'active', 'not reaped yet');
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual([res.body.state, res.body.end_reason, res.body.ended_by], ['expired', 'expired', 'reaper']);
    assert.equal(new Date(res.body.ended_at).getTime(), new Date(cred.expires_at).getTime());
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'lease.expired']);
    // A live one revoked the same way reads revoked.
    const live = await issueOk('user:late');
    const revoked = await api(b, 'DELETE', `/leases/${live.lease_id}`, owner);
    assert.deepEqual([revoked.body.state, revoked.body.end_reason], ['revoked', 'revoked by request']);
  });
});

describe('DELETE racing the reaper', () => {
  test('a lease past expiry revoked while the reaper reaps it ends once, and DELETE still answers 200', async () => {
    const owner = await b.token({ sub: 'user:racer' });
    const creds = [];
    for (let i = 0; i < 6; i++) creds.push(await issueOk('user:racer', 'app', 1));
    await untilPast(creds[5].expires_at);
    for (const cred of creds) {
      const [del] = await Promise.all([api(b, 'DELETE', `/leases/${cred.lease_id}`, owner), b.reaper.reap()]);
      assert.equal(del.status, 200, JSON.stringify(del.body));
      assert.ok(['expired', 'revoked'].includes(del.body.state), del.body.state);
      assert.equal(await roleExists(b.pg, cred.username), false);
      // The request is on record either way (revocation.requested when the reaper had it first).
      const ends = (await auditTypes(b.pg, cred.lease_id)).filter((t) => t === 'lease.expired' || t === 'lease.revoked');
      assert.equal(ends.length, 1, `one end event, not ${JSON.stringify(ends)}`);
    }
  });

  test('DELETE of a lease the reaper is tearing down waits for that teardown, then answers 200', async () => {
    const cred = await issueOk('user:slow', 'app', 1);
    await b.pg.query(`CREATE TABLE public.slow_table (id int); ALTER TABLE public.slow_table OWNER TO "${cred.username}"`, [], 'otherdb');
    // A superuser transaction holding the table stalls the reaper's REASSIGN OWNED mid-teardown.
    const blocker = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/postgres$/, '/otherdb') });
    blocker.on('error', () => undefined);
    await blocker.connect();
    try {
      await blocker.query('BEGIN; LOCK TABLE public.slow_table IN ACCESS EXCLUSIVE MODE');
      await untilPast(cred.expires_at);
      const reaping = b.reaper.reap();
      await waitFor('the reaper to wait on the lock', async () => (await b.pg.query(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-credential-broker reaper' AND wait_event_type = 'Lock'`)).length > 0);
      assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoking');
      const [{ since }] = await b.pg.query<{ since: Date }>('SELECT clock_timestamp() AS since');
      const deleting = api(b, 'DELETE', `/leases/${cred.lease_id}`, await b.token({ sub: 'user:slow' }));
      // DELETE polls the lease row while the teardown is someone else's: COMMIT only once it does.
      await waitFor('DELETE to wait for the teardown', async () => (await b.pg.query(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-credential-broker'
            AND query LIKE 'SELECT state,%FROM broker.leases WHERE id = $1' AND query_start > $1`, [since])).length > 0);
      await blocker.query('COMMIT');
      const del = await deleting;
      assert.equal(del.status, 200, JSON.stringify(del.body));
      assert.equal(del.body.state, 'expired');
      assert.equal((await reaping).ended, 1);
    } finally {
      await blocker.end();
    }
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'revocation.requested', 'lease.expired'],
      'the DELETE that found the teardown under way is on record, and the lease ended once');
  });
});

describe('POST /leases/revoke', () => {
  test('revoking by subject ends exactly that subject\'s active leases, across policies', async () => {
    const alice = [await issueOk('user:bulk-alice', 'app'), await issueOk('user:bulk-alice', 'app'), await issueOk('user:bulk-alice', 'app2')];
    const dave = [await issueOk('user:bulk-dave', 'app'), await issueOk('user:bulk-dave', 'app2')];
    // Already ended leases of the subject are not counted again.
    const ended = await issueOk('user:bulk-alice', 'app2');
    assert.equal((await api(b, 'DELETE', `/leases/${ended.lease_id}`, await b.token({ sub: 'user:bulk-alice' }))).status, 200);
    const session = await connectAs(b.pg, alice[2]);
    try {
      const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'user:bulk-alice', reason: 'left the company' });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.revoked, 3);
      assert.deepEqual([...res.body.lease_ids].sort(), alice.map((c) => c.lease_id).sort());
      await assert.rejects(session.query('SELECT 1'));
    } finally {
      await session.end().catch(() => undefined);
    }
    for (const c of alice) {
      assert.equal(await roleExists(b.pg, c.username), false);
      const lease = await leaseRow(b.pg, c.lease_id);
      assert.equal(lease.state, 'revoked');
      assert.equal(lease.end_reason, 'left the company');
    }
    for (const c of dave) {
      assert.equal((await leaseRow(b.pg, c.lease_id)).state, 'active');
      assert.equal(await loginError(b.pg, c), undefined, 'someone else\'s credential still works');
    }

    const narrowed = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'user:bulk-dave', policy: 'app2' });
    assert.equal(narrowed.status, 200);
    assert.deepEqual(narrowed.body, { revoked: 1, lease_ids: [dave[1].lease_id] });
    assert.equal((await leaseRow(b.pg, dave[0].lease_id)).state, 'active');
    assert.equal(await loginError(b.pg, dave[1]), '28P01');
  });

  test('the caller\'s reason is only text: "expired" still ends the leases as revoked', async () => {
    const cred = await issueOk('user:bulk-reason');
    const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'user:bulk-reason', reason: 'expired' });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    const lease = await leaseRow(b.pg, cred.lease_id);
    assert.deepEqual([lease.state, lease.end_reason, lease.ended_by], ['revoked', 'expired', `${b.issuer.issuer} ${ADMIN_SUB}`]);
    assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'lease.revoked']);
  });

  test('a credential being issued to the subject at that moment is revoked too, not left behind', async () => {
    const first = await issueOk('user:bulk-race');
    // Stand in for an issuance mid-transaction: its identity lock held, its lease not committed yet.
    const issuing = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/postgres$/, '/broker') });
    issuing.on('error', () => undefined);
    await issuing.connect();
    try {
      await issuing.query('BEGIN');
      await issuing.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [identityLockKey(b.issuer.issuer, 'user:bulk-race')]);
      const revoking = api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'user:bulk-race' });
      await waitFor('the revocation to wait on the issuance lock', async () => (await b.pg.query(
        `SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND pid <> pg_backend_pid()`)).length > 0);
      const cols = LEASE_COLUMNS.split(',').map((c) => c.trim());
      const [late] = (await issuing.query(
        `INSERT INTO broker.leases (${cols.join(', ')})
         SELECT ${cols.map((c) => (c === 'id' ? 'gen_random_uuid()' : c === 'username' ? `username || '_late'` : c)).join(', ')}
           FROM broker.leases WHERE id = $1 RETURNING id`, [first.lease_id])).rows;
      await issuing.query('COMMIT');
      const res = await revoking;
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.deepEqual([...res.body.lease_ids].sort(), [first.lease_id, late.id].sort());
      assert.equal((await leaseRow(b.pg, late.id)).state, 'revoked');
    } finally {
      await issuing.end();
    }
    assert.equal(await roleExists(b.pg, first.username), false);
  });

  test('needs an admin (403) and at least one of subject, issuer or policy (400)', async () => {
    const victim = await issueOk('user:bulk-erin');
    const notAdmin = await api(b, 'POST', '/leases/revoke', await b.token({ sub: 'user:bulk-erin' }), { subject: 'user:bulk-erin' });
    assert.equal(notAdmin.status, 403);
    assert.equal(notAdmin.body.code, 'NOT_ADMIN');
    const anonymous = await api(b, 'POST', '/leases/revoke', undefined, { subject: 'user:bulk-erin' });
    assert.equal(anonymous.status, 401);
    for (const body of [{}, { reason: 'no selector' }, { subject: '' }, { subject: 'user:bulk-erin', extra: 1 }]) {
      const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), body);
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.equal(res.body.code, 'BAD_REQUEST');
    }
    // Naming nothing gets the same answer with or without a reason, one that says what to name
    // (an empty body once got the schema's "must NOT have fewer than 1 properties").
    for (const body of [{}, { reason: 'no selector' }]) {
      const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), body);
      assert.equal(res.body.detail, 'name at least one of subject, issuer or policy', JSON.stringify(body));
    }
    assert.equal((await leaseRow(b.pg, victim.lease_id)).state, 'active', 'nothing was revoked by the refused calls');

    const byIssuer = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { issuer: 'https://nobody.example' });
    assert.deepEqual(byIssuer.body, { revoked: 0, lease_ids: [] });
    const ok = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'user:bulk-erin' });
    assert.equal(ok.status, 200);
    assert.deepEqual(ok.body, { revoked: 1, lease_ids: [victim.lease_id] });
  });
});
