import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { identityLockKey } from '../src/leases/repository.js';
import { connectAs, loginError, startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';
import { addGroupRole } from './helpers/postgres.js';

let b: TestBroker;

before(async () => {
  b = await startTestBroker();
  await b.putPolicy('ci-main', { claims: { sub: 'repo:octo-org/octo-repo:ref:refs/heads/*' }, default_ttl: 300, max_ttl: 600, max_active_leases: 3 });
});
after(async () => b?.close());

describe('POST /credentials', () => {
  test('a matching token gets a working credential that can do what grant_role allows and nothing more', async () => {
    const res = await b.issue(await b.token());
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal(res.headers['cache-control'], 'no-store');
    const cred = res.body;
    for (const field of ['lease_id', 'username', 'password', 'expires_at', 'max_expires_at', 'policy', 'grant_role', 'host', 'port', 'database', 'uri']) {
      assert.ok(field in cred, `credential has ${field}`);
    }
    assert.equal(cred.policy, 'ci-main');
    assert.equal(cred.grant_role, 'app_readers');
    assert.match(cred.username, /^lease_repo_octo_org_octo_repo_ref_refs_heads_main_[a-z0-9]{10}$/);
    assert.equal(new URL(cred.uri).username, cred.username);
    const client = await connectAs(b.pg, cred);
    try {
      const { rows } = await client.query('SELECT count(*)::int AS n FROM public.widgets');
      assert.ok(rows[0].n > 0);
      await assert.rejects(client.query('DELETE FROM public.widgets'), { code: '42501' });
    } finally {
      await client.end();
    }
  });

  test('VALID UNTIL equals the expires_at handed to the client, and the lease and audit rows exist', async () => {
    const { body: cred } = await b.issue(await b.token(), { ttl: 120 });
    const [role] = await b.pg.query(`SELECT rolvaliduntil, rolcanlogin, rolconnlimit FROM pg_roles WHERE rolname = $1`, [cred.username]);
    assert.equal(new Date(role.rolvaliduntil).toISOString(), cred.expires_at);
    assert.equal(role.rolcanlogin, true);
    assert.equal(role.rolconnlimit, -1, 'the policy connection_limit (default: none)');
    const [lease] = await b.pg.query(`SELECT state, expires_at, subject FROM broker.leases WHERE id = $1`, [cred.lease_id], 'broker');
    assert.equal(lease.state, 'active');
    assert.equal(new Date(lease.expires_at).toISOString(), cred.expires_at);
    const audit = await b.pg.query(`SELECT type FROM broker.audit_events WHERE lease_id = $1`, [cred.lease_id], 'broker');
    assert.deepEqual(audit.map((a) => a.type), ['credential.issued']);
    const [comment] = await b.pg.query(`SELECT shobj_description(oid, 'pg_authid') AS c FROM pg_roles WHERE rolname = $1`, [cred.username]);
    assert.equal(comment.c, `lease ${cred.lease_id} sub repo:octo-org/octo-repo:ref:refs/heads/main`);
  });

  test('PostgreSQL holds a SCRAM verifier, never the password, even in the statement log', async () => {
    const { body: cred } = await b.issue(await b.token());
    const [row] = await b.pg.query(`SELECT rolpassword FROM pg_authid WHERE rolname = $1`, [cred.username]);
    assert.match(row.rolpassword, /^SCRAM-SHA-256\$16:[^$]+\$[^:]+:.+$/);
    assert.ok(!row.rolpassword.includes(cred.password));
    const log = b.pg.logLines().join('\n');
    assert.ok(log.includes(`CREATE ROLE "${cred.username}"`), 'the statement log captured the CREATE ROLE');
    assert.ok(!log.includes(cred.password), 'the password is not in the server log');
  });

  test('CONNECTION LIMIT of an issued role is the policy connection_limit', async () => {
    await b.putPolicy('conn-limited', { claims: { sub: 'conn:*' }, connection_limit: 2 });
    let deleted: number | undefined;
    try {
      const res = await b.issue(await b.token({ sub: 'conn:limited' }));
      assert.equal(res.status, 201, JSON.stringify(res.body));
      assert.equal(res.body.policy, 'conn-limited');
      const [role] = await b.pg.query(`SELECT rolconnlimit FROM pg_roles WHERE rolname = $1`, [res.body.username]);
      assert.equal(role.rolconnlimit, 2);
    } finally {
      deleted = (await b.app.inject({ method: 'DELETE', url: '/policies/conn-limited', headers: { authorization: `Bearer ${await b.adminToken()}` } })).statusCode;
    }
    assert.equal(deleted, 204);
  });

  test('a short TTL stops working at expiry without any broker action', async () => {
    const { body: cred } = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/short' }), { ttl: 3 });
    assert.equal(await loginError(b.pg, cred), undefined, 'works before expiry');
    await sleep(Math.max(0, new Date(cred.expires_at).getTime() - Date.now()) + 1200);
    assert.equal(await loginError(b.pg, cred), '28P01');
  });

  test('a TTL over max_ttl is a 400; at max_ttl it is accepted', async () => {
    const over = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/ttl' }), { ttl: 601 });
    assert.equal(over.status, 400);
    assert.equal(over.body.code, 'BAD_REQUEST');
    assert.match(over.body.detail, /max_ttl/);
    const ok = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/ttl' }), { ttl: 600 });
    assert.equal(ok.status, 201);
  });

  test('unknown body fields and wrong types are 400 problem+json', async () => {
    const tok = await b.token();
    for (const body of [{ tll: 5 }, { ttl: 'ten' }, { ttl: 0 }, { ttl: -5 }, { ttl: 1.5 }, { policy: 7 }]) {
      const res = await b.app.inject({ method: 'POST', url: '/credentials', headers: { authorization: `Bearer ${tok}` }, payload: body });
      assert.equal(res.statusCode, 400, JSON.stringify(body));
      assert.match(String(res.headers['content-type']), /application\/problem\+json/);
      assert.equal(res.json().code, 'BAD_REQUEST');
    }
  });

  test('a request with no body at all is a request with no options (curl -X POST, fetch without body)', async () => {
    const tok = await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/no-body' });
    const res = await b.app.inject({ method: 'POST', url: '/credentials', headers: { authorization: `Bearer ${tok}` } });
    assert.equal(res.statusCode, 201, res.body);
    assert.equal(res.json().policy, 'ci-main');
    // A body that says it is JSON must still be JSON.
    const empty = await b.app.inject({ method: 'POST', url: '/credentials', headers: { authorization: `Bearer ${tok}`, 'content-type': 'application/json' }, payload: '' });
    assert.equal(empty.statusCode, 400, empty.body);
    assert.match(String(empty.headers['content-type']), /application\/problem\+json/);
    const nul = await b.app.inject({ method: 'POST', url: '/credentials', headers: { authorization: `Bearer ${tok}`, 'content-type': 'application/json' }, payload: 'null' });
    assert.equal(nul.statusCode, 400, nul.body);
  });

  test('max_active_leases is enforced per subject: the fourth concurrent lease is a 429', async () => {
    const tok = await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/quota' });
    const results = await Promise.all([1, 2, 3, 4, 5].map(() => b.issue(tok)));
    const statuses = results.map((r) => r.status).sort();
    assert.deepEqual(statuses, [201, 201, 201, 429, 429]);
    const denied = results.find((r) => r.status === 429)!;
    assert.equal(denied.body.code, 'LEASE_QUOTA_EXCEEDED');
    const other = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/quota2' }));
    assert.equal(other.status, 201, 'another subject is not affected');
  });

  test('max_active_leases holds when the broker\'s role defaults to a stricter isolation level; requests queued on the identity lock still see the leases committed meanwhile', async () => {
    await b.putPolicy('one-at-a-time', { claims: { sub: 'isolation:*' }, max_active_leases: 1 });
    for (const level of ['repeatable read', 'serializable']) {
      // A DBA's default for the broker's role; only sessions opened after it see it.
      await b.pg.query(`ALTER ROLE broker SET default_transaction_isolation = '${level}'`);
      const strict = await startTestBroker({ pg: b.pg, issuer: b.issuer });
      const holder = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/[^/?]*(\?|$)/, '/broker$1') });
      try {
        const sub = `isolation:${level.replace(' ', '-')}`;
        const tok = await strict.token({ sub });
        // Four requests queue on the identity's lock, so each reads the quota after the others commit.
        await holder.connect();
        await holder.query('BEGIN');
        await holder.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [identityLockKey(b.issuer.issuer, sub)]);
        const pending = [1, 2, 3, 4].map(() => strict.issue(tok));
        await waitFor('four issuances waiting on the identity lock', async () => {
          const [{ waiting }] = await b.pg.query(`SELECT count(*)::int AS waiting FROM pg_stat_activity WHERE usename = 'broker' AND wait_event_type = 'Lock'`);
          return waiting >= 4;
        }, 60_000);
        await holder.query('COMMIT');
        const results = await Promise.all(pending);
        assert.deepEqual(results.map((r) => r.status).sort(), [201, 429, 429, 429], `${level}: ${JSON.stringify(results.map((r) => r.body.code))}`);
        const [{ n }] = await b.pg.query(`SELECT count(*)::int AS n FROM broker.leases WHERE subject = $1`, [sub]);
        assert.equal(n, 1, level);
      } finally {
        await holder.end().catch(() => undefined);
        await strict.close();
        await b.pg.query('ALTER ROLE broker RESET default_transaction_isolation');
      }
    }
  });

  test('a lease past its expiry no longer counts against max_active_leases, reaped or not', async () => {
    const sub = 'repo:octo-org/octo-repo:ref:refs/heads/quota-expired';
    const tok = await b.token({ sub });
    const leases = await Promise.all([1, 2, 3].map(() => b.issue(tok, { ttl: 60 })));
    assert.deepEqual(leases.map((r) => r.status), [201, 201, 201]);
    const full = await b.issue(tok);
    assert.equal(full.status, 429, 'three live leases fill the quota');
    assert.equal(full.body.code, 'LEASE_QUOTA_EXCEEDED');
    // Their expiry passes; no reaper runs in this test broker, so the rows still read active.
    const expired = await b.pg.query(
      `UPDATE broker.leases SET expires_at = now() - interval '1 second' WHERE subject = $1 AND state = 'active' RETURNING id`, [sub]);
    assert.deepEqual(expired.map((r) => r.id).sort(), leases.map((r) => r.body.lease_id).sort());
    const [{ n }] = await b.pg.query(`SELECT count(*)::int AS n FROM broker.leases WHERE subject = $1 AND state = 'active'`, [sub]);
    assert.equal(n, 3);
    assert.equal((await b.issue(tok)).status, 201);
  });

  test('no matching policy is 403 and leaves a denial audit event; two matches need a name (409)', async () => {
    const stranger = await b.issue(await b.token({ sub: 'repo:evil/repo:ref:refs/heads/main' }));
    assert.equal(stranger.status, 403);
    assert.equal(stranger.body.code, 'NO_POLICY');
    const denial = await b.pg.query(
      `SELECT type, reason, actor_verified FROM broker.audit_events WHERE subject = 'repo:evil/repo:ref:refs/heads/main'`, [], 'broker');
    assert.deepEqual(denial, [{ type: 'credential.denied', reason: 'no_policy', actor_verified: true }]);

    await b.putPolicy('ci-any-branch', { claims: { sub: 'repo:octo-org/*' } });
    let deleted: number | undefined;
    try {
      const ambiguous = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/amb' }));
      assert.equal(ambiguous.status, 409);
      assert.equal(ambiguous.body.code, 'AMBIGUOUS_POLICY');
      const named = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/amb' }), { policy: 'ci-any-branch' });
      assert.equal(named.status, 201);
      assert.equal(named.body.policy, 'ci-any-branch');
      const missing = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/amb' }), { policy: 'no-such-policy' });
      assert.equal(missing.status, 403, 'a missing named policy looks like a refusal');
    } finally {
      deleted = (await b.app.inject({ method: 'DELETE', url: '/policies/ci-any-branch', headers: { authorization: `Bearer ${await b.adminToken()}` } })).statusCode;
    }
    assert.equal(deleted, 204);
  });

  test('POST /policies/evaluate explains each policy of the issuer, disabled ones included', async () => {
    await b.putPolicy('ev-on', { claims: { sub: 'ev:*', ref: 'refs/heads/main' } });
    await b.putPolicy('ev-off', { claims: { sub: 'ev:*' }, enabled: false });
    const evaluate = async (claims: Record<string, unknown>) => {
      const res = await b.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${await b.token(claims)}` } });
      assert.equal(res.statusCode, 200, res.body);
      return Object.fromEntries(res.json().policies.map((p: { name: string }) => [p.name, p]));
    };
    const deleted: number[] = [];
    try {
      const refused = await evaluate({ sub: 'ev:one', ref: 'refs/heads/dev' });
      assert.deepEqual(refused['ev-on'], { name: 'ev-on', admitted: false, failed_claims: [{ claim: 'ref', patterns: ['refs/heads/main'], value: 'refs/heads/dev' }] });
      assert.deepEqual(refused['ev-off'], { name: 'ev-off', admitted: false, reason: 'policy is disabled', failed_claims: [] });
      assert.equal((await b.issue(await b.token({ sub: 'ev:one', ref: 'refs/heads/dev' }))).status, 403);
      const admitted = await evaluate({ sub: 'ev:one', ref: 'refs/heads/main' });
      assert.equal(admitted['ev-on'].admitted, true);
      assert.equal(admitted['ev-off'].admitted, false);
      assert.equal((await b.issue(await b.token({ sub: 'ev:one', ref: 'refs/heads/main' }))).status, 201, 'only the enabled one issues');
    } finally {
      for (const name of ['ev-on', 'ev-off']) {
        deleted.push((await b.app.inject({ method: 'DELETE', url: `/policies/${name}`, headers: { authorization: `Bearer ${await b.adminToken()}` } })).statusCode);
      }
    }
    assert.deepEqual(deleted, [204, 204]);
  });

  test('hostile subjects still yield a valid role and no SQL error', async () => {
    await b.putPolicy('hostile', { claims: { hostile: 'yes' }, max_active_leases: 50 });
    const subjects = [`it's "quoted"`, 'back\\slash', `x"; DROP ROLE broker; --`, 'ünïcødé-主体-🔑', 'x'.repeat(1000), `$$; SELECT pg_sleep(10); $$`];
    for (const sub of subjects) {
      const res = await b.issue(await b.token({ sub, hostile: 'yes' }));
      assert.equal(res.status, 201, `${sub.slice(0, 40)}: ${JSON.stringify(res.body)}`);
      assert.ok(Buffer.byteLength(res.body.username) <= 63);
      assert.match(res.body.username, /^[a-z0-9_]+$/);
      const client = await connectAs(b.pg, res.body);
      await client.end();
      const [lease] = await b.pg.query('SELECT subject FROM broker.leases WHERE id = $1', [res.body.lease_id], 'broker');
      assert.equal(lease.subject, sub);
    }
    const [broker] = await b.pg.query(`SELECT count(*)::int AS n FROM pg_roles WHERE rolname = 'broker'`);
    assert.equal(broker.n, 1);
  });

  test('a failed CREATE ROLE leaves neither a role nor a lease, and the server log holds no password', async () => {
    // A policy whose group role disappears after it was stored: CREATE ROLE ... IN ROLE fails for real.
    await addGroupRole(b.pg, 'doomed_group');
    await b.putPolicy('doomed', { claims: { doomed: 'yes' }, grant_role: 'doomed_group' });
    await b.pg.query('DROP ROLE doomed_group');
    const before = await b.pg.query(`SELECT count(*)::int AS n FROM broker.leases`, [], 'broker');
    const rolesBefore = await b.pg.query(`SELECT count(*)::int AS n FROM pg_roles`);
    const res = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/doomed', doomed: 'yes' }), { policy: 'doomed' });
    // Within the grant recheck interval the guard still remembers the group as safe, so CREATE ROLE
    // is what finds it gone; the answer is the guard's own, not PostgreSQL's error text.
    assert.equal(res.status, 403, JSON.stringify(res.body));
    assert.equal(res.body.code, 'GRANT_ROLE_UNSAFE');
    assert.match(res.body.detail, /grant_role doomed_group does not exist$/);
    assert.ok(!JSON.stringify(res.body).includes('role \\"doomed_group\\" does not exist'), 'no PostgreSQL error text reaches the client');
    assert.deepEqual(await b.pg.query(`SELECT count(*)::int AS n FROM broker.leases`, [], 'broker'), before, 'the lease insert was rolled back');
    assert.deepEqual(await b.pg.query(`SELECT count(*)::int AS n FROM pg_roles`), rolesBefore, 'no role was left behind');
    const failed = await b.pg.query(`SELECT type FROM broker.audit_events WHERE subject = 'repo:octo-org/octo-repo:ref:refs/heads/doomed'`, [], 'broker');
    assert.deepEqual(failed.map((f) => f.type), ['credential.denied']);
    const log = b.pg.logLines().join('\n');
    assert.match(log, /LOGIN PASSWORD 'SCRAM-SHA-256\$16:[^']+' VALID UNTIL[^\n]*IN ROLE "doomed_group"/, 'the failed statement was logged, with a verifier only');
  });

  test('BROKER_DB_POOL_SIZE bounds the connections a burst opens; every request is still served', async () => {
    assert.equal((b.app.db as unknown as { options: { max: number } }).options.max, 10, 'the default');
    const small = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { BROKER_DB_POOL_SIZE: '2' } });
    try {
      const pool = small.app.db as unknown as { options: { max: number }; totalCount: number };
      assert.equal(pool.options.max, 2);
      let most = 0;
      const burst = Array.from({ length: 8 }, async (_, i) => {
        const res = await small.issue(await small.token({ sub: `repo:octo-org/octo-repo:ref:refs/heads/pool-${i}` }));
        most = Math.max(most, pool.totalCount);
        return res.status;
      });
      assert.deepEqual(await Promise.all(burst), Array(8).fill(201));
      assert.ok(most >= 1 && most <= 2, `at most 2 connections open, saw ${most}`);
    } finally {
      await small.close();
    }
  });

  test('every issued role has a lease row', async () => {
    const orphans = await b.pg.query(
      `SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid JOIN pg_roles g ON g.oid = m.roleid
        WHERE g.rolname = $1 AND NOT m.admin_option AND NOT EXISTS (SELECT 1 FROM broker.leases l WHERE l.username = r.rolname)`, [b.config.managedRole], 'broker');
    assert.deepEqual(orphans, []);
  });
});
