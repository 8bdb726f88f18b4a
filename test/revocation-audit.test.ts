import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { ADMIN_SUB, api, auditTypes, startTestBroker, type TestBroker } from './helpers/broker.js';

// Every revocation request is on record, including one that had nothing to end: an offboarding
// of someone who held no lease is still evidence an auditor asks for.
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('ra', { claims: { sub: 'ra:*' }, max_active_leases: 10 });
});
after(async () => b?.close());

interface Row { type: string; issuer: string; subject: string; lease_id: string | null; policy: string | null; reason: string | null; request_id: string | null; detail: any }

async function requested(since: number): Promise<Row[]> {
  return b.pg.query<Row>(
    `SELECT type, issuer, subject, lease_id, policy, reason, request_id, detail FROM broker.audit_events
      WHERE type = 'revocation.requested' AND id > $1 ORDER BY id`, [since]);
}
async function lastEventId(): Promise<number> {
  const [row] = await b.pg.query<{ id: string | null }>('SELECT max(id)::text AS id FROM broker.audit_events');
  return Number(row.id ?? 0);
}
async function issue(sub: string): Promise<{ lease_id: string; username: string }> {
  const res = await b.issue(await b.token({ sub }), { policy: 'ra', ttl: 300 });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body;
}

describe('POST /leases/revoke records the request', () => {
  test('with what it matched, linked to each lease.revoked by request_id', async () => {
    const leases = [await issue('ra:alice'), await issue('ra:alice')];
    const since = await lastEventId();
    const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'ra:alice', reason: 'left the company' });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.revoked, 2);
    const [event, ...more] = await requested(since);
    assert.equal(more.length, 0, 'one event per request');
    assert.deepEqual(
      { ...event, request_id: undefined },
      { type: 'revocation.requested', issuer: b.issuer.issuer, subject: ADMIN_SUB, lease_id: null, policy: null,
        reason: 'left the company', request_id: undefined, detail: { filter: { subject: 'ra:alice' }, matched: 2 } },
    );
    const revoked = await b.pg.query<{ lease_id: string }>(
      `SELECT lease_id FROM broker.audit_events WHERE type = 'lease.revoked' AND request_id = $1 ORDER BY lease_id`, [event.request_id]);
    assert.deepEqual(revoked.map((r) => r.lease_id), leases.map((l) => l.lease_id).sort());
  });

  test('and when it matched nothing, with matched 0 and the filter it named', async () => {
    const since = await lastEventId();
    const res = await api(b, 'POST', '/leases/revoke', await b.adminToken(), { subject: 'ra:nobody', policy: 'ra' });
    assert.deepEqual([res.status, res.body], [200, { revoked: 0, lease_ids: [] }]);
    const events = await requested(since);
    assert.deepEqual(events.map((e) => [e.subject, e.policy, e.reason, e.detail]),
      [[ADMIN_SUB, 'ra', 'bulk revocation', { filter: { subject: 'ra:nobody', policy: 'ra' }, matched: 0 }]]);
    assert.equal(await lastEventId(), Number((await b.pg.query<{ id: string }>(
      `SELECT max(id)::text AS id FROM broker.audit_events WHERE type = 'revocation.requested'`))[0].id), 'and nothing else');
  });

  test('a refused bulk revoke (not an admin) changes nothing and is recorded as refused, not requested', async () => {
    const lease = await issue('ra:carol');
    const since = await lastEventId();
    const res = await api(b, 'POST', '/leases/revoke', await b.token({ sub: 'ra:carol' }), { subject: 'ra:carol' });
    assert.equal(res.status, 403);
    assert.deepEqual(await requested(since), []);
    assert.deepEqual(await auditTypes(b.pg, lease.lease_id), ['credential.issued']);
  });
});

describe('DELETE /leases/{id} records the request', () => {
  test('that ends the lease: its lease.revoked only; of an ended lease: revocation.requested with matched 0', async () => {
    const lease = await issue('ra:dave');
    const owner = await b.token({ sub: 'ra:dave' });
    const since = await lastEventId();
    assert.equal((await api(b, 'DELETE', `/leases/${lease.lease_id}?reason=rotated`, owner)).status, 200);
    assert.deepEqual(await requested(since), []);
    assert.deepEqual(await auditTypes(b.pg, lease.lease_id), ['credential.issued', 'lease.revoked']);

    const again = await api(b, 'DELETE', `/leases/${lease.lease_id}?reason=once%20more`, owner);
    assert.deepEqual([again.status, again.body.state], [200, 'revoked']);
    const [event, ...more] = await requested(since);
    assert.equal(more.length, 0);
    assert.deepEqual([event.subject, event.lease_id, event.reason, event.detail],
      ['ra:dave', lease.lease_id, 'once more', { filter: { id: lease.lease_id }, matched: 0 }]);
    assert.equal(again.body.end_reason, 'rotated', 'the lease keeps the reason it ended with');
  });
});
