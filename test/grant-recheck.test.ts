import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { GrantRoleGuard } from '../src/postgres/grant-guard.js';
import { api, deniedCount, startTestBroker, type TestBroker } from './helpers/broker.js';
import { addGroupRole } from './helpers/postgres.js';

// PUT /policies refuses an unsafe grant_role; these tests cover a group that becomes unsafe
// after its policy was stored.
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_GRANT_RECHECK_INTERVAL: '0' } });
  await addGroupRole(b.pg, 'gr_group');
  await b.putPolicy('gr', { claims: { sub: 'gr:*' }, grant_role: 'gr_group' });
});
after(async () => b?.close());

test('a group granted a predefined role after its policy was stored issues nothing until it is fixed', async () => {
  const ok = await b.issue(await b.token({ sub: 'gr:before' }));
  assert.equal(ok.status, 201, JSON.stringify(ok.body));

  await b.pg.query('GRANT pg_read_server_files TO gr_group', [], 'postgres');
  try {
    const refused = await b.issue(await b.token({ sub: 'gr:during' }));
    assert.equal(refused.status, 403, JSON.stringify(refused.body));
    assert.equal(refused.body.code, 'GRANT_ROLE_UNSAFE');
    assert.match(refused.body.detail, /Policy gr .*grant_role gr_group inherits from pg_read_server_files, which is a predefined PostgreSQL role/);
    // Nothing was created for the refused request; the refusal is audited, counted and logged.
    assert.deepEqual(await b.pg.query(`SELECT 1 FROM broker.leases WHERE subject = 'gr:during'`), []);
    assert.deepEqual(await b.pg.query(`SELECT 1 FROM pg_roles WHERE rolname LIKE 'lease_gr_during%'`), []);
    const [audit] = await b.pg.query(`SELECT type, policy, reason FROM broker.audit_events WHERE subject = 'gr:during'`);
    assert.deepEqual(audit, { type: 'credential.denied', policy: 'gr', reason: 'grant_role_unsafe' });
    assert.equal(await deniedCount(b, 'gr', 'grant_role_unsafe'), 1);
    assert.ok(b.logs.some((l) => l.includes('issuance refused') && l.includes('pg_read_server_files')), 'a warning names the problem');
    const explained = await api(b, 'POST', '/policies/evaluate', await b.token({ sub: 'gr:asks' }));
    const gr = explained.body.policies.find((p: { name: string }) => p.name === 'gr');
    assert.deepEqual([gr.admitted, gr.failed_claims], [true, []]);
    assert.match(gr.cannot_issue, /grant_role gr_group inherits from pg_read_server_files/);
    // A policy that does not admit the token is not checked further: its refusal is the claims'.
    const other = await api(b, 'POST', '/policies/evaluate', await b.token({ sub: 'elsewhere' }));
    assert.deepEqual(other.body.policies.map((p: { admitted: boolean; cannot_issue?: string }) => [p.admitted, p.cannot_issue]), [[false, undefined]]);
  } finally {
    await b.pg.query('REVOKE pg_read_server_files FROM gr_group', [], 'postgres');
  }

  const again = await b.issue(await b.token({ sub: 'gr:after' }));
  assert.equal(again.status, 201, JSON.stringify(again.body));
  const fine = await api(b, 'POST', '/policies/evaluate', await b.token({ sub: 'gr:asks' }));
  assert.equal(fine.body.policies.find((p: { name: string }) => p.name === 'gr').cannot_issue, undefined);
});

