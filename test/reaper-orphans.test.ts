import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { reapOrphans, recordOrphansDropped } from '../src/reaper/orphans.js';
import { connectAs, loginError, roleExists, startReplicas, waitFor, type TestBroker } from './helpers/broker.js';

// Managed roles without a lease, found and dropped by the reaper: split from reaper.test.ts, with
// two replicas of their own, as there.
let b1: TestBroker;
let b2: TestBroker;
let close: () => Promise<void>;
before(async () => {
  ({ b1, b2, close } = await startReplicas());
});
after(async () => close?.());

describe('orphans', () => {
  test('managed roles without a lease are dropped with an audit event; everything else is left alone', async () => {
    const su = (sql: string, db = 'postgres') => b1.pg.query(sql, [], db);
    // As PostgreSQL 16+ requires, the broker holds ADMIN OPTION on an orphan it is to drop.
    await su(`CREATE ROLE orphan_by_hand LOGIN PASSWORD 'orphan-pw' IN ROLE credential_broker_managed ADMIN broker`);
    // What a lost lease row leaves: a role the broker made itself, owning a table elsewhere.
    await b1.app.db.query('CREATE ROLE orphan_lost IN ROLE app_readers, credential_broker_managed ROLE broker');
    await su('CREATE TABLE public.orphan_table (id int); ALTER TABLE public.orphan_table OWNER TO orphan_lost', 'otherdb');
    // A member nobody gave the broker ADMIN on: it cannot drop it and must not stall on it.
    await su('CREATE ROLE orphan_foreign LOGIN IN ROLE credential_broker_managed');
    await su('CREATE ROLE bystander LOGIN');
    // Privileged members the broker never issues: never taken for orphans, whatever ADMIN it holds.
    await su('CREATE ROLE member_replication LOGIN REPLICATION IN ROLE credential_broker_managed ADMIN broker');
    await su('CREATE ROLE member_bypassrls LOGIN BYPASSRLS IN ROLE credential_broker_managed ADMIN broker');
    await su('CREATE ROLE marker_admin NOLOGIN');
    await su('GRANT credential_broker_managed TO marker_admin WITH ADMIN OPTION');
    const live = (await b1.issue(await b1.token({ sub: 'rep:orphan-neighbour' }), { ttl: 300 })).body;
    // Lease rows that say "ended" while the role lives on: long ago is an orphan, just now is not yet.
    const stale = (await b1.issue(await b1.token({ sub: 'rep:orphan-stale' }), { ttl: 300 })).body;
    const fresh = (await b1.issue(await b1.token({ sub: 'rep:orphan-fresh' }), { ttl: 300 })).body;
    await b1.pg.query(`UPDATE broker.leases SET state = 'expired', ended_at = now() - interval '1 hour' WHERE id = $1`, [stale.lease_id]);
    await b1.pg.query(`UPDATE broker.leases SET state = 'revoked', ended_at = now() WHERE id = $1`, [fresh.lease_id]);

    const session = await connectAs(b1.pg, { username: 'orphan_by_hand', password: 'orphan-pw' });
    try {
      const runs = await Promise.all([b1.reaper.reap(), b2.reaper.reap()]);
      // PostgreSQL 15 lets CREATEROLE drop any plain role, so there the foreign member goes too.
      assert.equal(runs[0].orphans + runs[1].orphans, b1.pg.version >= 16 ? 3 : 4, JSON.stringify(runs));
      await assert.rejects(session.query('SELECT 1'));
    } finally {
      await session.end().catch(() => undefined);
    }
    assert.equal(await roleExists(b1.pg, 'orphan_by_hand'), false);
    assert.equal(await roleExists(b1.pg, 'orphan_lost'), false);
    assert.equal(await roleExists(b1.pg, stale.username), false, 'a role whose lease ended past the grace period is an orphan');
    assert.equal(await roleExists(b1.pg, fresh.username), true, 'within the grace period it is not');
    const [table] = await su(`SELECT tableowner FROM pg_tables WHERE tablename = 'orphan_table'`, 'otherdb');
    assert.equal(table.tableowner, 'app_readers', 'its table went to its group role');
    const events = await b1.pg.query(
      `SELECT username, detail->>'reassigned_to' AS target FROM broker.audit_events
        WHERE type = 'role.orphan_dropped' AND username IN ('orphan_by_hand', 'orphan_lost') ORDER BY username`);
    assert.deepEqual(events.map((e) => [e.username, e.target]), [['orphan_by_hand', null], ['orphan_lost', 'app_readers']]);
    const [staleEvent] = await b1.pg.query(`SELECT detail->>'reassigned_to' AS target FROM broker.audit_events WHERE type = 'role.orphan_dropped' AND username = $1`, [stale.username]);
    assert.equal(staleEvent.target, 'app_readers');

    for (const role of ['broker', 'bystander', 'marker_admin', 'credential_broker_managed', 'member_replication', 'member_bypassrls', live.username]) {
      assert.equal(await roleExists(b1.pg, role), true, role);
    }
    assert.equal(await loginError(b1.pg, live), undefined, 'a leased role is not an orphan');
    assert.equal(await roleExists(b1.pg, 'orphan_foreign'), b1.pg.version >= 16);
    if (b1.pg.version >= 16) {
      await waitFor('a warning naming the unmanageable role', async () =>
        [...b1.logs, ...b2.logs].some((l) => l.includes('orphan_foreign') && l.includes('ADMIN OPTION')), 2000);
    }
  });

  test('an orphan whose teardown keeps failing rests between tries, so the sweep reaches the others', async () => {
    const su = (sql: string, db = 'postgres') => b1.pg.query(sql, [], db);
    // Sorted first by name; it owns a table in a database the broker may not connect to.
    await su(`CREATE ROLE a0_orphan_stuck LOGIN IN ROLE credential_broker_managed ADMIN broker`);
    await su(`CREATE ROLE a1_orphan_free LOGIN IN ROLE credential_broker_managed ADMIN broker`);
    await su('CREATE DATABASE orphan_sealed');
    await su('REVOKE CONNECT ON DATABASE orphan_sealed FROM PUBLIC');
    await su('CREATE TABLE public.stuck (id int); ALTER TABLE public.stuck OWNER TO a0_orphan_stuck', 'orphan_sealed');
    // One orphan per sweep, as if a whole batch kept failing.
    const sweep = () => reapOrphans({
      pool: b1.app.db, databaseUrl: b1.config.databaseUrl, managedRole: b1.config.managedRole, log: b1.app.log,
      timeouts: b1.config, retryBaseSeconds: 1, batchSize: 1,
    });
    assert.equal(await sweep(), 0, 'the stuck one fails');
    assert.equal(await sweep(), 1, 'the next sweep takes the other one instead of the stuck one again');
    assert.equal(await roleExists(b1.pg, 'a1_orphan_free'), false);
    assert.equal(await roleExists(b1.pg, 'a0_orphan_stuck'), true);
    assert.ok([...b1.logs, ...b2.logs].some((l) => l.includes('a0_orphan_stuck') && l.includes('retry_in_seconds')), 'the failure is logged with its rest');
    await su('DROP TABLE public.stuck', 'orphan_sealed');
    await su('DROP ROLE a0_orphan_stuck');
  });

  test('two sweeps reporting the same dropped orphan at once (a leader that lost its lock mid-run, and the next) record one event', async () => {
    const dropped = [{ rolname: 'orphan_twice', reassign_to: 'app_readers' }, { rolname: 'orphan_once', reassign_to: null }];
    // Events are recorded only for roles that still exist, and their DROP ROLE commits with them:
    // whichever sweep comes second finds the role gone. Plain roles here, outside the marker role,
    // so no reaper run takes them.
    for (const { rolname } of dropped) await b1.pg.query(`CREATE ROLE ${rolname} ADMIN broker`);
    const managed = b1.config.managedRole;
    await Promise.all([recordOrphansDropped(b1.app.db, managed, dropped), recordOrphansDropped(b2.app.db, managed, dropped.slice(0, 1))]);
    await recordOrphansDropped(b2.app.db, managed, dropped.slice(0, 1));
    for (const { rolname } of dropped) assert.equal(await roleExists(b1.pg, rolname), false, rolname);
    const rows = await b1.pg.query<{ username: string; n: number }>(
      `SELECT username, count(*)::int AS n FROM broker.audit_events WHERE type = 'role.orphan_dropped' AND username IN ('orphan_twice', 'orphan_once')
        GROUP BY username ORDER BY username`);
    assert.deepEqual(rows.map((r) => [r.username, r.n]), [['orphan_once', 1], ['orphan_twice', 1]]);
  });
});
