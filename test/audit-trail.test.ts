import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { ADMIN_SUB, api, leaseRow, roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';

// What an auditor reads back from the trail when the reaper, not the request, finishes the work.
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('trail', { claims: { sub: 'trail:*' }, grant_role: 'app_migrators' });
});
after(async () => b?.close());

const events = (where: string, params: unknown[]) =>
  b.pg.query(`SELECT type, issuer, subject, reason, detail FROM broker.audit_events WHERE ${where} ORDER BY id`, params);

describe('a revocation whose first teardown failed', () => {
  test('keeps who ended the lease in the lease.revoked the reaper writes, not only in the lease row', async () => {
    const lease = (await b.issue(await b.token({ sub: 'trail:carol' }), { ttl: 300 })).body;
    // Its teardown cannot finish while it owns something in a database refusing connections.
    await b.pg.query('CREATE DATABASE trail_full CONNECTION LIMIT 0', [], 'postgres');
    await b.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO "${lease.username}"`, [], 'trail_full');
    const res = await api(b, 'DELETE', `/leases/${lease.lease_id}?reason=offboarded`, await b.adminToken());
    assert.deepEqual([res.status, res.body.code], [500, 'REVOKE_INCOMPLETE']);

    await b.pg.query('ALTER DATABASE trail_full CONNECTION LIMIT -1', [], 'postgres');
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [lease.lease_id]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).ended, 1);
    const row = await leaseRow(b.pg, lease.lease_id);
    assert.equal(row.state, 'revoked');
    const admin = `${b.issuer.issuer} ${ADMIN_SUB}`;
    assert.equal(row.ended_by, admin);
    const [revoked, ...more] = await events(`lease_id = $1 AND type = 'lease.revoked'`, [lease.lease_id]);
    assert.equal(more.length, 0);
    assert.equal(revoked.subject, 'trail:carol', 'recorded under the lease\'s identity, as README says');
    assert.equal(revoked.reason, 'offboarded');
    assert.deepEqual(revoked.detail, { ended_by: admin }, 'and says who ended it');
  });

  test('and so does the one a later request finishes', async () => {
    const lease = (await b.issue(await b.token({ sub: 'trail:dave' }), { ttl: 300 })).body;
    await b.pg.query('CREATE DATABASE trail_full2 CONNECTION LIMIT 0', [], 'postgres');
    await b.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO "${lease.username}"`, [], 'trail_full2');
    const res = await api(b, 'DELETE', `/leases/${lease.lease_id}?reason=offboarded`, await b.adminToken());
    assert.deepEqual([res.status, res.body.code], [500, 'REVOKE_INCOMPLETE']);
    await b.pg.query('ALTER DATABASE trail_full2 CONNECTION LIMIT -1', [], 'postgres');
    // The owner, say, asks again: their request finishes the teardown the admin's began.
    const again = await api(b, 'DELETE', `/leases/${lease.lease_id}`, await b.token({ sub: 'trail:dave' }));
    assert.deepEqual([again.status, again.body.state], [200, 'revoked']);
    const [revoked, ...more] = await events(`lease_id = $1 AND type = 'lease.revoked'`, [lease.lease_id]);
    assert.equal(more.length, 0);
    assert.deepEqual([revoked.subject, revoked.reason], ['trail:dave', 'offboarded']);
    assert.equal(revoked.detail.ended_by, `${b.issuer.issuer} ${ADMIN_SUB}`);
  });
});

describe('an orphan drop', () => {
  test('commits with its role.orphan_dropped event or not at all', async () => {
    await b.pg.query('CREATE ROLE trail_orphan IN ROLE credential_broker_managed ADMIN broker', [], 'postgres');
    // PostgreSQL refuses the event: the role must outlive it, or nothing is left to find it by.
    await b.pg.query(`CREATE FUNCTION public.refuse_orphan_event() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.type = 'role.orphan_dropped' THEN RAISE EXCEPTION 'audit write refused'; END IF; RETURN NEW; END $$`);
    await b.pg.query(`CREATE TRIGGER refuse_orphan_event BEFORE INSERT ON broker.audit_events
      FOR EACH ROW EXECUTE FUNCTION public.refuse_orphan_event()`);
    try {
      await b.reaper.reap({ requireLeadership: false }).catch(() => undefined);
    } finally {
      await b.pg.query('DROP TRIGGER refuse_orphan_event ON broker.audit_events');
    }
    // The refused drop is a failed attempt like any other, and is on record as one.
    assert.deepEqual((await events(`username = 'trail_orphan'`, [])).map((e) => [e.type, e.reason]),
      [['role.orphan_drop_failed', 'DROP ROLE: P0001: audit write refused']]);
    assert.equal(await roleExists(b.pg, 'trail_orphan'), true, 'not dropped without its event');
    await b.pg.query('DROP ROLE trail_orphan', [], 'postgres');
  });

  test('a sweep records the orphans it drops, one event each, whatever their names hold', async () => {
    // Characters that mean something in SQL literals, JSON and JavaScript replacement patterns.
    const name = `trail orphan $' $& $1 "q" \\ é`;
    await b.pg.query(`CREATE ROLE ${pg.escapeIdentifier(name)} IN ROLE credential_broker_managed ADMIN broker`, [], 'postgres');
    assert.equal(await roleExists(b.pg, name), true);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).orphans, 1);
    assert.equal(await roleExists(b.pg, name), false);
    assert.deepEqual((await events('username = $1', [name])).map((e) => [e.type, e.reason]),
      [['role.orphan_dropped', 'managed role without a live lease']]);
  });
});

describe('an orphan made again under the same name', () => {
  test('gets an event for each drop: the second is another role, dropped by another sweep', async () => {
    const name = 'trail_orphan_again';
    for (let round = 1; round <= 2; round++) {
      await b.pg.query(`CREATE ROLE ${name} IN ROLE credential_broker_managed ADMIN broker`, [], 'postgres');
      assert.equal((await b.reaper.reap({ requireLeadership: false })).orphans, 1, `round ${round}`);
      assert.equal(await roleExists(b.pg, name), false, `round ${round}`);
      assert.equal((await events(`type = 'role.orphan_dropped' AND username = $1`, [name])).length, round, `the drop of round ${round} is on record`);
    }
  });
});
