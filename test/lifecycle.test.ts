import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  api, auditTypes, connectAs, leaseRow, roleExists, startTestBroker, untilPast, waitFor, type TestBroker,
} from './helpers/broker.js';

let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_REAPER_INTERVAL: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('svc', { claims: { sub: 'svc:*' }, default_ttl: 60, max_ttl: 120, max_active_leases: 50 });
  await b.putPolicy('migrate', { claims: { sub: 'mig:*' }, grant_role: 'app_migrators', database: 'otherdb' });
  await b.putPolicy('migrate-assume', { claims: { sub: 'assume:*' }, grant_role: 'app_migrators', database: 'otherdb', assume_role: true });
});
after(async () => b?.close());

// expires_at is rounded up to a whole second, so a lease lives between ttl and ttl + 1 seconds
// from issuance; tests that log in before expiry still use ttl >= 3, since a loaded machine can
// take a second or more between the answer and the login.
async function issueOk(sub: string, body: Record<string, unknown> = {}): Promise<any> {
  const res = await b.issue(await b.token({ sub }), body);
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

async function tableOwner(database: string, table: string): Promise<string | undefined> {
  const rows = await b.pg.query(`SELECT tableowner FROM pg_tables WHERE schemaname = 'public' AND tablename = $1`, [table], database);
  return rows[0]?.tableowner;
}

describe('expiry', () => {
  test('a reaper run disconnects the open session of an expired lease, drops its role and records lease.expired', async () => {
    const cred = await issueOk('svc:expiry', { ttl: 3 });
    const session = await connectAs(b.pg, cred);
    try {
      await untilPast(cred.expires_at);
      // VALID UNTIL only stops new logins: the session survives expiry until the reaper acts.
      assert.equal((await session.query('SELECT 1 AS one')).rows[0].one, 1);
      assert.equal(await roleExists(b.pg, cred.username), true);

      const stats = await b.reaper.reap();
      assert.equal(stats.leader, true);
      assert.ok(stats.ended >= 1, JSON.stringify(stats));
      await assert.rejects(session.query('SELECT 1'));
    } finally {
      await session.end().catch(() => undefined);
    }
    assert.equal(await roleExists(b.pg, cred.username), false);
    const lease = await leaseRow(b.pg, cred.lease_id);
    assert.equal(lease.state, 'expired');
    assert.equal(lease.end_reason, 'expired');
    assert.equal(lease.ended_by, 'reaper');
    assert.equal(new Date(lease.ended_at).toISOString(), cred.expires_at);
    assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'lease.expired']);
    const viaApi = await api(b, 'GET', `/leases/${cred.lease_id}`, await b.token({ sub: 'svc:expiry' }));
    assert.equal(viaApi.status, 200);
    assert.equal(viaApi.body.state, 'expired');
  });

  test('with BROKER_REAPER_INTERVAL=1 the scheduled reaper does the same on its own', async () => {
    assert.equal(b.config.reaperIntervalSeconds, 1);
    const cred = await issueOk('svc:cron', { ttl: 3 });
    const session = await connectAs(b.pg, cred);
    b.reaper.start();
    try {
      await waitFor('the cron-driven reaper to drop the role', async () => !(await roleExists(b.pg, cred.username)), 8000, 100);
      await assert.rejects(session.query('SELECT 1'));
      assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'expired');
      assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'lease.expired']);
    } finally {
      await b.reaper.stop();
      await session.end().catch(() => undefined);
    }
  });
});

