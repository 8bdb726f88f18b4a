import assert from 'node:assert/strict';
import pg from 'pg';
import { after, before, describe, test } from 'node:test';
import { createLogger } from '../src/logger.js';
import { migrate } from '../src/postgres/migrate.js';
import { REAPER_LOCK_KEY } from '../src/reaper/leadership.js';
import { Reaper, type ReapStats } from '../src/reaper/reaper.js';
import {
  api, auditTypes, connectAs, leaseRow, loginError, roleExists, REPLICA_ENV, startReplicas, startTestBroker, untilPast, type TestBroker,
} from './helpers/broker.js';

let b1: TestBroker;
let b2: TestBroker;
let close: () => Promise<void>;
before(async () => {
  ({ b1, b2, close } = await startReplicas());
  await b1.putPolicy('fragile', { claims: { sub: 'frag:*' } });
});
after(async () => close?.());

async function issueMany(n: number, prefix: string, ttl = 1): Promise<any[]> {
  const creds = await Promise.all(Array.from({ length: n }, async (_, i) => {
    const broker = i % 2 ? b2 : b1;
    const res = await broker.issue(await broker.token({ sub: `${prefix}:${i % 6}` }), { ttl });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    return res.body;
  }));
  await untilPast(creds.map((c) => c.expires_at).sort().at(-1));
  return creds;
}

async function expiredEventsPerLease(ids: string[]): Promise<number[]> {
  const rows = await b1.pg.query(
    `SELECT l.id, (SELECT count(*)::int FROM broker.audit_events a WHERE a.lease_id = l.id AND a.type = 'lease.expired') AS n
       FROM broker.leases l WHERE l.id = ANY($1) AND l.state = 'expired'`, [ids]);
  return rows.map((r) => r.n);
}

async function rolesLeft(creds: any[]): Promise<string[]> {
  const rows = await b1.pg.query('SELECT rolname FROM pg_roles WHERE rolname = ANY($1)', [creds.map((c) => c.username)]);
  return rows.map((r) => r.rolname);
}

const leaderPid = async (): Promise<number | undefined> =>
  (await b1.pg.query(
    `SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'pg-credential-broker leader'
        AND l.database = (SELECT oid FROM pg_database WHERE datname = 'broker')
        AND (l.classid::bigint << 32) + l.objid::bigint = $1`, [REAPER_LOCK_KEY]))[0]?.pid;

const setDue = (id: string) => b1.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [id]);

describe('two replicas', () => {
  test('60 short leases, two reapers at once: one leader, each lease reaped exactly once, no roles left', async () => {
    const creds = await issueMany(60, 'rep');
    const rounds: ReapStats[][] = [];
    for (let i = 0; i < 5; i++) rounds.push(await Promise.all([b1.reaper.reap(), b2.reaper.reap()]));
    for (const [s1, s2] of rounds) {
      assert.ok(s1.leader !== s2.leader, `exactly one leader per round: ${JSON.stringify([s1, s2])}`);
      assert.equal(s1.failed + s2.failed, 0);
    }
    const leader = rounds[0][0].leader ? 0 : 1;
    assert.ok(rounds.every((r) => r[leader].leader), 'leadership stays put while its connection lives');
    assert.equal(rounds.reduce((n, r) => n + r[0].ended + r[1].ended, 0), 60);
    assert.deepEqual(await expiredEventsPerLease(creds.map((c) => c.lease_id)), creds.map(() => 1));
    assert.deepEqual(await rolesLeft(creds), []);
    const stray = await b1.pg.query(
      `SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid JOIN pg_roles g ON g.oid = m.roleid
        WHERE g.rolname = 'credential_broker_managed' AND NOT m.admin_option
          AND NOT EXISTS (SELECT 1 FROM broker.leases l WHERE l.username = r.rolname AND l.state = 'active')`);
    assert.deepEqual(stray, [], 'no managed role outlived its lease');
    assert.equal(await leaderPid() !== undefined, true);
  });

  test('even without leadership, SKIP LOCKED claims hand each lease to one reaper only', async () => {
    const creds = await issueMany(60, 'rep:free');
    const r1 = new Reaper({ pool: b1.app.db, config: b1.config, log: b1.app.log, batchSize: 4 });
    const r2 = new Reaper({ pool: b2.app.db, config: b2.config, log: b2.app.log, batchSize: 4 });
    // Four lease rows locked by a third claimer's open transaction: the reapers pass them by
    // instead of waiting (plain FOR UPDATE would wait on them until lock_timeout, or the bound, failed it).
    const held = creds.slice(0, 4).map((c) => c.lease_id);
    const holder = new pg.Client({ connectionString: b1.pg.brokerUrl });
    await holder.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT id FROM broker.leases WHERE id = ANY($1::uuid[]) FOR UPDATE', [held]);
      let bound: NodeJS.Timeout | undefined;
      const [s1, s2] = await Promise.race([
        Promise.all([r1.reap({ requireLeadership: false }), r2.reap({ requireLeadership: false })]),
        new Promise<never>((_, reject) => {
          bound = setTimeout(() => reject(new Error('the reapers waited on the locked rows')), 60_000);
        }),
      ]).finally(() => clearTimeout(bound));
      assert.equal(s1.failed + s2.failed, 0);
      assert.equal(s1.ended + s2.ended, 56, JSON.stringify([s1, s2]));
      for (const id of held) assert.equal((await leaseRow(b1.pg, id)).state, 'active', 'passed by while locked');
      await holder.query('COMMIT');
      const last = await r1.reap({ requireLeadership: false });
      assert.equal(last.ended, 4, JSON.stringify(last));
    } finally {
      await holder.end().catch(() => undefined);
      await Promise.all([r1.stop(), r2.stop()]);
    }
    assert.deepEqual(await expiredEventsPerLease(creds.map((c) => c.lease_id)), creds.map(() => 1));
    assert.deepEqual(await rolesLeft(creds), []);
  });

  test('killing the leader\'s connection hands leadership to the other replica on its next run', async () => {
    await Promise.all([b1.reaper.reap(), b2.reaper.reap()]);
    const [leader, follower] = b1.reaper.leadership.isLeader ? [b1, b2] : [b2, b1];
    assert.equal(leader.reaper.leadership.isLeader, true);
    assert.equal((await follower.reaper.reap()).leader, false, 'the follower cannot lead while the leader lives');

    const pid = await leaderPid();
    assert.ok(pid);
    await b1.pg.query('SELECT pg_terminate_backend($1, 5000)', [pid], 'postgres');
    const creds = await issueMany(4, 'rep:handover');
    const taken = await follower.reaper.reap();
    assert.equal(taken.leader, true);
    assert.equal(taken.ended, 4);
    assert.equal((await leader.reaper.reap()).leader, false, 'the old leader learns it lost the lock');
    assert.deepEqual(await rolesLeft(creds), []);
  });
});

