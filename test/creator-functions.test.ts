import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { asCreator, dollarQuote, ensureCreatorFunctions } from '../src/postgres/creator-functions.js';
import { creatorNames } from '../src/postgres/creators.js';
import { prepareCreators } from '../src/postgres/migrate.js';
import { connectAs, startTestBroker, type TestBroker } from './helpers/broker.js';

// PostgreSQL 16+ only (creators): the default embedded server is 18; test/pg15 does not run this.
let b: TestBroker;
before(async () => {
  b = await startTestBroker();
  await b.putPolicy('ci', { claims: { sub: 'repo:octo-org/octo-repo:ref:refs/heads/*' } });
});
after(async () => {
  await b?.close();
  await b?.pg.stop();
});

const functions = (names: string[]) => b.pg.query<{ name: string; oid: number; owner: string; secdef: boolean; public: boolean; broker: boolean; config: string[] }>(
  `SELECT p.proname AS name, p.oid::int AS oid, o.rolname AS owner, p.prosecdef AS secdef, p.proconfig AS config,
          has_function_privilege('public', p.oid, 'EXECUTE') AS public, has_function_privilege('broker', p.oid, 'EXECUTE') AS broker
     FROM pg_proc p JOIN pg_roles o ON o.oid = p.proowner
    WHERE p.pronamespace = 'broker'::regnamespace AND p.proname = ANY($1) ORDER BY 1`, [names], 'broker');

test('each creator owns a SECURITY DEFINER function only the broker may execute; a second run changes nothing', async () => {
  const names = creatorNames(b.config.managedRole);
  const rows = await functions(names);
  assert.deepEqual(rows.map((r) => r.name), names);
  for (const r of rows) {
    assert.equal(r.owner, r.name);
    assert.equal(r.secdef, true);
    assert.equal(r.public, false, 'PUBLIC lost the default EXECUTE');
    assert.equal(r.broker, true);
    assert.deepEqual(r.config, ['search_path=pg_catalog, pg_temp', 'createrole_self_grant=']);
  }
  // The creators hold nothing on the broker's schema once their functions exist.
  const [{ n }] = await b.pg.query(`SELECT count(*)::int AS n FROM unnest($1::text[]) c WHERE has_schema_privilege(c, 'broker', 'CREATE') OR has_schema_privilege(c, 'broker', 'USAGE')`, [names], 'broker');
  assert.equal(n, 0);
  const client = new pg.Client({ connectionString: b.pg.brokerUrl });
  await client.connect();
  try {
    await ensureCreatorFunctions(client, names);
  } finally {
    await client.end();
  }
  assert.deepEqual((await functions(names)).map((r) => r.oid), rows.map((r) => r.oid), 'left as they were');
});

test('a function someone widened or changed is made afresh', async () => {
  const [first, second] = creatorNames(b.config.managedRole);
  const fn = (name: string) => `broker."${name}"(text)`;
  const before = await functions([first, second]);
  await b.pg.query(`GRANT EXECUTE ON FUNCTION ${fn(first)} TO PUBLIC`, [], 'broker');
  await b.pg.query(`CREATE OR REPLACE FUNCTION ${fn(second).replace('(text)', '(statements text)')} RETURNS void LANGUAGE plpgsql SECURITY DEFINER
                      SET search_path = pg_catalog, pg_temp SET createrole_self_grant = '' AS $$BEGIN RAISE NOTICE '%', statements; END$$`, [], 'broker');
  assert.equal((await functions([first]))[0].public, true, 'widened');
  const client = new pg.Client({ connectionString: b.pg.brokerUrl });
  await client.connect();
  try {
    await ensureCreatorFunctions(client, [first, second]);
  } finally {
    await client.end();
  }
  const now = await functions([first, second]);
  assert.ok(now.every((r, i) => r.oid !== before[i].oid && !r.public && r.broker && r.owner === r.name));
  const [{ src }] = await b.pg.query(`SELECT prosrc AS src FROM pg_proc WHERE oid = $1`, [now[1].oid], 'broker');
  assert.match(src, /IF session_user <> 'broker' THEN[^]*EXECUTE statements;/);
});

