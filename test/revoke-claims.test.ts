import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { CLAIM_SECONDS, claimDueLeases, markRevoking, renewClaim, type EndingLease } from '../src/leases/claims.js';
import { finishLeases } from '../src/leases/finish.js';
import { TEARDOWN_BATCH } from '../src/leases/revoke.js';
import { creatorNames } from '../src/postgres/creators.js';
import { scramVerifier } from '../src/postgres/scram.js';
import { api, connectAs, leaseRow, roleExists, startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';

// Revocations that outlast their claim, split from revoke.test.ts; one broker of their own.
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_REAPER_INTERVAL: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('app', { claims: { sub: 'user:*' }, max_active_leases: 10 });
});
after(async () => b?.close());

async function issueOk(sub: string, policy = 'app', ttl = 300): Promise<any> {
  const res = await b.issue(await b.token({ sub }), { policy, ttl });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

describe('a long bulk revocation', () => {
  test('renews its claim batch by batch and leaves a lease a reaper took over after a lapse to it', async () => {
    const creds = [await issueOk('user:claim-a'), await issueOk('user:claim-b'), await issueOk('user:claim-c')];
    const ids = creds.map((c) => c.lease_id);
    const marked = await markRevoking(b.app.db, { subject: 'user:claim-a' }, 'test', 'revoked');
    // Two more, marked by the same statement as a bulk revoke would, then one taken over by "another
    // claimer" after the claim lapsed; the third still ours, its claim about to run out.
    const more = await b.app.db.query<EndingLease>(
      `UPDATE broker.leases l SET state = 'revoking', ended_at = now(), ended_by = 'test', end_reason = 'revoked',
              next_attempt_at = now() + interval '1 second', claimed_by_pid = pg_backend_pid()
        WHERE id = ANY($1::uuid[]) RETURNING l.id, l.username, l.grant_role, l.end_reason, l.issuer, l.subject, l.policy, l.attempts, l.claimed_by_pid`,
      [ids.slice(1)]);
    const all = [...marked, ...more.rows];
    assert.equal(all.length, 3);
    await b.pg.query('UPDATE broker.leases SET claimed_by_pid = -1 WHERE id = $1', [ids[1]]);
    const kept = await renewClaim(b.app.db, all);
    assert.deepEqual(kept.map((l) => l.id).sort(), [ids[0], ids[2]].sort(), 'the taken-over lease is left out');
    const rows = await b.pg.query<{ id: string; left: number; claimed_by_pid: number }>(
      `SELECT id, extract(epoch FROM next_attempt_at - now())::float8 AS left, claimed_by_pid FROM broker.leases WHERE id = ANY($1::uuid[])`, [ids]);
    for (const r of rows) {
      if (r.id === ids[1]) assert.equal(r.claimed_by_pid, -1, 'not stolen back');
      else assert.ok(r.left > CLAIM_SECONDS - 10, `claim renewed: ${r.left} s left`);
    }
    // Finish what is ours, and hand the other back to the reaper as a lapsed claim would.
    await finishLeases({ pool: b.app.db, databaseUrl: b.config.databaseUrl, log: b.app.log, retryBaseSeconds: 1, managedRole: b.config.managedRole, timeouts: b.config }, kept);
    await b.pg.query('UPDATE broker.leases SET claimed_by_pid = NULL, next_attempt_at = now() WHERE id = $1', [ids[1]]);
    await b.reaper.reap({ requireLeadership: false });
    for (const c of creds) assert.equal(await roleExists(b.pg, c.username), false, c.username);
  });
});

describe('a bulk revocation that loses a claim', () => {
  test('ends every batch\'s logins first, and reports a lease another claimer took over and has not finished as unfinished, not as revoked', async () => {
    await b.putPolicy('many', { claims: { sub: 'many:*' }, max_active_leases: 300 });
    const token = await b.token({ sub: 'many:one' });
    const creds: any[] = [];
    // One more than a teardown batch, so the revocation has a second batch to reach late.
    for (let i = 0; i <= TEARDOWN_BATCH; i++) {
      const res = await b.issue(token, { policy: 'many' });
      assert.equal(res.status, 201, JSON.stringify(res.body));
      creds.push(res.body);
    }
    creds.sort((x, y) => (x.lease_id < y.lease_id ? -1 : 1));
    const [first, last] = [creds[0], creds[creds.length - 1]];
    const session = await connectAs(b.pg, first);
    await session.query('CREATE TABLE public.many_locked (id int)');
    await session.end();

    // A reader holds up the first batch's REASSIGN OWNED; meanwhile the claim on a lease of the
    // second batch lapses and a reaper takes it, and has not finished it when the revocation
    // gets there.
    const other = new pg.Pool({ connectionString: b.pg.brokerUrl, max: 1 });
    const reader = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/[^/?]*(\?|$)/, `/${b.pg.database}$1`) });
    await reader.connect();
    let revoked;
    try {
      await reader.query('BEGIN');
      await reader.query('SELECT FROM public.many_locked');
      const revoking = api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'many:one' });
      await waitFor('the revocation waiting on the reader\'s lock', async () => {
        const [{ waiting }] = await b.pg.query(`SELECT count(*)::int AS waiting FROM pg_stat_activity WHERE application_name = 'pg-credential-broker reaper' AND wait_event_type = 'Lock'`);
        return waiting > 0;
      }, 60_000);
      // The second batch's logins ended before the first batch's slow steps began.
      const [login] = await b.pg.query('SELECT rolcanlogin FROM pg_roles WHERE rolname = $1', [last.username]);
      assert.deepEqual(login, { rolcanlogin: false }, 'a later batch\'s login does not wait for the earlier batch');
      // Lapsed long ago, so it is the first due lease whatever earlier tests left behind.
      await b.pg.query(`UPDATE broker.leases SET next_attempt_at = now() - interval '1 hour' WHERE id = $1`, [last.lease_id]);
      // Another broker's reaper: its own connection, so a claim of its own.
      const claimed = await claimDueLeases(other, 1, creatorNames(b.config.managedRole));
      assert.deepEqual(claimed.map((l) => l.id), [last.lease_id]);
      await reader.query('ROLLBACK');
      revoked = await revoking;
      assert.equal(revoked.status, 500, JSON.stringify(revoked.body));
      assert.equal(revoked.body.code, 'REVOKE_INCOMPLETE');
      // Its login had ended before the takeover, and the answer says so.
      assert.match(revoked.body.detail, /ended and their logins disabled, but 1 teardown did not finish/);
      for (const c of creds.slice(0, -1)) assert.equal((await leaseRow(b.pg, c.lease_id)).state, 'revoked', c.lease_id);
      assert.equal((await leaseRow(b.pg, last.lease_id)).state, 'revoking', 'left to the claimer that took it');

      // The claimer that took it finishes it.
      await finishLeases({ pool: b.app.db, databaseUrl: b.config.databaseUrl, log: b.app.log, retryBaseSeconds: 1, managedRole: b.config.managedRole, timeouts: b.config }, claimed);
      assert.equal((await leaseRow(b.pg, last.lease_id)).state, 'revoked');
      assert.equal(await roleExists(b.pg, last.username), false);
    } finally {
      await reader.end().catch(() => undefined);
      await other.end();
    }
  });
});