describe('owned objects', () => {
  test('a table created in a second database and granted onward survives the lease, owned by grant_role', async () => {
    const cred = await issueOk('mig:ci', { ttl: 4 });
    assert.equal(cred.database, 'otherdb');
    const other = await connectAs(b.pg, cred);
    const home = await connectAs(b.pg, { ...cred, database: 'broker' });
    try {
      await other.query('CREATE TABLE public.made_by_lease (id int PRIMARY KEY)');
      await other.query('INSERT INTO public.made_by_lease VALUES (1), (2)');
      await other.query('GRANT SELECT ON public.made_by_lease TO app_readers');
      await home.query('CREATE TABLE public.also_by_lease (id int)');
    } finally {
      await home.end();
    }
    assert.equal(await tableOwner('otherdb', 'made_by_lease'), cred.username);

    await untilPast(cred.expires_at);
    const stats = await b.reaper.reap();
    assert.equal(stats.failed, 0, JSON.stringify(stats));
    await assert.rejects(other.query('SELECT 1'));
    await other.end().catch(() => undefined);

    assert.equal(await roleExists(b.pg, cred.username), false);
    const lease = await leaseRow(b.pg, cred.lease_id);
    assert.equal(lease.state, 'expired');
    assert.equal(lease.last_error, null);
    assert.equal(await tableOwner('otherdb', 'made_by_lease'), 'app_migrators');
    assert.equal(await tableOwner('broker', 'also_by_lease'), 'app_migrators');
    const [kept] = await b.pg.query(
      `SELECT (SELECT count(*)::int FROM public.made_by_lease) AS n, has_table_privilege('app_readers', 'public.made_by_lease', 'SELECT') AS readable`,
      [], 'otherdb');
    assert.deepEqual(kept, { n: 2, readable: true });
  });

  test('with assume_role the session runs as grant_role, so its table belongs to grant_role from creation', async () => {
    const cred = await issueOk('assume:ci', { ttl: 60 });
    const session = await connectAs(b.pg, cred);
    try {
      const { rows } = await session.query('SELECT current_user AS cur, session_user AS ses');
      assert.deepEqual(rows[0], { cur: 'app_migrators', ses: cred.username });
      await session.query('CREATE TABLE public.assumed_table (id int)');
      assert.equal(await tableOwner('otherdb', 'assumed_table'), 'app_migrators');
      // A session may still drop the group role; what it creates then is reassigned on teardown.
      await session.query('SET ROLE NONE');
      await session.query('CREATE TABLE public.own_table (id int)');
      assert.equal(await tableOwner('otherdb', 'own_table'), cred.username);
    } finally {
      await session.end();
    }
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, await b.token({ sub: 'assume:ci' }));
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.equal(await tableOwner('otherdb', 'assumed_table'), 'app_migrators');
    assert.equal(await tableOwner('otherdb', 'own_table'), 'app_migrators');
  });
});

