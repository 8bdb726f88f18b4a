import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { scramVerifier } from '../src/postgres/scram.js';
import { api, connectAs, leaseRow, loginError, roleExists, startTestBroker, untilPast, waitFor, type TestBroker } from './helpers/broker.js';

// What the holder of an issued credential can do, with that credential alone, to outlive its lease.
const HANG_GUARD = { timeout: 60_000 };
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_LOCK_TIMEOUT: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('tricks', { claims: { sub: 'trick:*' } });
});
after(async () => b?.close());

/** A session of the credential that alters its own role and leaves the transaction open. */
async function holdOwnRow(cred: { username: string; password: string }): Promise<{ session: pg.Client; ended: Promise<unknown> }> {
  const session = await connectAs(b.pg, cred);
  const ended = new Promise((resolve) => session.once('error', resolve));
  await session.query('BEGIN');
  // Any role may change its own password; the open transaction keeps its catalogue row locked.
  await session.query(`ALTER ROLE "${cred.username}" PASSWORD NULL`);
  return { session, ended };
}

/**
 * Issues to `sub` through `broker`, holds the role's row from a session of it, and revokes: the
 * answer is 200 revoked, the session is ended (with its error) and the role is gone.
 */
async function revokeWhileHeld(broker: TestBroker, sub: string): Promise<{ cred: any; sessionError: Error }> {
  const token = await broker.token({ sub });
  const cred = (await broker.issue(token)).body;
  const { session, ended } = await holdOwnRow(cred);
  try {
    const revoked = await api(broker, 'DELETE', `/leases/${cred.lease_id}`, token);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal(revoked.body.state, 'revoked');
    const sessionError = (await ended) as Error;
    assert.equal(await roleExists(b.pg, cred.username), false);
    return { cred, sessionError };
  } finally {
    await session.end().catch(() => undefined);
  }
}

describe('the marker role every issued role joins', () => {
  test('cannot be taken up with SET ROLE, so nothing made as it outlives a lease; the group still can', async (t) => {
    if (b.pg.version < 16) {
      return t.skip('PostgreSQL 15 has no SET option on a membership: any member may SET ROLE to the marker (README, Security notes)');
    }
    const cred = (await b.issue(await b.token({ sub: 'trick:marker' }))).body;
    const session = await connectAs(b.pg, cred);
    try {
      await assert.rejects(session.query(`SET ROLE ${b.config.managedRole}`), (err: { code?: string }) => err.code === '42501');
      // Nor do its privileges come along: it has none of its own, and inherits none.
      const [{ inherits }] = (await session.query(`SELECT pg_has_role('${b.config.managedRole}', 'USAGE') AS inherits`)).rows;
      assert.equal(inherits, false);
      // The policy's group is joined as before: its privileges apply, and SET ROLE to it works.
      assert.equal((await session.query('SELECT count(*)::int AS n FROM public.widgets')).rows[0].n, 3);
      await session.query('SET ROLE app_readers');
    } finally {
      await session.end();
    }
    // Still a plain member of the marker, which is how teardown and the orphan sweep know it.
    const [member] = await b.pg.query(
      `SELECT m.admin_option, m.inherit_option, m.set_option FROM pg_auth_members m
        WHERE m.member = $1::regrole AND m.roleid = $2::regrole`, [cred.username, b.config.managedRole]);
    assert.deepEqual(member, { admin_option: false, inherit_option: false, set_option: false });
  });
});

