import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { api, connectAs, leaseRow, loginError, roleExists, startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';
import { addGroupRole } from './helpers/postgres.js';

let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('faults', { claims: { sub: 'faults:*' }, grant_role: 'app_migrators', max_active_leases: 50 });
});
after(async () => b?.close());

describe('teardown with one database refusing connections', () => {
  test('only the role owning something there waits; the batch\'s other roles are dropped, and the reaper finishes once the database accepts connections', async () => {
    const creds = [];
    for (let i = 0; i < 6; i++) {
      const res = await b.issue(await b.token({ sub: `faults:u${i}` }), { ttl: 300 });
      assert.equal(res.status, 201, JSON.stringify(res.body));
      creds.push(res.body);
    }
    // A database at its connection limit answers every new connection with 53300, which is a
    // connection error, but says nothing about the cluster.
    await b.pg.query('CREATE DATABASE faults_full CONNECTION LIMIT 0', [], 'postgres');
    const [stuck, ...rest] = creds;
    await b.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO "${stuck.username}"`, [], 'faults_full');
    // It also owns a table here, whose handover commits although the role cannot be dropped yet.
    await b.pg.query(`CREATE TABLE public.kept_here (id int); ALTER TABLE public.kept_here OWNER TO "${stuck.username}"`);

    const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { policy: 'faults' });
    assert.equal(res.status, 500, JSON.stringify(res.body));
    assert.equal(res.body.code, 'REVOKE_INCOMPLETE');
    for (const cred of rest) {
      assert.equal(await roleExists(b.pg, cred.username), false, cred.username);
      assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked', cred.username);
    }
    const row = await leaseRow(b.pg, stuck.lease_id);
    assert.equal(row.state, 'revoking');
    assert.match(row.last_error, /faults_full: 53300/);
    assert.ok(await loginError(b.pg, stuck), 'its login is already refused');
    assert.deepEqual(await b.pg.query(`SELECT tableowner FROM pg_tables WHERE tablename = 'kept_here'`), [{ tableowner: 'app_migrators' }]);
    if (b.pg.version >= 16) {
      // The creator needed SET ROLE on it for that handover only: none of it was committed.
      const [m] = await b.pg.query(`SELECT count(*)::int AS n, count(*) FILTER (WHERE m.set_option)::int AS settable
                                      FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid WHERE r.rolname = $1`, [stuck.username]);
      assert.ok(m.n >= 1, 'the creator is a member while it ends the role');
      assert.equal(m.settable, 0);
    }

    await b.pg.query('ALTER DATABASE faults_full CONNECTION LIMIT -1', [], 'postgres');
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [stuck.lease_id]);
    const stats = await b.reaper.reap({ requireLeadership: false });
    assert.equal(stats.failed, 0, JSON.stringify(stats));
    assert.equal(await roleExists(b.pg, stuck.username), false);
    const [owner] = await b.pg.query(`SELECT tableowner FROM pg_tables WHERE tablename = 'kept'`, [], 'faults_full');
    assert.deepEqual(owner, { tableowner: 'app_migrators' });
  });
});

describe('teardown of a role that created a function', () => {
  test('the function goes to its group like its tables, and the revocation completes', async () => {
    const owner = await b.token({ sub: 'faults:fn' });
    const cred = (await b.issue(owner, { ttl: 300 })).body;
    const session = await connectAs(b.pg, cred);
    await session.query(`CREATE FUNCTION public.faults_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'`);
    await session.end();
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 200, JSON.stringify({ ...res.body, last_error: (await leaseRow(b.pg, cred.lease_id)).last_error }));
    assert.equal(await roleExists(b.pg, cred.username), false);
    const [fn] = await b.pg.query(`SELECT pg_get_userbyid(proowner) AS owner FROM pg_proc WHERE proname = 'faults_fn'`);
    assert.deepEqual(fn, { owner: 'app_migrators' });
  });

  test('a function met before its own schema in the catalogue goes over with it', async () => {
    await b.pg.query('GRANT CREATE ON DATABASE broker TO app_migrators', [], 'postgres');
    const owner = await b.token({ sub: 'faults:schema' });
    const cred = (await b.issue(owner, { ttl: 300 })).body;
    const session = await connectAs(b.pg, cred);
    // Created before the schema, then moved into it: its catalogue entry comes first, and handing
    // it over needs CREATE on a schema its new owner does not own yet.
    await session.query(`CREATE FUNCTION public.faults_moved() RETURNS int LANGUAGE sql AS 'SELECT 1'`);
    await session.query('CREATE SCHEMA faults_own');
    await session.query('REVOKE ALL ON SCHEMA faults_own FROM PUBLIC');
    await session.query('ALTER FUNCTION public.faults_moved() SET SCHEMA faults_own');
    await session.end();
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 200, JSON.stringify({ ...res.body, last_error: (await leaseRow(b.pg, cred.lease_id)).last_error }));
    const [moved] = await b.pg.query(
      `SELECT pg_get_userbyid(p.proowner) AS fn, pg_get_userbyid(n.nspowner) AS schema FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname = 'faults_moved'`);
    assert.deepEqual(moved, { fn: 'app_migrators', schema: 'app_migrators' });
  });
});