describe('a second deployment on the same cluster', () => {
  test('keeps its own managed role, and neither reaper touches the other\'s roles', async () => {
    await b1.pg.query('CREATE DATABASE broker2 OWNER broker', [], 'postgres');
    const d2 = await startTestBroker({
      pg: b1.pg, issuer: b1.issuer,
      env: { ...REPLICA_ENV, DATABASE_URL: b1.pg.brokerUrl.replace(/\/broker$/, '/broker2'), BROKER_MANAGED_ROLE: 'second_broker_managed' },
    });
    try {
      await d2.putPolicy('d2', { claims: { sub: 'd2:*' } });
      const mine = await b1.issue(await b1.token({ sub: 'rep:d1-long' }), { ttl: 300 });
      const theirs = await d2.issue(await d2.token({ sub: 'd2:short' }), { ttl: 3 });
      assert.equal(theirs.status, 201, JSON.stringify(theirs.body));
      await d2.app.db.query('CREATE ROLE d2_orphan LOGIN IN ROLE second_broker_managed ROLE broker');
      await b1.app.db.query('CREATE ROLE d1_orphan LOGIN IN ROLE credential_broker_managed ROLE broker');
      const theirSession = await connectAs(b1.pg, theirs.body);
      try {
        await untilPast(theirs.body.expires_at);
        const runs = await Promise.all([b1.reaper.reap(), b2.reaper.reap()]);
        assert.equal(runs[0].orphans + runs[1].orphans, 1, JSON.stringify(runs));
        assert.equal(await roleExists(b1.pg, 'd1_orphan'), false, 'this deployment cleaned its own orphan');
        assert.equal(await roleExists(b1.pg, 'd2_orphan'), true);
        assert.equal(await roleExists(b1.pg, theirs.body.username), true);
        assert.equal((await theirSession.query('SELECT 1 AS one')).rows[0].one, 1, 'their session was left alone');
        assert.equal((await leaseRow(b1.pg, theirs.body.lease_id, 'broker2')).state, 'active');

        const own = await d2.reaper.reap();
        assert.equal(own.leader, true, 'the lock is per database, so each deployment has its own leader');
        assert.deepEqual([own.ended, own.orphans, own.failed], [1, 1, 0]);
        await assert.rejects(theirSession.query('SELECT 1'));
      } finally {
        await theirSession.end().catch(() => undefined);
      }
      assert.equal(await roleExists(b1.pg, 'd2_orphan'), false);
      assert.equal((await leaseRow(b1.pg, theirs.body.lease_id, 'broker2')).state, 'expired');
      assert.equal(await roleExists(b1.pg, mine.body.username), true, 'their sweep did not take our live role for an orphan');
      assert.equal(await loginError(b1.pg, mine.body), undefined);
    } finally {
      await d2.close();
    }
  });

  test('cannot share the first deployment\'s database: migrate refuses a second marker role there', async () => {
    const logger = createLogger('silent');
    await assert.rejects(
      migrate(b1.config.databaseUrl, 'intruder_managed', logger),
      /belongs to the deployment whose BROKER_MANAGED_ROLE is credential_broker_managed, not intruder_managed: give each deployment a database of its own/,
    );
    assert.equal(await roleExists(b1.pg, 'intruder_managed'), false, 'refused before it created anything');
    assert.deepEqual(await b1.pg.query('SELECT managed_role FROM broker.deployment'), [{ managed_role: 'credential_broker_managed' }]);
    // Its own marker role migrates there as before, and the second deployment's in its own database.
    assert.deepEqual(await migrate(b1.config.databaseUrl, 'credential_broker_managed', logger), { applied: [] });
    assert.deepEqual(await b1.pg.query('SELECT managed_role FROM broker.deployment', [], 'broker2'), [{ managed_role: 'second_broker_managed' }]);
  });
});