describe('an issued role that holds its own catalogue row in an open transaction', () => {
  test('is revoked all the same: its session is ended, its login refused and its role dropped', HANG_GUARD, async () => {
    const { cred, sessionError } = await revokeWhileHeld(b, 'trick:revoke');
    assert.match(String(sessionError.message), /terminat/);
    assert.equal(await loginError(b.pg, cred), '28P01', 'the credential no longer logs in');
    assert.equal((await leaseRow(b.pg, cred.lease_id)).last_error, null);
  });

  test('and reconnecting as fast as it can to take the row again, is revoked all the same', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'trick:reconnect' });
    const cred = (await b.issue(token)).body;
    let stop = false;
    let holds = 0;
    // Six clients that each log in, alter the role and keep the transaction open, until told to
    // stop, their login is refused, or 200 tries each.
    const worker = async () => {
      for (let tries = 0; !stop && tries < 200; tries++) {
        const c = await connectAs(b.pg, cred).catch(() => null);
        if (!c) return;
        c.on('error', () => undefined);
        try {
          await c.query('BEGIN');
          await c.query(`ALTER ROLE "${cred.username}" PASSWORD NULL`);
          holds++;
          await c.query('SELECT pg_sleep(60)');
        } catch { /* ended by the teardown */ }
        await c.end().catch(() => undefined);
      }
    };
    const workers = Array.from({ length: 6 }, worker);
    await waitFor('a client to hold the row', async () => holds > 0);
    const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
    stop = true;
    await Promise.all(workers);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal(await roleExists(b.pg, cred.username), false);
  });

  test('with lock waits unbounded (BROKER_LOCK_TIMEOUT=0), is revoked without waiting for a timeout', HANG_GUARD, async () => {
    const unbounded = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { BROKER_LOCK_TIMEOUT: '0' } });
    try {
      await revokeWhileHeld(unbounded, 'trick:unbounded');
    } finally {
      await unbounded.close();
    }
  });

  test('is revoked by a broker that logs in as another role and takes its own with SET ROLE', HANG_GUARD, async () => {
    // Such a broker cannot see its own sessions' queries or waits in pg_stat_activity.
    // A verifier, as the broker sends: the statement log, which the secrets check reads, never holds the password.
    await b.pg.query(`CREATE ROLE broker_login LOGIN PASSWORD '${scramVerifier('login-pw', 16)}'; GRANT broker TO broker_login`, [], 'postgres');
    const url = new URL(b.pg.brokerUrl);
    Object.assign(url, { username: 'broker_login', password: 'login-pw' });
    url.searchParams.set('options', '-c role=broker');
    const viaSetRole = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { DATABASE_URL: url.href, BROKER_LOCK_TIMEOUT: '3' } });
    try {
      await revokeWhileHeld(viaSetRole, 'trick:set-role');
    } finally {
      await viaSetRole.close();
    }
  });

  test('in a prepared transaction, which no session holds, is revoked all the same: the transaction is rolled back as its owner', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'trick:prepared' });
    const cred = (await b.issue(token)).body;
    const session = await connectAs(b.pg, cred);
    await session.query(`BEGIN; ALTER ROLE "${cred.username}" PASSWORD NULL; PREPARE TRANSACTION 'held-${cred.username}'`);
    await session.end();
    const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal(revoked.body.state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.deepEqual(await b.pg.query('SELECT gid FROM pg_prepared_xacts WHERE gid = $1', [`held-${cred.username}`]), []);
    // NOLOGIN waited out its lock timeout once, then went through.
    const events = await b.pg.query(`SELECT type FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.teardown_failed'`, [cred.lease_id]);
    assert.deepEqual(events, []);
  });

  test('and past its expiry is ended by the reaper on its first try', HANG_GUARD, async () => {
    const cred = (await b.issue(await b.token({ sub: 'trick:expire' }), { ttl: 3 })).body;
    const { session, ended } = await holdOwnRow(cred);
    try {
      await untilPast(cred.expires_at);
      const stats = await b.reaper.reap({ requireLeadership: false });
      assert.deepEqual([stats.failed, (await leaseRow(b.pg, cred.lease_id)).state], [0, 'expired'], JSON.stringify(stats));
      await ended;
    } finally {
      await session.end().catch(() => undefined);
    }
    assert.equal(await roleExists(b.pg, cred.username), false);
  });
});