describe('teardown of a lease whose grant_role was dropped', () => {
  async function leaseOwningObjects(group: string, sub: string) {
    await addGroupRole(b.pg, group);
    await b.putPolicy(group, { claims: { sub: `${sub}:*` }, grant_role: group });
    const owner = await b.token({ sub: `${sub}:owner` });
    const cred = (await b.issue(owner, { ttl: 300 })).body;
    const session = await connectAs(b.pg, cred);
    await session.query(`CREATE TABLE public.${group}_kept (id int)`);
    // Run by anyone as its owner: whoever ends up owning it lends that role to every caller.
    await session.query(`CREATE FUNCTION public.${group}_definer() RETURNS text SECURITY DEFINER LANGUAGE sql AS 'SELECT current_user::text'`);
    await session.end();
    return { owner, cred };
  }
  const owners = async (group: string) => (await b.pg.query(
    `SELECT (SELECT tableowner FROM pg_tables WHERE tablename = $1) AS tableowner,
            (SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE proname = $2) AS proowner`, [`${group}_kept`, `${group}_definer`]))[0];

  test('with another group it inherits from, its objects go there and the revocation completes', async () => {
    const { owner, cred } = await leaseOwningObjects('faults_gone_a', 'gone-a');
    await b.pg.query(`GRANT app_readers TO "${cred.username}"`, [], 'postgres');
    await b.pg.query('DROP ROLE faults_gone_a', [], 'postgres');
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 200, JSON.stringify({ ...res.body, last_error: (await leaseRow(b.pg, cred.lease_id)).last_error }));
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.deepEqual(await owners('faults_gone_a'), { tableowner: 'app_readers', proowner: 'app_readers' });
  });

  test('privileges and default privileges alone need no group: the revocation completes', async () => {
    await addGroupRole(b.pg, 'faults_gone_c');
    await b.putPolicy('faults_gone_c', { claims: { sub: 'gone-c:*' }, grant_role: 'faults_gone_c' });
    const owner = await b.token({ sub: 'gone-c:owner' });
    const cred = (await b.issue(owner, { ttl: 300 })).body;
    const session = await connectAs(b.pg, cred);
    await session.query('ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO app_readers');
    await session.end();
    await b.pg.query('DROP ROLE faults_gone_c', [], 'postgres');
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 200, JSON.stringify({ ...res.body, last_error: (await leaseRow(b.pg, cred.lease_id)).last_error }));
    assert.equal(await roleExists(b.pg, cred.username), false);
  });

  test('a group joined without INHERIT takes nothing (16+; 15 has no such option)', async (t) => {
    if (b.pg.version < 16) return t.skip('PostgreSQL 15 has no INHERIT option on a membership');
    const { owner, cred } = await leaseOwningObjects('faults_gone_d', 'gone-d');
    await b.pg.query(`GRANT app_readers TO "${cred.username}" WITH INHERIT FALSE`, [], 'postgres');
    await b.pg.query('DROP ROLE faults_gone_d', [], 'postgres');
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 500, JSON.stringify(res.body));
    assert.match((await leaseRow(b.pg, cred.lease_id)).last_error, /belongs to no group that could take them/);
    assert.deepEqual(await owners('faults_gone_d'), { tableowner: cred.username, proowner: cred.username });
    // The same group with INHERIT takes them.
    await b.pg.query(`GRANT app_readers TO "${cred.username}" WITH INHERIT TRUE`, [], 'postgres');
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 0);
    assert.deepEqual(await owners('faults_gone_d'), { tableowner: 'app_readers', proowner: 'app_readers' });
  });

  test('a privileged group, one inheriting a predefined role, or (16+) one joined without SET takes nothing', async () => {
    const { owner, cred } = await leaseOwningObjects('faults_gone_e', 'gone-e');
    await b.pg.query(`CREATE ROLE faults_bypass NOLOGIN BYPASSRLS; CREATE ROLE faults_reads_all NOLOGIN; GRANT pg_read_all_data TO faults_reads_all;
                      GRANT faults_bypass, faults_reads_all TO "${cred.username}"`, [], 'postgres');
    // PostgreSQL 15 has no SET option on a membership.
    if (b.pg.version >= 16) await b.pg.query(`GRANT app_readers TO "${cred.username}" WITH SET FALSE`, [], 'postgres');
    await b.pg.query('DROP ROLE faults_gone_e', [], 'postgres');
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 500, JSON.stringify(res.body));
    assert.match((await leaseRow(b.pg, cred.lease_id)).last_error, /belongs to no group that could take them/);
    assert.deepEqual(await owners('faults_gone_e'), { tableowner: cred.username, proowner: cred.username });
    // The plain group, with SET, takes them.
    await b.pg.query(`GRANT app_readers TO "${cred.username}"${b.pg.version >= 16 ? ' WITH SET TRUE' : ''}`, [], 'postgres');
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 0);
    assert.deepEqual(await owners('faults_gone_e'), { tableowner: 'app_readers', proowner: 'app_readers' });
  });

  test('with none, nothing goes to the broker\'s own role: the teardown stops with its login disabled, says what to do, and finishes once that is done', async () => {
    const { owner, cred } = await leaseOwningObjects('faults_gone_b', 'gone-b');
    await b.pg.query('DROP ROLE faults_gone_b', [], 'postgres');
    const res = await api(b, 'DELETE', `/leases/${cred.lease_id}`, owner);
    assert.equal(res.status, 500, JSON.stringify(res.body));
    assert.equal(res.body.code, 'REVOKE_INCOMPLETE');
    assert.match(res.body.detail, /login disabled/);
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.match(row.last_error, /owns objects and belongs to no group that could take them; reassign them by hand \(REASSIGN OWNED BY/);
    assert.ok(await loginError(b.pg, cred), 'its login is refused');
    // Nothing was handed to the broker, and nothing was dropped.
    assert.deepEqual(await owners('faults_gone_b'), { tableowner: cred.username, proowner: cred.username });

    await b.pg.query(`REASSIGN OWNED BY "${cred.username}" TO app_readers`);
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 0);
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    assert.deepEqual(await owners('faults_gone_b'), { tableowner: 'app_readers', proowner: 'app_readers' });
  });
});

