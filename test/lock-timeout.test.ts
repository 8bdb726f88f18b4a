import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { identityLockKey } from '../src/leases/repository.js';
import { creatorNames, CREATOR_COUNT } from '../src/postgres/creators.js';
import { MIGRATION_LOCK_KEY } from '../src/postgres/migrate.js';
import { api, connectAs, leaseRow, roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';
import { addGroupRole } from './helpers/postgres.js';

// BROKER_LOCK_TIMEOUT bounds every lock wait of the broker's own connections. Without it, each
// request below waits for as long as another session keeps its transaction open (here: until the
// test's hang guard fails it).
const HANG_GUARD = { timeout: 60_000 };
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_LOCK_TIMEOUT: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('locks', { claims: { sub: 'lock:*' }, grant_role: 'app_migrators' });
});
after(async () => b?.close());

/** A superuser session that holds whatever `sql` locks until release() ends its transaction. */
async function holdLock(sql: string, params: unknown[] = []): Promise<{ release(): Promise<void> }> {
  const url = new URL(b.pg.superuserUrl);
  url.pathname = `/${b.pg.database}`;
  const holder = new pg.Client({ connectionString: url.toString() });
  await holder.connect();
  await holder.query('BEGIN');
  await holder.query(sql, params);
  return {
    async release() {
      await holder.query('ROLLBACK');
      await holder.end();
    },
  };
}

/** An issuance sent while another session holds what `sql` locks. */
async function issueWhileHeld(broker: TestBroker, token: string, sql: string, params: unknown[]) {
  const held = await holdLock(sql, params);
  try {
    return await broker.issue(token);
  } finally {
    await held.release();
  }
}

/** Seconds until the reaper's next try at a lease's teardown. */
const retryIn = async (id: string) =>
  (await b.pg.query<{ s: number }>('SELECT extract(epoch FROM next_attempt_at - now())::float8 AS s FROM broker.leases WHERE id = $1', [id]))[0].s;

const count = async (sql: string, params: unknown[]) => (await b.pg.query<{ n: number }>(`SELECT count(*)::int AS n FROM ${sql}`, params))[0].n;