test('a lease whose group has become unsafe is not renewed, and renews again once it is fixed', async () => {
  const owner = await b.token({ sub: 'gr:renewer' });
  const lease = (await b.issue(owner, { ttl: 120 })).body;
  const renew = async () => {
    const res = await b.app.inject({ method: 'POST', url: `/leases/${lease.lease_id}/renew`, headers: { authorization: `Bearer ${owner}` }, payload: { ttl: 600 } });
    return { status: res.statusCode, body: res.json() };
  };
  await b.pg.query('GRANT pg_read_server_files TO gr_group', [], 'postgres');
  try {
    const refused = await renew();
    assert.equal(refused.status, 403, JSON.stringify(refused.body));
    assert.equal(refused.body.code, 'GRANT_ROLE_UNSAFE');
    assert.match(refused.body.detail, /inherits from pg_read_server_files/);
    const [row] = await b.pg.query('SELECT expires_at FROM broker.leases WHERE id = $1', [lease.lease_id]);
    assert.equal((row.expires_at as Date).toISOString(), lease.expires_at, 'the expiry did not move');
    const [role] = await b.pg.query('SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1', [lease.username]);
    assert.equal((role.rolvaliduntil as Date).toISOString(), lease.expires_at, 'nor did VALID UNTIL');
    const [audit] = await b.pg.query(`SELECT type, reason FROM broker.audit_events WHERE request_id = $1`, [refused.body.request_id]);
    assert.deepEqual(audit, { type: 'request.denied', reason: 'GRANT_ROLE_UNSAFE' });
  } finally {
    await b.pg.query('REVOKE pg_read_server_files FROM gr_group', [], 'postgres');
  }
  const renewed = await renew();
  assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
  assert.ok(Date.parse(renewed.body.expires_at) > Date.parse(lease.expires_at));
});

test('the answer is kept for the interval, and a fresh check replaces it', async () => {
  const client = new pg.Client({ connectionString: b.pg.brokerUrl });
  await client.connect();
  let now = 1_000_000;
  const guard = new GrantRoleGuard(b.config.managedRole, 60_000, () => now);
  try {
    assert.equal(await guard.problem(client, 'gr_group'), null);
    await b.pg.query('GRANT pg_read_server_files TO gr_group', [], 'postgres');
    now += 59_999;
    assert.equal(await guard.problem(client, 'gr_group'), null, 'still within the interval');
    now += 1;
    assert.match(String(await guard.problem(client, 'gr_group')), /inherits from pg_read_server_files/);
    await b.pg.query('REVOKE pg_read_server_files FROM gr_group', [], 'postgres');
    assert.match(String(await guard.problem(client, 'gr_group')), /pg_read_server_files/, 'the unsafe answer is kept too');
    guard.remember('gr_group', null);
    assert.equal(await guard.problem(client, 'gr_group'), null, 'remember() replaces it at once');
  } finally {
    await b.pg.query('REVOKE pg_read_server_files FROM gr_group', [], 'postgres').catch(() => undefined);
    await client.end();
  }
});

test('with the default interval, storing a policy refreshes the answer issuance uses', async () => {
  const d = await startTestBroker({ pg: b.pg, issuer: b.issuer });
  try {
    assert.equal(d.config.grantRecheckSeconds, 60);
    assert.equal((await d.issue(await d.token({ sub: 'gr:cached' }), { policy: 'gr' })).status, 201);
    await b.pg.query('GRANT pg_read_server_files TO gr_group', [], 'postgres');
    // Within the interval the last answer stands...
    assert.equal((await d.issue(await d.token({ sub: 'gr:cached2' }), { policy: 'gr' })).status, 201);
    // ...until an admin stores a policy on that group, which the broker refuses and now knows.
    await assert.rejects(d.putPolicy('gr2', { claims: { sub: 'gr2:*' }, grant_role: 'gr_group' }), /400/);
    const refused = await d.issue(await d.token({ sub: 'gr:cached3' }), { policy: 'gr' });
    assert.equal(refused.status, 403);
    assert.equal(refused.body.code, 'GRANT_ROLE_UNSAFE');
  } finally {
    await b.pg.query('REVOKE pg_read_server_files FROM gr_group', [], 'postgres');
    await d.close();
  }
});

