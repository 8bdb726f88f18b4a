import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { api, deniedCount, startTestBroker, type TestBroker } from './helpers/broker.js';

// PUT /policies refuses a database that does not exist; this covers one dropped afterwards,
// which would otherwise get 201s for logins that can connect nowhere.
let b: TestBroker;
const DB = 'pd_target';

before(async () => {
  b = await startTestBroker({ env: { BROKER_GRANT_RECHECK_INTERVAL: '0' } });
  await b.pg.query(`CREATE DATABASE ${DB}`, [], 'postgres');
  await b.putPolicy('pd', { claims: { sub: 'pd:*' }, database: DB });
});
after(async () => {
  await b?.pg.query(`DROP DATABASE IF EXISTS ${DB}`, [], 'postgres');
  await b?.close();
});

test('a policy whose database was dropped issues nothing, says why, and issues again once it is back', async () => {
  const ok = await b.issue(await b.token({ sub: 'pd:before' }));
  assert.equal(ok.status, 201, JSON.stringify(ok.body));
  assert.equal(ok.body.database, DB);

  await b.pg.query(`DROP DATABASE ${DB}`, [], 'postgres');
  const refused = await b.issue(await b.token({ sub: 'pd:during' }));
  assert.equal(refused.status, 403, JSON.stringify(refused.body));
  assert.equal(refused.body.code, 'POLICY_DATABASE_MISSING');
  assert.match(refused.body.detail, /^Policy pd cannot issue credentials until an admin fixes it: database pd_target does not exist/);
  // Nothing was created for it; the refusal is audited, counted and logged.
  assert.deepEqual(await b.pg.query(`SELECT 1 FROM broker.leases WHERE subject = 'pd:during'`), []);
  assert.deepEqual(await b.pg.query(`SELECT 1 FROM pg_roles WHERE rolname LIKE 'lease_pd_during%'`), []);
  const [audit] = await b.pg.query(`SELECT type, policy, reason FROM broker.audit_events WHERE subject = 'pd:during'`);
  assert.deepEqual(audit, { type: 'credential.denied', policy: 'pd', reason: 'database_missing' });
  assert.equal(await deniedCount(b, 'pd', 'database_missing'), 1);
  assert.ok(b.logs.some((l) => l.includes('issuance refused') && l.includes(DB)), 'a warning names the database');

  // A database that exists but takes no connections is no better.
  await b.pg.query(`CREATE DATABASE ${DB} ALLOW_CONNECTIONS false`, [], 'postgres');
  const closed = await b.issue(await b.token({ sub: 'pd:closed' }));
  assert.equal(closed.status, 403, JSON.stringify(closed.body));
  assert.equal(closed.body.code, 'POLICY_DATABASE_MISSING');

  // POST /policies/evaluate says the same, on the policy that admits the token.
  const explained = await api(b, 'POST', '/policies/evaluate', await b.token({ sub: 'pd:asks' }));
  assert.equal(explained.status, 200, JSON.stringify(explained.body));
  const pd = explained.body.policies.find((p: { name: string }) => p.name === 'pd');
  assert.equal(pd.admitted, true);
  assert.match(pd.cannot_issue, /^database pd_target does not exist or does not accept connections$/);

  await b.pg.query(`ALTER DATABASE ${DB} ALLOW_CONNECTIONS true`, [], 'postgres');
  const fine = await api(b, 'POST', '/policies/evaluate', await b.token({ sub: 'pd:asks' }));
  assert.equal(fine.body.policies.find((p: { name: string }) => p.name === 'pd').cannot_issue, undefined);
  const again = await b.issue(await b.token({ sub: 'pd:after' }));
  assert.equal(again.status, 201, JSON.stringify(again.body));
});

test('with the default interval, storing the policy again once its database is back issues at once', async () => {
  const d = await startTestBroker({ pg: b.pg, issuer: b.issuer });
  try {
    assert.equal(d.config.grantRecheckSeconds, 60);
    await b.pg.query('CREATE DATABASE pd_back', [], 'postgres');
    await d.putPolicy('pdb', { claims: { sub: 'pdb:*' }, database: 'pd_back' });
    assert.equal((await d.issue(await d.token({ sub: 'pdb:first' }))).status, 201);
    await b.pg.query('DROP DATABASE pd_back', [], 'postgres');
    // Within the interval the answer issuance remembers ("it exists") stands...
    assert.equal((await d.issue(await d.token({ sub: 'pdb:stale' }))).status, 201);
    // ...until an admin stores a policy on it: refused now, and issuance knows at once.
    await assert.rejects(d.putPolicy('pdb', { claims: { sub: 'pdb:*' }, database: 'pd_back' }), /400/);
    const refused = await d.issue(await d.token({ sub: 'pdb:gone' }));
    assert.equal(refused.body.code, 'POLICY_DATABASE_MISSING', JSON.stringify(refused.body));
    await b.pg.query('CREATE DATABASE pd_back', [], 'postgres');
    await d.putPolicy('pdb', { claims: { sub: 'pdb:*' }, database: 'pd_back' });
    const back = await d.issue(await d.token({ sub: 'pdb:back' }));
    assert.equal(back.status, 201, JSON.stringify(back.body));
  } finally {
    await d.close();
  }
});
