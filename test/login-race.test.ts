import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import net from 'node:net';
import pg from 'pg';
import { api, connectAs, leaseRow, loginError, roleExists, startTestBroker, untilPast, waitFor, type TestBroker } from './helpers/broker.js';

// A login that is still starting when its lease ends. PostgreSQL checks rolcanlogin early in a
// backend's start-up (InitializeSessionUserId) but shows the backend under its role in
// pg_stat_activity only at the end of it (pgstat_bestart, 15; pgstat_bestart_final, 18), and any
// client may stretch the time between the two with post_auth_delay in its startup packet.
const HANG_GUARD = { timeout: 60_000 };
// Long enough that the revocation is over well before the held login would finish by itself.
const HELD_SECONDS = 4;
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('race', { claims: { sub: 'race:*' } });
});
after(async () => b?.close());

interface HeldLogin {
  client: pg.Client;
  /** null once logged in, else the error the login failed with. */
  outcome: Promise<Error | null>;
}

/** Backends starting up in otherdb that already hold its pg_database lock. */
async function heldInOtherdb(): Promise<number> {
  const [{ n }] = await b.pg.query<{ n: number }>(
    `SELECT count(*)::int AS n FROM pg_locks l JOIN pg_database d ON d.oid = l.objid
      WHERE l.locktype = 'object' AND l.classid = 'pg_database'::regclass AND l.granted AND d.datname = 'otherdb'`);
  return n;
}

/**
 * Starts logins as `creds` that the server holds past the role check for HELD_SECONDS; resolves
 * once all are held there. Into otherdb, which nothing else here connects to: a backend takes its
 * database's lock after the role check and keeps it until its start-up is over, so that lock
 * shows the login passed the check.
 */
async function heldLogins(creds: Array<{ username: string; password: string }>): Promise<HeldLogin[]> {
  const logins = creds.map((cred) => {
    const client = new pg.Client({
      host: b.pg.host, port: b.pg.port, user: cred.username, password: cred.password, database: 'otherdb',
      options: `-c post_auth_delay=${HELD_SECONDS}`,
    });
    client.on('error', () => undefined);
    return { client, outcome: client.connect().then(() => null, (err: Error) => err) };
  });
  await waitFor('the logins to pass the role check', async () => (await heldInOtherdb()) === creds.length);
  return logins;
}

/** Whether a login came through and still answers a query. */
async function answers(login: HeldLogin): Promise<boolean> {
  if (await login.outcome) return false;
  return login.client.query('SELECT 1').then(() => true, () => false);
}

describe('a login still starting when its lease is revoked', () => {
  test('is ended with the role; a held login of another lease is left to finish', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'race:victim' });
    const cred = (await b.issue(token)).body;
    const bystander = (await b.issue(await b.token({ sub: 'race:bystander' }))).body;
    // The credential works, as does the held login the same way, when nothing is revoked.
    const plain = await connectAs(b.pg, cred);
    assert.equal((await plain.query('SELECT count(*)::int AS n FROM public.widgets')).rows[0].n, 3);
    await plain.end();

    const [held, other] = await heldLogins([cred, bystander]);
    try {
      const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
      assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
      assert.equal(revoked.body.state, 'revoked');
      assert.equal(await roleExists(b.pg, cred.username), false);
      assert.equal(await answers(held), false, 'the held login finished after the revocation, logged in as a dropped role');
      assert.equal(await loginError(b.pg, cred), '28P01');

      assert.equal(await other.outcome, null, 'the other lease\'s held login comes through');
      assert.equal((await other.client.query('SELECT current_user AS u')).rows[0].u, bystander.username);
    } finally {
      await held.client.end().catch(() => undefined);
      await other.client.end().catch(() => undefined);
    }
  });

  test('whose lease expires is ended by the reaper with the role', HANG_GUARD, async () => {
    const cred = (await b.issue(await b.token({ sub: 'race:expiring' }), { ttl: 3 })).body;
    assert.ok(cred.username, JSON.stringify(cred));
    const [held] = await heldLogins([cred]);
    try {
      await untilPast(cred.expires_at);
      const stats = await b.reaper.reap();
      assert.equal(stats.failed, 0, JSON.stringify(stats));
      assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'expired');
      assert.equal(await roleExists(b.pg, cred.username), false);
      assert.equal(await answers(held), false, 'the held login finished after the reaper dropped its role');
    } finally {
      await held.client.end().catch(() => undefined);
    }
  });
});