test('a group dropped within the interval: issuance and renewal answer 403 GRANT_ROLE_UNSAFE, not 500, and the guard forgets its answer', async () => {
  // The default interval: the guard would trust "safe" for 60 s after the policies were stored.
  const d = await startTestBroker({ pg: b.pg, issuer: b.issuer });
  try {
    await addGroupRole(b.pg, 'gr_drop_issue');
    await addGroupRole(b.pg, 'gr_drop_renew');
    await d.putPolicy('grdi', { claims: { sub: 'grdi:*' }, grant_role: 'gr_drop_issue' });
    await d.putPolicy('grdr', { claims: { sub: 'grdr:*' }, grant_role: 'gr_drop_renew' });
    const issued = await d.issue(await d.token({ sub: 'grdi:before' }), { policy: 'grdi' });
    assert.equal(issued.status, 201, JSON.stringify(issued.body));
    const owner = await d.token({ sub: 'grdr:owner' });
    const lease = (await d.issue(owner, { policy: 'grdr', ttl: 120 })).body;
    const renew = () => api(d, 'POST', `/leases/${lease.lease_id}/renew`, owner, { ttl: 600 });
    assert.equal((await renew()).status, 200, 'renewable while the group exists');
    const [{ expires_at: before }] = await b.pg.query('SELECT expires_at FROM broker.leases WHERE id = $1', [lease.lease_id]);

    await b.pg.query('DROP ROLE gr_drop_issue', [], 'postgres');
    await b.pg.query('DROP ROLE gr_drop_renew', [], 'postgres');

    const refused = await d.issue(await d.token({ sub: 'grdi:after' }), { policy: 'grdi' });
    assert.equal(refused.status, 403, JSON.stringify(refused.body));
    assert.equal(refused.body.code, 'GRANT_ROLE_UNSAFE');
    assert.match(refused.body.detail, /Policy grdi .*grant_role gr_drop_issue does not exist/);
    assert.deepEqual(await b.pg.query(`SELECT 1 FROM broker.leases WHERE subject = 'grdi:after'`), []);
    const [audit] = await b.pg.query(`SELECT type, policy, reason FROM broker.audit_events WHERE subject = 'grdi:after'`);
    assert.deepEqual(audit, { type: 'credential.denied', policy: 'grdi', reason: 'grant_role_unsafe' });
    // The answer was read again and is now remembered: the guard gives it without a query.
    // (The broker's real pool, with its queries counted.)
    const counted = { queries: 0, query: ((...args: unknown[]) => {
      counted.queries++;
      return (d.app.db.query as (...a: unknown[]) => unknown)(...args);
    }) as typeof d.app.db.query };
    assert.match(String(await d.app.grantRoles.problem(counted, 'gr_drop_issue')), /does not exist/);
    assert.equal(counted.queries, 0, 'the guard queried instead of remembering');

    const notRenewed = await renew();
    assert.equal(notRenewed.status, 403, JSON.stringify(notRenewed.body));
    assert.equal(notRenewed.body.code, 'GRANT_ROLE_UNSAFE');
    assert.match(notRenewed.body.detail, /grant_role gr_drop_renew does not exist/);
    const [{ expires_at: after }] = await b.pg.query('SELECT expires_at FROM broker.leases WHERE id = $1', [lease.lease_id]);
    assert.equal((after as Date).toISOString(), (before as Date).toISOString(), 'the expiry did not move');
    assert.match(String(await d.app.grantRoles.problem(counted, 'gr_drop_renew')), /does not exist/);
    assert.equal(counted.queries, 0, 'the guard queried instead of remembering');
    // Told to forget, it asks PostgreSQL again, through the same counted pool.
    d.app.grantRoles.forget('gr_drop_renew');
    assert.match(String(await d.app.grantRoles.problem(counted, 'gr_drop_renew')), /does not exist/);
    assert.ok(counted.queries > 0, 'asked again after forget');
  } finally {
    await d.close();
  }
});