describe('a prepared transaction of an issued role that leaves its own role row alone', () => {
  const prepared = async (gid: string) => (await b.pg.query('SELECT owner, database FROM pg_prepared_xacts WHERE gid = $1', [gid]));

  test('is rolled back by the revocation, its locks with it; another role\'s prepared transaction is left alone', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'trick:prepared-lock' });
    const cred = (await b.issue(token)).body;
    const session = await connectAs(b.pg, cred);
    // Any lock or write the group's privileges allow would do: here a lock on the group's table.
    await session.query(`BEGIN; LOCK TABLE public.widgets IN ACCESS SHARE MODE; PREPARE TRANSACTION 'lock-${cred.username}'`);
    await session.end();
    await b.pg.query(`BEGIN; SELECT 1 FROM public.widgets LIMIT 1; PREPARE TRANSACTION 'bystander-${cred.username}'`);
    assert.deepEqual((await prepared(`lock-${cred.username}`)).map((r) => r.owner), [cred.username], 'prepared as the issued role');
    const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal(revoked.body.state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.deepEqual(await prepared(`lock-${cred.username}`), [], 'the issued role\'s prepared transaction outlived its lease');
    assert.deepEqual((await prepared(`bystander-${cred.username}`)).map((r) => r.owner), ['postgres'], 'another role\'s prepared transaction is not the broker\'s to end');
    await b.pg.query(`ROLLBACK PREPARED 'bystander-${cred.username}'`);
    // The lock went with it: the table's owner can alter the table at once.
    await b.pg.query(`SET lock_timeout = '2s'; ALTER TABLE public.widgets ADD COLUMN "after_${cred.username}" int; ALTER TABLE public.widgets DROP COLUMN "after_${cred.username}"`);
  });

  test('on a table the role owns, no longer fails the handover of that table on every attempt', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'trick:prepared-own' });
    const cred = (await b.issue(token)).body;
    const session = await connectAs(b.pg, cred);
    await session.query(`SET ROLE NONE; CREATE TABLE public."mine_${cred.username}" (id int)`);
    await session.query(`BEGIN; INSERT INTO public."mine_${cred.username}" VALUES (1); PREPARE TRANSACTION 'own-${cred.username}'`);
    await session.end();
    const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.deepEqual(await prepared(`own-${cred.username}`), []);
    // Handed over to the group, without the prepared row.
    const [table] = await b.pg.query(`SELECT pg_get_userbyid(c.relowner) AS owner FROM pg_class c WHERE c.relname = $1`, [`mine_${cred.username}`]);
    assert.equal(table.owner, (await leaseRow(b.pg, cred.lease_id)).grant_role);
    assert.deepEqual(await b.pg.query(`SELECT * FROM public."mine_${cred.username}"`), []);
  });
});

describe('another session\'s transaction on a table the issued role owns', () => {
  test('fails the handover naming that session, and once it ends the next attempt drops the role', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'trick:blocked-handover' });
    const cred = (await b.issue(token)).body;
    const session = await connectAs(b.pg, cred);
    await session.query(`SET ROLE NONE; CREATE TABLE public."kept_${cred.username}" (id int)`);
    await session.end();
    // An app's long transaction (here a superuser's), reading the table and left open.
    const reader = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/[^/?]*(\?|$)/, '/broker$1') });
    reader.on('error', () => undefined);
    await reader.connect();
    try {
      await reader.query(`BEGIN; SELECT * FROM public."kept_${cred.username}"`);
      const pid = (await reader.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
      const stuck = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
      assert.equal(stuck.status, 500, JSON.stringify(stuck.body));
      assert.match((await leaseRow(b.pg, cred.lease_id)).last_error,
        new RegExp(`^broker: 55P03: .*\\(locks on their tables in broker are held by pid ${pid} \\(postgres\\); retried once those transactions end\\)$`));
      assert.equal(await roleExists(b.pg, cred.username), true);
    } finally {
      await reader.end();
    }
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    const stats = await b.reaper.reap({ requireLeadership: false });
    assert.equal(stats.failed, 0, JSON.stringify(stats));
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
  });
});