describe('PostgreSQL lost during a synchronous revocation\'s teardown, and back when it is recorded', () => {
  // Another session's open ALTER ROLE holds the issued role, so the teardown's NOLOGIN waits; its
  // pooled connection is then terminated as in a server restart (57P01), while the pool's other
  // connections, which record the attempt, live on.
  async function revokeDuringOutage(sub: string, send: (owner: string, leaseId: string) => Promise<{ statusCode: number; headers: Record<string, unknown>; json(): any }>) {
    const owner = await b.token({ sub });
    const cred = (await b.issue(owner, { ttl: 300 })).body;
    const holder = new pg.Client({ connectionString: b.pg.superuserUrl });
    holder.on('error', () => undefined);
    await holder.connect();
    let res;
    try {
      await holder.query(`BEGIN; ALTER ROLE "${cred.username}" CONNECTION LIMIT 7`);
      const answer = send(owner, cred.lease_id);
      const { pid } = await waitFor('the teardown waiting on the role', async () => (await b.pg.query(
        `SELECT pid FROM pg_stat_activity WHERE application_name = 'pg-credential-broker' AND wait_event_type = 'Lock' AND query LIKE '%NOLOGIN%'`))[0]);
      await b.pg.query('SELECT pg_terminate_backend($1)', [pid]);
      res = await answer;
      assert.equal(await loginError(b.pg, cred), undefined, 'the login still works at this point');
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await holder.end();
    }
    // The failed attempt is recorded, and the reaper finishes the teardown.
    const row = await leaseRow(b.pg, cred.lease_id);
    assert.equal(row.state, 'revoking');
    assert.equal(row.attempts, 1);
    assert.match(row.last_error, /57P01/);
    await b.pg.query('UPDATE broker.leases SET next_attempt_at = now() WHERE id = $1', [cred.lease_id]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 0);
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    return res;
  }

  test('DELETE /leases/{id} answers 503 DATABASE_UNAVAILABLE with Retry-After, saying the login is not disabled yet', async () => {
    const res = await revokeDuringOutage('faults:outage1', (owner, id) => b.app.inject({ method: 'DELETE', url: `/leases/${id}`, headers: { authorization: `Bearer ${owner}` } }));
    assert.equal(res.statusCode, 503, JSON.stringify(res.json()));
    assert.equal(res.json().code, 'DATABASE_UNAVAILABLE');
    assert.match(res.json().detail, /^PostgreSQL went away during the teardown: the lease is ended, but its login could not be disabled yet/);
    assert.equal(res.headers['retry-after'], '5');
  });

  test('a slow DROP OWNED in one database is no outage: 500 REVOKE_INCOMPLETE, not 503', async () => {
    // No lock timeout, and a client that stops waiting after 3 s: the teardown's per-database
    // statement then times out on the client while PostgreSQL itself is fine.
    const slow = await startTestBroker({ pg: b.pg, issuer: b.issuer, env: { BROKER_LOCK_TIMEOUT: '0', BROKER_QUERY_TIMEOUT: '3' } });
    const holder = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/postgres$/, '/broker') });
    holder.on('error', () => undefined);
    await holder.connect();
    try {
      const owner = await slow.token({ sub: 'faults:slow' });
      const cred = (await slow.issue(owner, { ttl: 300 })).body;
      const session = await connectAs(b.pg, cred);
      await session.query('CREATE TABLE public.faults_slow (id int)');
      await session.end();
      await holder.query('BEGIN; LOCK TABLE public.faults_slow IN ACCESS EXCLUSIVE MODE');
      const res = await api(slow, 'DELETE', `/leases/${cred.lease_id}`, owner);
      assert.equal(res.status, 500, JSON.stringify(res.body));
      assert.equal(res.body.code, 'REVOKE_INCOMPLETE');
      assert.match((await leaseRow(b.pg, cred.lease_id)).last_error, /Query read timeout/);
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await holder.end();
      await slow.close();
    }
  });

  test('POST /leases/revoke keeps its 500 REVOKE_INCOMPLETE: a retry would find nothing active and answer {revoked: 0}', async () => {
    const admin = await b.adminToken();
    const res = await revokeDuringOutage('faults:outage2', () => b.app.inject({
      method: 'POST', url: '/leases/revoke', headers: { authorization: `Bearer ${admin}` }, payload: { subject: 'faults:outage2' } }));
    assert.equal(res.statusCode, 500, JSON.stringify(res.json()));
    assert.equal(res.json().code, 'REVOKE_INCOMPLETE');
    assert.match(res.json().detail, /1 of their logins could not be disabled yet/);
  });
});