describe('recovery', () => {
  async function reapUntil(state: string, id: string, maxRuns = 8): Promise<any> {
    for (let i = 0; i < maxRuns; i++) {
      await setDue(id);
      await Promise.all([b1.reaper.reap(), b2.reaper.reap()]);
      const lease = await leaseRow(b1.pg, id);
      if (lease.state === state) return lease;
    }
    throw new Error(`lease ${id} never reached ${state}`);
  }

  test('a role the reaper cannot drop ends in revoke_failed with last_error, and completes once the obstacle is gone', async () => {
    const res = await b1.issue(await b1.token({ sub: 'frag:sealed' }), { ttl: 1 });
    const cred = res.body;
    // An object in a database the broker may not connect to: REASSIGN/DROP OWNED cannot reach it.
    await b1.pg.query('CREATE DATABASE sealed', [], 'postgres');
    await b1.pg.query('REVOKE CONNECT ON DATABASE sealed FROM PUBLIC', [], 'postgres');
    await b1.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO "${cred.username}"`, [], 'sealed');
    await untilPast(cred.expires_at);

    const firstRun = Date.now();
    await Promise.all([b1.reaper.reap(), b2.reaper.reap()]);
    let lease = await leaseRow(b1.pg, cred.lease_id);
    assert.deepEqual([lease.state, lease.attempts], ['revoking', 1]);
    assert.match(lease.last_error, /sealed/);
    assert.ok(lease.next_attempt_at.getTime() >= firstRun + 1500, 'the next attempt waits out a backoff (2 s at a 1 s interval)');
    assert.equal(await roleExists(b1.pg, cred.username), true);
    assert.equal(await loginError(b1.pg, cred), '28P01', 'but it can no longer log in');

    lease = await reapUntil('revoke_failed', cred.lease_id);
    assert.equal(lease.attempts, 5);
    assert.match(lease.last_error, /sealed/);
    const listed = await api(b1, 'GET', '/leases?state=revoke_failed', await b1.adminToken());
    assert.deepEqual(listed.body.items.map((l: any) => [l.id, l.last_error !== null]), [[cred.lease_id, true]]);
    await Promise.all([b1.reaper.reap(), b2.reaper.reap()]);
    assert.equal((await leaseRow(b1.pg, cred.lease_id)).attempts, 5, 'still backing off: not retried before next_attempt_at');

    await b1.pg.query('GRANT CONNECT ON DATABASE sealed TO broker', [], 'postgres');
    lease = await reapUntil('expired', cred.lease_id, 1);
    assert.equal(lease.last_error, null);
    assert.equal(await roleExists(b1.pg, cred.username), false);
    const [kept] = await b1.pg.query(`SELECT tableowner FROM pg_tables WHERE tablename = 'kept'`, [], 'sealed');
    assert.equal(kept.tableowner, 'app_readers');
    // One lease.teardown_failed per failed attempt, and lease.revoke_failed with the fifth.
    assert.deepEqual(await auditTypes(b1.pg, cred.lease_id),
      ['credential.issued', ...Array(5).fill('lease.teardown_failed'), 'lease.revoke_failed', 'lease.expired']);
  });

  test('a database that refuses connections blocks teardown until it accepts them again', async () => {
    const cred = (await b1.issue(await b1.token({ sub: 'frag:noconn' }), { ttl: 1 })).body;
    await b1.pg.query('CREATE DATABASE closed_db', [], 'postgres');
    await b1.pg.query(`CREATE TABLE public.stuck (id int); ALTER TABLE public.stuck OWNER TO "${cred.username}"`, [], 'closed_db');
    await b1.pg.query('ALTER DATABASE closed_db ALLOW_CONNECTIONS false', [], 'postgres');
    await untilPast(cred.expires_at);
    await Promise.all([b1.reaper.reap(), b2.reaper.reap()]);
    const lease = await leaseRow(b1.pg, cred.lease_id);
    assert.equal(lease.state, 'revoking');
    assert.match(lease.last_error, /DROP ROLE: .*closed_db/);

    await b1.pg.query('ALTER DATABASE closed_db ALLOW_CONNECTIONS true', [], 'postgres');
    // An admin need not wait for the backoff: DELETE retries a failing teardown right away.
    const res = await api(b1, 'DELETE', `/leases/${cred.lease_id}`, await b1.adminToken());
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.state, 'expired', 'it keeps the reason it ended for');
    assert.equal(res.body.last_error, null);
    assert.equal(await roleExists(b1.pg, cred.username), false);
    assert.deepEqual(await auditTypes(b1.pg, cred.lease_id), ['credential.issued', 'lease.teardown_failed', 'lease.expired']);
  });
});