test('an issued role can call no creator function; the broker issues through them', async () => {
  const { body: cred, status } = await b.issue(await b.token());
  assert.equal(status, 201, JSON.stringify(cred));
  // Created by one of the creators (it holds ADMIN OPTION), not by the broker.
  const [{ creator }] = await b.pg.query(
    `SELECT c.rolname AS creator FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid JOIN pg_roles c ON c.oid = m.member
      WHERE r.rolname = $1 AND m.admin_option`, [cred.username]);
  assert.ok(creatorNames(b.config.managedRole).includes(creator), creator);
  const client = await connectAs(b.pg, cred);
  try {
    await assert.rejects(client.query(asCreator(creator, `CREATE ROLE intruder`)), /permission denied for (function|schema)/);
  } finally {
    await client.end();
  }
  assert.deepEqual(await b.pg.query(`SELECT 1 FROM pg_roles WHERE rolname = 'intruder'`), []);
});

test('a role that inherits the broker\'s privileges, without SET ROLE to it, cannot act as a creator', async () => {
  const [creator] = creatorNames(b.config.managedRole);
  await b.pg.query(`CREATE ROLE reporting LOGIN PASSWORD 'reporting-pw'`, [], 'postgres');
  await b.pg.query(`GRANT broker TO reporting WITH INHERIT TRUE, SET FALSE`, [], 'postgres');
  const reporting = new pg.Client({ host: b.pg.host, port: b.pg.port, user: 'reporting', password: 'reporting-pw', database: 'broker' });
  await reporting.connect();
  try {
    // It holds the broker's EXECUTE through inheritance, and SET ROLE to the creator stays refused.
    const { rows: [held] } = await reporting.query(`SELECT has_function_privilege($1, 'EXECUTE') AS x`, [`broker."${creator}"(text)`]);
    assert.equal(held.x, true);
    await assert.rejects(reporting.query(`SET ROLE "${creator}"`), /permission denied to set role/);
    await assert.rejects(reporting.query(asCreator(creator, `CREATE ROLE intruder2 LOGIN IN ROLE app_readers`)), (err: { code?: string; message: string }) =>
      err.code === 'P0001' && /only the broker's role may act as a creator role/.test(err.message));
  } finally {
    await reporting.end();
  }
  assert.deepEqual(await b.pg.query(`SELECT 1 FROM pg_roles WHERE rolname = 'intruder2'`), []);
  // The broker's own login still acts through the same function.
  const client = new pg.Client({ connectionString: b.pg.brokerUrl });
  await client.connect();
  try {
    await client.query(asCreator(creator, `CREATE ROLE fine_by_broker NOLOGIN; DROP ROLE fine_by_broker`));
  } finally {
    await client.end();
  }
});

test('a login that may SET ROLE to the broker\'s role acts through the functions too, and running the set-up from it changes nothing', async () => {
  const names = creatorNames(b.config.managedRole);
  const before = await functions(names);
  await b.pg.query(`CREATE ROLE deployer LOGIN PASSWORD 'deployer-pw'`, [], 'postgres');
  await b.pg.query(`GRANT broker TO deployer WITH INHERIT FALSE, SET TRUE`, [], 'postgres');
  // As a connection string's options=-c role=broker would do.
  const deployer = new pg.Client({ host: b.pg.host, port: b.pg.port, user: 'deployer', password: 'deployer-pw', database: 'broker', options: '-c role=broker' });
  await deployer.connect();
  try {
    await deployer.query(asCreator(names[5], `CREATE ROLE via_deployer NOLOGIN; DROP ROLE via_deployer`));
    await ensureCreatorFunctions(deployer, names);
  } finally {
    await deployer.end();
  }
  assert.deepEqual((await functions(names)).map((r) => r.oid), before.map((r) => r.oid), 'not made again for another login');
});

test('functions dropped while the broker runs are made again: issuance, renewal and revocation go on', async () => {
  const names = creatorNames(b.config.managedRole);
  const dropAll = () => b.pg.query(names.map((n) => `DROP FUNCTION broker."${n}"(text)`).join(';\n'), [], 'broker');
  const admin = await b.adminToken();
  const call = (method: 'POST' | 'DELETE', url: string, token: string, payload?: object) =>
    b.app.inject({ method, url, headers: { authorization: `Bearer ${token}` }, payload });
  await dropAll();
  const owner = await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/dropped' });
  const issued = await b.issue(owner);
  assert.equal(issued.status, 201, JSON.stringify(issued.body));
  assert.equal((await functions(names)).length, names.length, 'every function is back');
  // A second repair waits a second after the first (one a second at most, see repairCreators).
  await new Promise((resolve) => setTimeout(resolve, 1100));
  await dropAll();
  const renewed = await call('POST', `/leases/${issued.body.lease_id}/renew`, owner, { ttl: 120 });
  assert.equal(renewed.statusCode, 200, renewed.body);
  await new Promise((resolve) => setTimeout(resolve, 1100));
  await dropAll();
  const revoked = await call('DELETE', `/leases/${issued.body.lease_id}`, admin);
  assert.equal(revoked.statusCode, 200, revoked.body);
  assert.deepEqual(await b.pg.query(`SELECT 1 FROM pg_roles WHERE rolname = $1`, [issued.body.username]), [], 'its role is gone');
  assert.equal((await functions(names)).length, names.length);
});

test('a repair that fails gives the request its own error at once, and is not tried again for a while', async () => {
  const names = creatorNames(b.config.managedRole);
  // ensureCreators refuses a creator that can log in, so the repair fails. (A second past the last
  // repair, the test before's, so this one is tried.)
  await new Promise((resolve) => setTimeout(resolve, 1100));
  await b.pg.query(`ALTER ROLE "${names[0]}" LOGIN`, [], 'postgres');
  await b.pg.query(names.map((n) => `DROP FUNCTION broker."${n}"(text)`).join(';\n'), [], 'broker');
  let fixed = false;
  const from = b.logs.length;
  try {
    const failed = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/repair-fails' }));
    assert.equal(failed.status, 500, JSON.stringify(failed.body));
    // Why the repair failed is logged once, for the operator.
    const why = b.logs.slice(from).map((l) => JSON.parse(l)).filter((l) => /cannot be made again/.test(l.msg));
    assert.equal(why.length, 1, b.logs.slice(from).join(''));
    assert.match(why[0].err.message, /creator role \S+_c00 exists and can log in/);
    // The cause is gone now, but within the pause the next request tries no repair: it fails on
    // the missing function too, and the functions stay missing (a repair would have made them).
    await b.pg.query(`ALTER ROLE "${names[0]}" NOLOGIN`, [], 'postgres');
    fixed = true;
    const again = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/repair-fails-2' }));
    assert.equal(again.status, 500, JSON.stringify(again.body));
    const reasons = await b.pg.query(`SELECT reason FROM broker.audit_events WHERE subject LIKE '%repair-fails%' AND type = 'credential.failed' ORDER BY id`);
    assert.deepEqual(reasons.map((r) => r.reason), ['42883', '42883'], 'each got its own error');
    assert.equal((await functions(names)).length, 0);
  } finally {
    if (!fixed) await b.pg.query(`ALTER ROLE "${names[0]}" NOLOGIN`, [], 'postgres');
  }
  // Once the cause is gone, start-up's set-up (or the next repair after the pause) makes them again.
  await prepareCreators(b.app.db, b.config.managedRole);
  const issued = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/repaired' }));
  assert.equal(issued.status, 201, JSON.stringify(issued.body));
});

test('a statement failing inside a creator function leaves no verifier in the broker log', async () => {
  // The creators lose the grant they hand out (ADMIN OPTION on app_readers, with the broker's),
  // after the policy was stored: CREATE ROLE … IN ROLE app_readers fails inside the function.
  await b.pg.query(`REVOKE ADMIN OPTION FOR app_readers FROM broker CASCADE`, [], 'postgres');
  const from = b.logs.length;
  const res = await b.issue(await b.token({ sub: 'repo:octo-org/octo-repo:ref:refs/heads/failing' }));
  assert.ok(res.status >= 400, JSON.stringify(res.body));
  const lines = b.logs.slice(from);
  const failure = lines.find((l) => l.includes('"42501"'));
  assert.ok(failure, `the failure was logged with its code: ${lines.join('\n')}`);
  assert.match(failure!, /\[REDACTED\]/, 'its statement text was censored');
  assert.ok(!lines.some((l) => l.includes('SCRAM-SHA-256$')), lines.filter((l) => l.includes('SCRAM')).join('\n'));
});

test('dollarQuote keeps the text as it is, whatever it contains', () => {
  assert.equal(dollarQuote(`it's`), `$pgcb$it's$pgcb$`);
  assert.equal(dollarQuote('a $pgcb$ b'), '$pgcb_$a $pgcb$ b$pgcb_$');
  assert.equal(dollarQuote('$pgcb$ $pgcb_$'), '$pgcb__$$pgcb$ $pgcb_$$pgcb__$');
  // Text ending in `$pgcb` would close a $pgcb$ quote early.
  assert.equal(dollarQuote('x $pgcb'), '$pgcb_$x $pgcb$pgcb_$');
  assert.equal(dollarQuote('x $'), '$pgcb$x $$pgcb$');
  assert.equal(asCreator(null, 'DROP ROLE x'), 'DROP ROLE x');
  assert.equal(asCreator('c"1', 'DROP ROLE x'), 'SELECT broker."c""1"($pgcb$DROP ROLE x$pgcb$)');
});
