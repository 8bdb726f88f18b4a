import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { api, connectAs, leaseRow, loginError, roleExists, startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';

// Lock waits end after 1 s here, so a retry that meets a lock fails quickly instead of waiting.
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_LOCK_TIMEOUT: '1', BROKER_QUERY_TIMEOUT: '3', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('retry', { claims: { sub: 'retry:*' }, grant_role: 'app_migrators', max_active_leases: 50 });
});
after(async () => b?.close());

/** A superuser session in `database` whose transaction stays open until `release()`. */
async function holdOpen(database: string, sql: string): Promise<{ pid: number; release(): Promise<void> }> {
  const client = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/postgres$/, `/${database}`) });
  client.on('error', () => undefined);
  await client.connect();
  await client.query(`BEGIN; ${sql}`);
  return {
    pid: (client as unknown as { processID: number }).processID,
    async release() {
      await client.query('ROLLBACK').catch(() => undefined);
      await client.end();
    },
  };
}

/** An issued lease whose role owns a table in the broker's database. */
async function leaseOwningTable(broker: TestBroker, sub: string, table: string) {
  const owner = await broker.token({ sub });
  const res = await broker.issue(owner, { ttl: 300 });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const session = await connectAs(b.pg, res.body);
  await session.query(`CREATE TABLE public.${table} (id int)`);
  await session.end();
  return { owner, cred: res.body as { lease_id: string; username: string; password: string } };
}

const canLogin = async (username: string) => (await b.pg.query('SELECT rolcanlogin FROM pg_roles WHERE rolname = $1', [username]))[0]?.rolcanlogin;

describe('a teardown retried after an earlier attempt disabled the login', () => {
  test('a per-database handover the client gave up on, still running on the server, does not make the retry report the login as enabled; once it ends, the next attempt finishes', async () => {
    // On 16+ its GRANT of the role to the creator holds the role's lock. PostgreSQL 15 takes no
    // such lock for a GRANT of a membership that exists, so there this shows that the membership
    // is read right, and that the retry finishes.
    // No lock timeout, and a client that stops waiting after 3 s: its REASSIGN OWNED, queued behind
    // a lock on the role's table, is abandoned by the client and keeps running on the server.
    const slow = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { BROKER_LOCK_TIMEOUT: '0', BROKER_QUERY_TIMEOUT: '3' } });
    const { owner, cred } = await leaseOwningTable(slow, 'retry:abandoned', 'retry_abandoned');
    const table = await holdOpen('broker', 'LOCK TABLE public.retry_abandoned IN ACCESS EXCLUSIVE MODE');
    try {
      const first = await api(slow, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(first.status, 500, JSON.stringify(first.body));
      assert.match((await leaseRow(b.pg, cred.lease_id)).last_error, /^broker: Query read timeout/);
      const [abandoned] = await b.pg.query<{ pid: number }>(
        `SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-credential-broker reaper' AND wait_event_type = 'Lock'`);
      assert.ok(abandoned, 'the handover still runs on the server');
      if (b.pg.version >= 16) {
        // Its GRANT … SET TRUE of the role to the creator holds the role until it ends, and any
        // other GRANT of the role waits for that.
        const held = await b.pg.query(
          `SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'object' AND classid = 'pg_authid'::regclass
              AND objid = (SELECT oid FROM pg_roles WHERE rolname = $2) AND mode = 'ShareUpdateExclusiveLock' AND granted`,
          [abandoned.pid, cred.username]);
        assert.equal(held.length, 1, 'the abandoned handover holds the lock on the role');
      }

      const retry = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(retry.status, 500, JSON.stringify(retry.body));
      assert.equal(retry.body.code, 'REVOKE_INCOMPLETE');
      assert.match(retry.body.detail, /^The lease is ended and its login disabled/, JSON.stringify(retry.body));
      const row = await leaseRow(b.pg, cred.lease_id);
      // It stopped at the handover again (the lock on the role on 16+, the table's on 15), not before.
      assert.match(row.last_error, /^broker: 55P03/);
      assert.equal(row.attempts, 2);
      assert.equal(await canLogin(cred.username), false);
      assert.ok(await loginError(b.pg, cred), 'its login is refused');

      // The abandoned handover finishes once the table is free; then the next attempt drops the role.
      await table.release();
      await waitFor('the abandoned handover to end', async () =>
        (await b.pg.query('SELECT 1 FROM pg_stat_activity WHERE pid = $1', [abandoned.pid])).length === 0);
      const last = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(last.status, 200, JSON.stringify({ ...last.body, last_error: (await leaseRow(b.pg, cred.lease_id)).last_error }));
      assert.equal(await roleExists(b.pg, cred.username), false);
      assert.deepEqual(await b.pg.query(`SELECT tableowner FROM pg_tables WHERE tablename = 'retry_abandoned'`), [{ tableowner: 'app_migrators' }]);
    } finally {
      await table.release().catch(() => undefined);
      await slow.close();
    }
  });

  test('another session\'s open ALTER ROLE of the role does not either; with its login enabled again by hand, the retry says so', async () => {
    const { owner, cred } = await leaseOwningTable(b, 'retry:altered', 'retry_altered');
    const table = await holdOpen('broker', 'LOCK TABLE public.retry_altered IN ACCESS EXCLUSIVE MODE');
    const alterRole = `ALTER ROLE "${cred.username}" CONNECTION LIMIT 7`;
    let role = await holdOpen('postgres', 'SELECT 1');
    try {
      const first = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(first.status, 500, JSON.stringify(first.body));
      assert.match((await leaseRow(b.pg, cred.lease_id)).last_error, /^broker: 55P03/);
      assert.equal(await canLogin(cred.username), false);

      // A lock on the role's own catalogue row: an ALTER ROLE of it would wait, then time out.
      await role.release();
      role = await holdOpen('postgres', alterRole);
      const retry = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(retry.status, 500, JSON.stringify(retry.body));
      assert.match(retry.body.detail, /^The lease is ended and its login disabled/, JSON.stringify(retry.body));
      assert.match((await leaseRow(b.pg, cred.lease_id)).last_error, /^broker: 55P03/);

      // Truthful the other way round: a login someone enabled again is reported as enabled while
      // the same lock keeps NOLOGIN from being sent.
      await role.release();
      await b.pg.query(`ALTER ROLE "${cred.username}" LOGIN`, [], 'postgres');
      role = await holdOpen('postgres', alterRole);
      const enabled = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(enabled.status, 500, JSON.stringify(enabled.body));
      assert.match(enabled.body.detail, /^The lease is ended, but its login could not be disabled yet/, JSON.stringify(enabled.body));
      assert.match((await leaseRow(b.pg, cred.lease_id)).last_error, /^NOLOGIN: 55P03/);
      assert.equal(await loginError(b.pg, cred), undefined, 'the login does work');

      await role.release();
      await table.release();
      const last = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(last.status, 200, JSON.stringify({ ...last.body, last_error: (await leaseRow(b.pg, cred.lease_id)).last_error }));
      assert.equal(await roleExists(b.pg, cred.username), false);
    } finally {
      await role.release().catch(() => undefined);
      await table.release().catch(() => undefined);
    }
  });
});