describe('renew', () => {
  const validUntil = async (username: string) =>
    new Date((await b.pg.query('SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1', [username]))[0].rolvaliduntil).toISOString();

  test('moves VALID UNTIL, is capped at max_expires_at, and is only for the owner', async () => {
    const owner = await b.token({ sub: 'svc:renew' });
    const cred = await issueOk('svc:renew', { ttl: 30 });
    assert.equal(await validUntil(cred.username), cred.expires_at);

    const stranger = await api(b, 'POST', `/leases/${cred.lease_id}/renew`, await b.token({ sub: 'svc:someone-else' }), { ttl: 90 });
    assert.equal(stranger.status, 404);
    assert.equal(stranger.body.code, 'LEASE_NOT_FOUND');
    assert.equal(await validUntil(cred.username), cred.expires_at, 'a refused renew changes nothing');

    const renewed = await api(b, 'POST', `/leases/${cred.lease_id}/renew`, owner, { ttl: 90 });
    assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
    assert.equal(renewed.body.capped, false);
    assert.ok(new Date(renewed.body.expires_at).getTime() >= new Date(cred.expires_at).getTime() + 59_000, renewed.body.expires_at);
    assert.ok(new Date(renewed.body.expires_at) < new Date(cred.max_expires_at));
    assert.equal(await validUntil(cred.username), renewed.body.expires_at);

    const capped = await api(b, 'POST', `/leases/${cred.lease_id}/renew`, owner, { ttl: 3600 });
    assert.equal(capped.status, 200, JSON.stringify(capped.body));
    assert.equal(capped.body.capped, true);
    assert.equal(capped.body.expires_at, cred.max_expires_at);
    assert.equal(await validUntil(cred.username), cred.max_expires_at);
    assert.equal((await leaseRow(b.pg, cred.lease_id)).expires_at.toISOString(), cred.max_expires_at);
    // The stranger's refused attempt is part of the lease's history too.
    assert.deepEqual(await auditTypes(b.pg, cred.lease_id), ['credential.issued', 'request.denied', 'lease.renewed', 'lease.renewed']);
  });

  test('a renew with no body at all extends by the policy default_ttl', async () => {
    const owner = await b.token({ sub: 'svc:renew-nobody' });
    const cred = await issueOk('svc:renew-nobody', { ttl: 5 });
    const before = Date.now();
    const res = await b.app.inject({ method: 'POST', url: `/leases/${cred.lease_id}/renew`, headers: { authorization: `Bearer ${owner}` } });
    assert.equal(res.statusCode, 200, res.body);
    // default_ttl is 60 s: well past the 5 s the lease was issued with.
    const expires = new Date(res.json().expires_at).getTime();
    assert.ok(expires >= before + 59_000 && expires <= Date.now() + 61_000, res.json().expires_at);
    assert.equal(await validUntil(cred.username), res.json().expires_at);
  });

  test('an ended lease cannot be renewed: 409, whether revoked or merely past its expiry', async () => {
    const owner = await b.token({ sub: 'svc:renew-ended' });
    const revoked = await issueOk('svc:renew-ended', { ttl: 60 });
    assert.equal((await api(b, 'POST', `/leases/${revoked.lease_id}/renew`, owner, { ttl: 60 })).status, 200);
    assert.equal((await api(b, 'DELETE', `/leases/${revoked.lease_id}`, owner)).status, 200);
    const afterRevoke = await api(b, 'POST', `/leases/${revoked.lease_id}/renew`, owner, { ttl: 60 });
    assert.equal(afterRevoke.status, 409);
    assert.equal(afterRevoke.body.code, 'LEASE_ENDED');

    const lapsed = await issueOk('svc:renew-ended', { ttl: 1 });
    await untilPast(lapsed.expires_at);
    const late = await api(b, 'POST', `/leases/${lapsed.lease_id}/renew`, owner, { ttl: 60 });
    assert.equal(late.status, 409, 'past expires_at it has ended even before the reaper ran');
    assert.equal(await validUntil(lapsed.username), lapsed.expires_at);
  });

  test('a max_ttl lowered after issuance pulls the renewal bound in by as much; raising it again gives nothing back', async () => {
    const policy = { claims: { sub: 'shrink:*' }, default_ttl: 60, max_ttl: 600 };
    await b.putPolicy('shrink', policy);
    const owner = await b.token({ sub: 'shrink:a' });
    const cred = await issueOk('shrink:a', { policy: 'shrink' });
    const legacy = await issueOk('shrink:a', { policy: 'shrink' });
    // A lease issued before its max_ttl was recorded keeps the bound it was issued with.
    await b.pg.query('UPDATE broker.leases SET max_ttl = NULL WHERE id = $1', [legacy.lease_id]);
    const issuedMax = Date.parse(cred.max_expires_at);
    const renew = async (lease: any, ttl: number) => {
      const res = await api(b, 'POST', `/leases/${lease.lease_id}/renew`, owner, { ttl });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      return res.body;
    };
    // Unchanged, the bound is where issuance put it.
    const before = await renew(cred, 120);
    assert.equal(before.capped, false);
    assert.equal(before.max_expires_at, cred.max_expires_at);

    await b.putPolicy('shrink', { ...policy, max_ttl: 300 });
    const lowered = new Date(issuedMax - 300_000).toISOString();
    const cut = await renew(cred, 590);
    assert.deepEqual([cut.capped, cut.expires_at, cut.max_expires_at], [true, lowered, lowered]);
    assert.equal(await validUntil(cred.username), lowered);
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.deepEqual([row.max_expires_at.toISOString(), row.max_ttl], [lowered, 300]);
    const [event] = await b.pg.query(`SELECT detail FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.renewed' ORDER BY id DESC LIMIT 1`, [cred.lease_id]);
    assert.deepEqual([event.detail.max_expires_at, event.detail.max_ttl], [lowered, 300]);
    const old = await renew(legacy, 590);
    assert.deepEqual([old.capped, old.max_expires_at], [false, legacy.max_expires_at], 'no recorded max_ttl: the issued bound holds');

    await b.putPolicy('shrink', policy);
    const raised = await renew(cred, 590);
    assert.deepEqual([raised.capped, raised.expires_at, raised.max_expires_at], [true, lowered, lowered], 'raising max_ttl again extends nothing');

    // Lowered below the current expiry, the bound stops there: a renewal never ends a lease early.
    await b.putPolicy('shrink', { ...policy, default_ttl: 1, max_ttl: 1 });
    const floor = await renew(cred, 590);
    assert.deepEqual([floor.capped, floor.expires_at, floor.max_expires_at], [true, lowered, lowered]);
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'active');
  });

  test('a policy that no longer admits the token stops renewals: disabled, narrowed or deleted', async () => {
    const policy = { claims: { sub: 'recheck:*' }, default_ttl: 60, max_ttl: 600 };
    await b.putPolicy('recheck', policy);
    const owner = await b.token({ sub: 'recheck:a' });
    const cred = await issueOk('recheck:a', { policy: 'recheck' });
    const renew = () => api(b, 'POST', `/leases/${cred.lease_id}/renew`, owner, { ttl: 120 });
    const refused = async (why: RegExp) => {
      const before = await validUntil(cred.username);
      const res = await renew();
      assert.equal(res.status, 403, JSON.stringify(res.body));
      assert.equal(res.body.code, 'NO_POLICY');
      assert.match(res.body.detail, why);
      const row = await leaseRow(b.pg, cred.lease_id);
      assert.equal(await validUntil(cred.username), before, 'a refused renew changes nothing');
      assert.equal(new Date(row.expires_at).toISOString(), before, 'neither in PostgreSQL nor in the lease');
      assert.equal(row.state, 'active', 'the lease itself runs on');
    };
    assert.equal((await renew()).status, 200);

    await b.putPolicy('recheck', { ...policy, enabled: false });
    await refused(/policy recheck no longer admits this token \(policy is disabled\)/);
    await b.putPolicy('recheck', policy);
    assert.equal((await renew()).status, 200, 'enabled again, it renews again');

    await b.putPolicy('recheck', { ...policy, claims: { sub: 'recheck:b' } });
    await refused(/claim sub does not match/);
    await b.putPolicy('recheck', policy);
    assert.equal((await renew()).status, 200);

    await b.putPolicy('recheck', { ...policy, grant_role: 'app_migrators' });
    await refused(/now grants app_migrators on .*this lease holds app_readers/);
    await b.putPolicy('recheck', policy);
    assert.equal((await renew()).status, 200, 'granting the same again, it renews again');

    // A connection_limit lowered below what the lease's role allows: a new credential carries it.
    await b.putPolicy('recheck', { ...policy, connection_limit: 2 });
    await refused(/now allows 2 connections per credential, and this lease's role has no limit/);
    await b.putPolicy('recheck', { ...policy, connection_limit: 5 });
    await refused(/now allows 5 connections/);
    await b.putPolicy('recheck', policy);
    assert.equal((await renew()).status, 200, 'no limit again, it renews again');

    assert.equal((await api(b, 'DELETE', '/policies/recheck', await b.adminToken())).status, 204);
    await refused(/policy recheck no longer admits this token \(it no longer exists\)/);
  });
});