describe('lock waits are bounded by BROKER_LOCK_TIMEOUT', () => {
  test('issuance blocked behind another session answers 503 DATABASE_BUSY with Retry-After, creates nothing, and succeeds once the lock is gone', HANG_GUARD, async () => {
    const sub = 'lock:issue';
    const token = await b.token({ sub });
    // The per-identity lock every issuance for this subject takes first.
    const busy = await issueWhileHeld(b, token, 'SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [identityLockKey(b.issuer.issuer, sub)]);
    assert.equal(busy.status, 503, JSON.stringify(busy.body));
    assert.equal(busy.body.code, 'DATABASE_BUSY');
    assert.match(busy.body.detail, /over 1 s \(BROKER_LOCK_TIMEOUT\).*rolled back, retry shortly/);
    assert.ok(Number(busy.headers['retry-after']) > 0, 'Retry-After is set');
    assert.equal(await count('broker.leases WHERE subject = $1', [sub]), 0, 'no lease row');
    const [failed] = await b.pg.query(`SELECT type, reason FROM broker.audit_events WHERE subject = $1 ORDER BY id`, [sub]);
    assert.deepEqual(failed, { type: 'credential.failed', reason: '55P03' });
    assert.ok(b.logs.some((l) => l.includes('PostgreSQL cancelled a statement') && l.includes('55P03')), 'the lock timeout is logged');

    const ok = await b.issue(token);
    assert.equal(ok.status, 201, JSON.stringify(ok.body));
    assert.equal(await roleExists(b.pg, ok.body.username), true);
  });

  test('a first issuance that cannot set up the creator roles (another replica migrating) is a 503 audited as credential.failed, and the next one succeeds', HANG_GUARD, async () => {
    // A broker that has not issued yet: its first issuance checks the creator roles, taking the
    // migration lock as replicas do.
    const fresh = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { BROKER_LOCK_TIMEOUT: '1' } });
    try {
      const sub = 'lock:creators';
      const token = await fresh.token({ sub });
      const busy = await issueWhileHeld(fresh, token, 'SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK_KEY]);
      assert.equal(busy.status, 503, JSON.stringify(busy.body));
      assert.equal(busy.body.code, 'DATABASE_BUSY');
      const events = await b.pg.query(`SELECT type, reason FROM broker.audit_events WHERE subject = $1 ORDER BY id`, [sub]);
      assert.deepEqual(events, [{ type: 'credential.failed', reason: '55P03' }]);

      const ok = await fresh.issue(token);
      assert.equal(ok.status, 201, JSON.stringify(ok.body));
    } finally {
      await fresh.close();
    }
  });

  test('with lock waits unbounded, BROKER_QUERY_TIMEOUT has PostgreSQL cancel the wait: 503 DATABASE_BUSY, and no session is left waiting behind', HANG_GUARD, async () => {
    // A second broker on the same database and issuer, without a lock timeout.
    const patient = await startTestBroker({
      pg: b.pg, issuer: b.issuer,
      env: { BROKER_LOCK_TIMEOUT: '0', BROKER_QUERY_TIMEOUT: '2', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' },
    });
    try {
      const sub = 'lock:statement';
      const token = await b.token({ sub });
      const held = await holdLock('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [identityLockKey(b.issuer.issuer, sub)]);
      let busy;
      let waiting;
      try {
        busy = await patient.issue(token);
        // Had only the client given up, its session would still be queued on the lock here.
        waiting = await b.pg.query(`SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-credential-broker' AND wait_event_type = 'Lock'`);
      } finally {
        await held.release();
      }
      assert.equal(busy.status, 503, JSON.stringify(busy.body));
      assert.equal(busy.body.code, 'DATABASE_BUSY');
      assert.match(busy.body.detail, /statement timeout of 2 s, BROKER_QUERY_TIMEOUT.*rolled back, retry shortly/);
      assert.deepEqual(waiting, []);
      assert.equal(await count('broker.leases WHERE subject = $1', [sub]), 0, 'no lease row');

      const ok = await patient.issue(token);
      assert.equal(ok.status, 201, JSON.stringify(ok.body));
    } finally {
      await patient.close();
    }
  });

  test('a revocation whose teardown waits on a table lock ends the lease and disables the login, answers REVOKE_INCOMPLETE, and the reaper finishes it after the lock is gone', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'lock:revoke' });
    const res = await b.issue(token);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const cred = res.body;
    const session = await connectAs(b.pg, cred);
    await session.query('CREATE TABLE public.locked_by_reader (id int)');
    await session.end();

    // A long reader of the lease's table: REASSIGN OWNED needs that table's ACCESS EXCLUSIVE lock.
    const reader = await holdLock('SELECT count(*) FROM public.locked_by_reader');
    let revoked;
    try {
      revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
    } finally {
      await reader.release();
    }
    assert.equal(revoked.status, 500, JSON.stringify(revoked.body));
    assert.equal(revoked.body.code, 'REVOKE_INCOMPLETE');
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.equal(row.state, 'revoking');
    assert.match(row.last_error, /55P03/);
    const [login] = await b.pg.query('SELECT rolcanlogin FROM pg_roles WHERE rolname = $1', [cred.username]);
    assert.deepEqual(login, { rolcanlogin: false }, 'the login is disabled while teardown waits');

    // Past NOLOGIN, a failure backs off like any other (twice the reaper interval at first).
    assert.ok(await retryIn(cred.lease_id) > b.config.reaperIntervalSeconds + 2);

    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    const stats = await b.reaper.reap({ requireLeadership: false });
    assert.equal(stats.failed, 0, JSON.stringify(stats));
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    const [owner] = await b.pg.query(`SELECT tableowner FROM pg_tables WHERE tablename = 'locked_by_reader'`);
    assert.deepEqual(owner, { tableowner: 'app_migrators' });
  });

  test('a revocation whose NOLOGIN waits on the role itself says the login is still enabled, and the reaper retries at its interval, without backoff, until it gets through', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'lock:nologin' });
    const res = await b.issue(token);
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const cred = res.body;

    // An admin's open ALTER ROLE holds the role's catalogue row, which NOLOGIN must update.
    const admin = await holdLock(`ALTER ROLE "${cred.username}" CONNECTION LIMIT 3`);
    let revoked;
    let retryDelays: number[] = [];
    try {
      revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
      retryDelays.push(await retryIn(cred.lease_id));
      // Later attempts keep the short delay while the login stays enabled.
      for (let i = 0; i < 2; i++) {
        await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
        const stats = await b.reaper.reap({ requireLeadership: false });
        assert.equal(stats.failed, 1, JSON.stringify(stats));
        retryDelays.push(await retryIn(cred.lease_id));
      }
    } finally {
      await admin.release();
    }
    assert.equal(revoked.status, 500, JSON.stringify(revoked.body));
    assert.equal(revoked.body.code, 'REVOKE_INCOMPLETE');
    assert.match(revoked.body.detail, new RegExp(`its login could not be disabled yet; the reaper keeps trying \\(every ${b.config.reaperIntervalSeconds} s at first\\)`));
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.deepEqual([row.state, row.attempts], ['revoking', 3]);
    assert.match(row.last_error, /^NOLOGIN: 55P03/);
    for (const delay of retryDelays) assert.ok(delay > 0 && delay <= b.config.reaperIntervalSeconds, `retried within the interval, not ${delay} s`);
    assert.ok(b.logs.some((l) => l.includes('failed before its login was disabled') && l.includes(cred.lease_id)), 'the log says the login is still enabled');

    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    const stats = await b.reaper.reap({ requireLeadership: false });
    assert.equal(stats.failed, 0, JSON.stringify(stats));
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
  });

  test('a policy change whose audit event waits on a lock answers 503 and changes nothing; once the lock is gone the same change succeeds with its event', HANG_GUARD, async () => {
    const admin = await b.adminToken();
    const name = 'audited-change';
    const before = await b.putPolicy(name, { claims: { sub: 'lock:audited' }, description: 'before' });
    const events = () => b.pg.query(`SELECT type FROM broker.audit_events WHERE policy = $1 AND type LIKE 'policy.%' ORDER BY id`, [name]);
    assert.deepEqual(await events(), [{ type: 'policy.created' }]);
    // A group no policy used before: on 16+ the change grants it to the creator roles.
    await addGroupRole(b.pg, 'audited_group');
    const creatorsHolding = () => count(
      `pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles c ON c.oid = m.member
        WHERE g.rolname = 'audited_group' AND m.admin_option AND c.rolname = ANY($1)`, [creatorNames(b.config.managedRole)]);
    const change = { issuer: b.issuer.issuer, claims: { sub: 'lock:audited' }, grant_role: 'audited_group', database: b.pg.database, description: 'after', default_ttl: 60 };

    // A report holding the audit table in SHARE mode: reads go on, every INSERT waits. The
    // policy row and the grant are free, so only the step after them can time out.
    const whileReporting = async (method: 'PUT' | 'DELETE', payload?: unknown) => {
      const report = await holdLock('LOCK TABLE broker.audit_events IN SHARE MODE');
      try {
        return await api(b, method, `/policies/${name}`, admin, payload);
      } finally {
        await report.release();
      }
    };
    const busy = (res: { status: number; body: any }) => {
      assert.equal(res.status, 503, JSON.stringify(res.body));
      assert.equal(res.body.code, 'DATABASE_BUSY');
    };
    busy(await whileReporting('PUT', change));
    assert.deepEqual((await api(b, 'GET', `/policies/${name}`, admin)).body, before, 'the PUT left the policy as it was');
    assert.equal(await creatorsHolding(), 0, 'and granted nothing');
    busy(await whileReporting('DELETE'));
    assert.equal((await api(b, 'GET', `/policies/${name}`, admin)).status, 200, 'the DELETE left the policy in place');
    assert.deepEqual(await events(), [{ type: 'policy.created' }], 'and neither left a policy event');

    const ok = await api(b, 'PUT', `/policies/${name}`, admin, change);
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.deepEqual([ok.body.description, ok.body.default_ttl, ok.body.grant_role], ['after', 60, 'audited_group']);
    assert.equal(await creatorsHolding(), b.pg.version >= 16 ? CREATOR_COUNT : 0);
    const gone = await api(b, 'DELETE', `/policies/${name}`, admin);
    assert.equal(gone.status, 204, JSON.stringify(gone.body));
    assert.deepEqual(await events(), [{ type: 'policy.created' }, { type: 'policy.updated' }, { type: 'policy.deleted' }]);
  });

  test('a bulk revocation disables every creator group\'s logins before any group\'s teardown waits on a lock', HANG_GUARD, async () => {
    // Lock waits unbounded, so the teardown stays blocked until the test lets it go.
    const patient = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { BROKER_LOCK_TIMEOUT: '0', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
    let holder: { release(): Promise<void> } | undefined;
    try {
      const sub = 'lock:groups';
      const token = await patient.token({ sub });
      const creatorOf = async (username: string) => (await b.pg.query<{ creator: string }>(
        'SELECT member::regrole::text AS creator FROM pg_auth_members WHERE roleid = $1::regrole AND admin_option', [username]))[0].creator;
      // Two roles made by different creator roles (picked at random per credential).
      const owners: Array<{ username: string; creator: string }> = [];
      const issued: string[] = [];
      while (owners.length < 2 && issued.length < 10) {
        const res = await patient.issue(token);
        assert.equal(res.status, 201, JSON.stringify(res.body));
        issued.push(res.body.username);
        const creator = await creatorOf(res.body.username);
        if (owners.some((o) => o.creator === creator)) {
          await api(patient, 'DELETE', `/leases/${res.body.lease_id}`, token);
          issued.pop();
          continue;
        }
        owners.push({ username: res.body.username, creator });
        const session = await connectAs(b.pg, res.body);
        await session.query(`CREATE TABLE public.groups_${owners.length} (id int)`);
        await session.end();
      }
      assert.equal(owners.length, 2, 'two creator groups');
      // A reader of both tables: each group's REASSIGN OWNED waits for it.
      holder = await holdLock('SELECT FROM public.groups_1, public.groups_2');
      const revoking = api(patient, 'POST', '/leases/revoke', await patient.adminToken(), { subject: sub });
      for (let waiting = 0; waiting === 0; await new Promise((r) => setTimeout(r, 50))) {
        [{ waiting }] = await b.pg.query(`SELECT count(*)::int AS waiting FROM pg_stat_activity WHERE application_name = 'pg-credential-broker reaper' AND wait_event_type = 'Lock'`);
      }
      const logins = await b.pg.query('SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY($1) ORDER BY rolname', [issued]);
      assert.deepEqual(logins, [...issued].sort().map((rolname) => ({ rolname, rolcanlogin: false })), 'no login left while one group waits');
      await holder.release();
      holder = undefined;
      const revoked = await revoking;
      assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
      for (const name of issued) assert.equal(await roleExists(b.pg, name), false, name);
    } finally {
      await holder?.release();
      await patient.close();
    }
  });
});