describe('a login that passed the check and waits for its database\'s lock', () => {
  test('is ended with the role too', HANG_GUARD, async () => {
    const token = await b.token({ sub: 'race:db-lock' });
    const cred = (await b.issue(token)).body;
    // CREATE DATABASE … TEMPLATE otherdb holds a lock on otherdb for up to 5 s while another
    // session is connected there, and logins into otherdb queue behind it, after their role check.
    const present = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/[^/?]*(\?|$)/, '/otherdb$1') });
    await present.connect();
    const copying = b.pg.query('CREATE DATABASE race_copy TEMPLATE otherdb', [], 'postgres').catch((err: Error) => err);
    const waitingForDatabase = async () => (await b.pg.query(
      `SELECT 1 FROM pg_locks WHERE locktype = 'object' AND classid = 'pg_database'::regclass AND NOT granted`)).length > 0;
    const late = new pg.Client({ host: b.pg.host, port: b.pg.port, user: cred.username, password: cred.password, database: 'otherdb' });
    late.on('error', () => undefined);
    try {
      await waitFor('CREATE DATABASE to hold otherdb', async () => (await b.pg.query(
        `SELECT 1 FROM pg_locks WHERE locktype = 'object' AND classid = 'pg_database'::regclass AND mode = 'ShareLock' AND granted`)).length > 0);
      const outcome = late.connect().then(() => null, (err: Error) => err);
      await waitFor('the login to queue for otherdb', waitingForDatabase);
      const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
      assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
      assert.equal(await roleExists(b.pg, cred.username), false);
      assert.notEqual(await outcome, null, 'the queued login was ended, not let through as a dropped role');
    } finally {
      await late.end().catch(() => undefined);
      await present.end();
      await copying;
      await b.pg.query('DROP DATABASE IF EXISTS race_copy', [], 'postgres');
    }
  });
});

describe('a client stalled in authentication', () => {
  test('is not taken for a login still starting: a teardown does not wait on it or try to signal it', HANG_GUARD, async () => {
    // Sends a startup packet, gets the SASL challenge and never answers: anyone can, no password needed.
    const socket = await new Promise<net.Socket>((resolve) => {
      const s = net.connect(b.pg.port, b.pg.host, () => {
        const kv = Buffer.from(`user\0broker\0database\0${b.pg.database}\0\0`);
        const head = Buffer.alloc(8);
        head.writeInt32BE(8 + kv.length, 0);
        head.writeInt32BE(196608, 4);
        s.write(Buffer.concat([head, kv]));
      });
      s.once('data', () => resolve(s));
      s.on('error', () => undefined);
    });
    try {
      // In its start-up transaction, in no database yet (on 15 not in pg_stat_activity at all).
      const { pid } = await waitFor('the stalled backend to show', async () => (await b.pg.query<{ pid: number }>(
        `SELECT pid FROM pg_locks WHERE locktype = 'virtualxid' AND granted AND pid <> pg_backend_pid()
            AND pid NOT IN (SELECT pid FROM pg_stat_activity WHERE datid IS NOT NULL)`))[0]);
      // The pids a teardown tries to signal are listed in its DO block, which the server logs.
      const signalled = () => b.pg.logLines().filter((l) => l.includes('FOREACH p IN ARRAY'));
      const before = signalled().length;
      const token = await b.token({ sub: 'race:stalled' });
      const cred = (await b.issue(token)).body;
      const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
      assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
      assert.equal(await roleExists(b.pg, cred.username), false);
      const tried = signalled().slice(before).filter((l) => new RegExp(`\\b${pid}\\b`).test(l));
      assert.deepEqual(tried, [], `the stalled backend ${pid} was taken for a starting login`);
    } finally {
      socket.destroy();
    }
  });
});