describe('a lease issued before creator roles existed', () => {
  test('its role, created by the broker itself with the broker as member, is renewed and revoked as before', async () => {
    const cred = await issueOk('user:legacy-lee');
    // Recreate the role exactly as earlier versions did: by the broker's own role, which joins it
    // (ROLE broker) and, on 16+, holds ADMIN OPTION on it as its creator.
    await b.pg.query(`DROP ROLE ${pg.escapeIdentifier(cred.username)}`);
    await b.app.db.query(
      `CREATE ROLE ${pg.escapeIdentifier(cred.username)} LOGIN PASSWORD ${pg.escapeLiteral(scramVerifier(cred.password, 4096))}` +
      ` VALID UNTIL ${pg.escapeLiteral(cred.expires_at)} IN ROLE app_readers, ${pg.escapeIdentifier(b.config.managedRole)} ROLE broker`);
    const [{ creators }] = await b.pg.query(
      `SELECT count(*)::int AS creators FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member
        WHERE g.rolname = $1 AND r.rolname LIKE $2`, [cred.username, `${b.config.managedRole}\\_c%`]);
    assert.equal(creators, 0, 'no creator role is involved with this role');
    const session = await connectAs(b.pg, cred);
    try {
      const owner = await b.token({ sub: 'user:legacy-lee' });
      const renewed = await api(b, 'POST', `/leases/${cred.lease_id}/renew`, owner, { ttl: 600 });
      assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
      const [{ until }] = await b.pg.query(`SELECT rolvaliduntil AS until FROM pg_roles WHERE rolname = $1`, [cred.username]);
      assert.equal(new Date(until).toISOString(), renewed.body.expires_at);
      assert.notEqual(renewed.body.expires_at, cred.expires_at);
      const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(res.status, 200, JSON.stringify(res.body));
      assert.equal(res.body.state, 'revoked');
      await assert.rejects(session.query('SELECT 1'), 'the open session was ended');
    } finally {
      await session.end().catch(() => undefined);
    }
    assert.equal(await roleExists(b.pg, cred.username), false);
  });
});
