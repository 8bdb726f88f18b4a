import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { ADMIN_SUB, api, auditTypes, leaseRow, roleExists, startTestBroker, untilPast, type TestBroker } from './helpers/broker.js';

// Each failed teardown attempt is on the audit trail, in the statement that records it on the
// lease: an auditor must see that a role outlived the end of its lease, and until when.
let b: TestBroker;

before(async () => {
  // Lock waits end after 1 s, so a teardown blocked on the role's row fails at NOLOGIN quickly.
  b = await startTestBroker({ env: { BROKER_LOCK_TIMEOUT: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('ta', { claims: { sub: 'ta:*' }, grant_role: 'app_migrators', max_active_leases: 10 });
});
after(async () => b?.close());

interface Event { id: string; type: string; issuer: string; subject: string; lease_id: string; policy: string; username: string; reason: string; request_id: string | null; client_ip: string | null; detail: any }

const failures = (leaseId: string) => b.pg.query<Event>(
  `SELECT id::text, type, issuer, subject, lease_id, policy, username, reason, request_id, client_ip, detail
     FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.teardown_failed' ORDER BY audit_events.id`, [leaseId]);

async function issue(sub: string, ttl = 300): Promise<{ lease_id: string; username: string; password: string; expires_at: string }> {
  const res = await b.issue(await b.token({ sub }), { policy: 'ta', ttl });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

/** The lease's role owns a table in `database`, which takes no connections until `open()`. */
async function blockTeardown(username: string, database: string): Promise<{ open(): Promise<void> }> {
  await b.pg.query(`CREATE DATABASE ${database} CONNECTION LIMIT 0`, [], 'postgres');
  await b.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO "${username}"`, [], database);
  return { open: () => b.pg.query(`ALTER DATABASE ${database} CONNECTION LIMIT -1`, [], 'postgres').then(() => undefined) };
}

const iso = (d: Date) => d.toISOString();
const due = (id: string) => b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [id]);

describe('a failed teardown attempt', () => {
  test('of a bulk revocation writes one lease.teardown_failed with the attempt, its retry and the error; the reaper\'s success then writes lease.revoked', async () => {
    const lease = await issue('ta:alice');
    const gate = await blockTeardown(lease.username, 'ta_full1');
    const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'ta:alice', reason: 'left the company' });
    assert.deepEqual([res.status, res.body.code], [500, 'REVOKE_INCOMPLETE'], JSON.stringify(res.body));

    const row = await leaseRow(b.pg, lease.lease_id);
    assert.deepEqual([row.state, row.attempts], ['revoking', 1]);
    const [event, ...more] = await failures(lease.lease_id);
    assert.equal(more.length, 0, 'one event per failed attempt');
    const [requested] = await b.pg.query<{ request_id: string }>(
      `SELECT request_id FROM broker.audit_events WHERE type = 'revocation.requested' AND detail->'filter'->>'subject' = 'ta:alice'`);
    assert.ok(requested.request_id);
    const admin = `${b.issuer.issuer} ${ADMIN_SUB}`;
    assert.deepEqual({ ...event, id: undefined, client_ip: undefined }, {
      id: undefined, type: 'lease.teardown_failed', issuer: b.issuer.issuer, subject: ADMIN_SUB, lease_id: lease.lease_id, policy: 'ta',
      username: lease.username, reason: row.last_error, request_id: requested.request_id, client_ip: undefined,
      detail: {
        attempt: 1, state: 'revoking', ended_at: iso(row.ended_at), ended_by: admin, login_disabled: true,
        retry_scheduled: true, next_attempt_at: iso(row.next_attempt_at), owner_issuer: b.issuer.issuer, owner_subject: 'ta:alice',
      },
    });
    assert.match(event.reason, /ta_full1: 53300/, 'the error, as last_error holds it');
    assert.ok(event.client_ip, 'the caller\'s address, as the revocation\'s other events carry it');
    const text = JSON.stringify(event);
    for (const secret of [...b.secrets, lease.password]) assert.ok(!text.includes(secret), 'no token or password in the event');

    // Findable with GET /audit's filters: by type, by lease, by the lease's owner.
    const adminToken = await b.adminToken();
    for (const query of [`type=lease.teardown_failed&lease_id=${lease.lease_id}`, 'type=lease.teardown_failed&owner=ta:alice', `owner=ta:alice&owner_issuer=${encodeURIComponent(b.issuer.issuer)}&type=lease.teardown_failed`]) {
      const page = await api(b, 'GET', `/audit?${query}`, adminToken);
      assert.equal(page.status, 200, JSON.stringify(page.body));
      assert.deepEqual(page.body.items.map((e: Event) => [e.id, e.detail.attempt, e.detail.next_attempt_at]), [[event.id, 1, iso(row.next_attempt_at)]], query);
    }

    await gate.open();
    await due(lease.lease_id);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).ended, 1);
    assert.equal(await roleExists(b.pg, lease.username), false);
    assert.deepEqual(await auditTypes(b.pg, lease.lease_id), ['credential.issued', 'lease.teardown_failed', 'lease.revoked']);
    const [revoked] = await b.pg.query<Event>(`SELECT subject, detail FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.revoked'`, [lease.lease_id]);
    assert.deepEqual([revoked.subject, revoked.detail], ['ta:alice', { ended_by: admin }], 'recorded as before');
  });

  test('stopped at NOLOGIN says the login was not disabled; DELETE\'s later success writes lease.revoked', async () => {
    const lease = await issue('ta:bob');
    const owner = await b.token({ sub: 'ta:bob' });
    // Another session's open ALTER ROLE holds the role's catalogue row: NOLOGIN waits, then times out.
    const holder = new pg.Client({ connectionString: b.pg.superuserUrl });
    holder.on('error', () => undefined);
    await holder.connect();
    try {
      await holder.query(`BEGIN; ALTER ROLE "${lease.username}" CONNECTION LIMIT 7`);
      const res = await api(b, 'DELETE', `/leases/${lease.lease_id}`, owner);
      assert.deepEqual([res.status, res.body.code], [500, 'REVOKE_INCOMPLETE'], JSON.stringify(res.body));
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await holder.end();
    }
    const row = await leaseRow(b.pg, lease.lease_id);
    assert.match(row.last_error, /^NOLOGIN: 55P03/);
    const [event, ...more] = await failures(lease.lease_id);
    assert.equal(more.length, 0);
    assert.deepEqual([event.subject, event.reason, event.detail.login_disabled, event.detail.attempt, event.detail.ended_by],
      ['ta:bob', row.last_error, false, 1, `${b.issuer.issuer} ta:bob`]);
    const [failed] = await b.pg.query<{ request_id: string }>(`SELECT request_id FROM broker.audit_events WHERE lease_id = $1 AND type = 'request.failed'`, [lease.lease_id]);
    assert.equal(event.request_id, failed.request_id, 'linked to the request that failed');

    const again = await api(b, 'DELETE', `/leases/${lease.lease_id}`, owner);
    assert.deepEqual([again.status, again.body.state], [200, 'revoked'], JSON.stringify(again.body));
    assert.deepEqual(await auditTypes(b.pg, lease.lease_id), ['credential.issued', 'lease.teardown_failed', 'request.failed', 'lease.revoked']);
  });

  test('of an expired lease, attempt after attempt: one event each, lease.revoke_failed with the fifth, then lease.expired', async () => {
    const lease = await issue('ta:carol', 1);
    const gate = await blockTeardown(lease.username, 'ta_full2');
    await untilPast(lease.expires_at);
    for (let attempt = 1; attempt <= 6; attempt++) {
      await due(lease.lease_id);
      assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 1, `attempt ${attempt}`);
    }
    const row = await leaseRow(b.pg, lease.lease_id);
    assert.deepEqual([row.state, row.attempts], ['revoke_failed', 6]);
    const events = await failures(lease.lease_id);
    assert.deepEqual(events.map((e) => [e.subject, e.detail.attempt, e.detail.state, e.detail.ended_by, e.detail.retry_scheduled]),
      [1, 2, 3, 4, 5, 6].map((n) => ['ta:carol', n, n < 5 ? 'revoking' : 'revoke_failed', 'reaper', true]));
    // The reaper's own events name the lease's owner, with no owner_* in detail and no request.
    assert.deepEqual(Object.keys(events[0].detail).sort(), ['attempt', 'ended_at', 'ended_by', 'login_disabled', 'next_attempt_at', 'retry_scheduled', 'state']);
    assert.equal(events[0].request_id, null);
    assert.equal(events[0].detail.ended_at, iso(row.ended_at));
    assert.equal(events[5].detail.next_attempt_at, iso(row.next_attempt_at), 'the last event names the retry the row holds');
    assert.deepEqual(await auditTypes(b.pg, lease.lease_id), ['credential.issued',
      ...Array(5).fill('lease.teardown_failed'), 'lease.revoke_failed', 'lease.teardown_failed']);
    const [reached] = await b.pg.query<Event>(`SELECT subject, reason, detail FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.revoke_failed'`, [lease.lease_id]);
    assert.deepEqual([reached.subject, reached.detail], ['ta:carol', { attempts: 5, ended_by: 'reaper' }], 'revoke_failed as before');

    await gate.open();
    await due(lease.lease_id);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).ended, 1);
    assert.deepEqual((await auditTypes(b.pg, lease.lease_id)).slice(-2), ['lease.teardown_failed', 'lease.expired']);
  });

  test('commits with its event or not at all', async () => {
    const lease = await issue('ta:dave');
    const gate = await blockTeardown(lease.username, 'ta_full3');
    await b.pg.query(`CREATE FUNCTION public.refuse_teardown_event() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.type = 'lease.teardown_failed' THEN RAISE EXCEPTION 'audit write refused'; END IF; RETURN NEW; END $$`);
    await b.pg.query(`CREATE TRIGGER refuse_teardown_event BEFORE INSERT ON broker.audit_events
      FOR EACH ROW EXECUTE FUNCTION public.refuse_teardown_event()`);
    try {
      const res = await api(b, 'DELETE', `/leases/${lease.lease_id}`, await b.token({ sub: 'ta:dave' }));
      assert.equal(res.status, 500, JSON.stringify(res.body));
    } finally {
      await b.pg.query('DROP TRIGGER refuse_teardown_event ON broker.audit_events; DROP FUNCTION public.refuse_teardown_event()');
    }
    const row = await leaseRow(b.pg, lease.lease_id);
    assert.deepEqual([row.state, row.attempts, row.last_error], ['revoking', 0, null], 'no attempt recorded without its event');
    assert.deepEqual(await failures(lease.lease_id), []);
    await gate.open();
    await due(lease.lease_id);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).ended, 1);
  });
});

describe('a teardown whose first attempt succeeds', () => {
  test('writes no lease.teardown_failed, on revocation or on expiry', async () => {
    const revoked = await issue('ta:erin');
    assert.equal((await api(b, 'DELETE', `/leases/${revoked.lease_id}`, await b.token({ sub: 'ta:erin' }))).status, 200);
    assert.deepEqual(await auditTypes(b.pg, revoked.lease_id), ['credential.issued', 'lease.revoked']);
    const expired = await issue('ta:frank', 1);
    await untilPast(expired.expires_at);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).ended, 1);
    assert.deepEqual(await auditTypes(b.pg, expired.lease_id), ['credential.issued', 'lease.expired']);
  });
});
