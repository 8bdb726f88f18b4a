import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { api, startTestBroker, type TestBroker } from './helpers/broker.js';

let b: TestBroker;
let admin: string;

// 3000 leases in three shapes of created_at: 1000 sharing one instant (ties broken by id), 1000
// a few microseconds apart (many per millisecond), 1000 in groups of ten per second.
const SEED = `
  INSERT INTO broker.leases (id, username, policy, grant_role, database, issuer, subject, state, created_at, expires_at, max_expires_at)
  SELECT gen_random_uuid(), 'page_' || i, CASE WHEN i % 2 = 0 THEN 'pol-even' ELSE 'pol-odd' END, 'app_readers', 'broker', $1,
         (ARRAY['page:owner-a', 'page:owner-b', 'page:other'])[i % 3 + 1],
         (ARRAY['active', 'expired', 'revoked', 'revoke_failed'])[i % 4 + 1],
         t, t + interval '1 hour', t + interval '1 hour'
    FROM generate_series(1, 3000) AS i,
         LATERAL (SELECT CASE WHEN i <= 1000 THEN timestamptz '2031-01-01 00:00:00Z'
                              WHEN i <= 2000 THEN timestamptz '2030-06-01 00:00:00Z' + i * 7 * interval '1 microsecond'
                              ELSE timestamptz '2030-01-01 00:00:00Z' + (i / 10) * interval '1 second' END AS t) AS ts`;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  admin = await b.adminToken();
  await b.pg.query(SEED, [b.issuer.issuer]);
});
after(async () => b?.close());

/** Follows next_cursor to the end, calling `between` after every page. */
async function walk(path: string, token: string, query: Record<string, string>, between?: () => Promise<void>): Promise<any[]> {
  const items: any[] = [];
  let cursor: string | null = null;
  for (let pages = 0; ; pages++) {
    assert.ok(pages < 1000, 'the walk terminates');
    const qs = new URLSearchParams({ ...query, ...(cursor ? { cursor } : {}) });
    const res = await api(b, 'GET', `${path}?${qs}`, token);
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.ok(res.body.items.length <= Number(query.limit ?? 100));
    items.push(...res.body.items);
    cursor = res.body.next_cursor;
    if (!cursor) return items;
    await between?.();
  }
}

function assertNoDuplicates(items: any[]): Set<string> {
  const ids = new Set(items.map((i) => String(i.id)));
  assert.equal(ids.size, items.length, 'no row appears twice');
  return ids;
}

const sqlIds = async (where: string, params: unknown[] = []) =>
  new Set((await b.pg.query(`SELECT id::text FROM broker.leases WHERE ${where}`, params)).map((r) => r.id));

describe('GET /leases', () => {
  test('walks thousands of rows with limit=100 and the cursor, without duplicates or gaps, during concurrent inserts', async () => {
    const before = await sqlIds('true');
    assert.ok(before.size >= 3000);
    let inserted = 0;
    // Concurrent leases land anywhere in the order: before, at and after the walk's position.
    const insertSome = async () => {
      await b.pg.query(
        `INSERT INTO broker.leases (id, username, policy, grant_role, database, issuer, subject, state, created_at, expires_at, max_expires_at)
         SELECT gen_random_uuid(), 'late_' || $1 || '_' || k, 'pol-late', 'app_readers', 'broker', 'x', 'page:late', 'active', t, t + interval '1 hour', t + interval '1 hour'
           FROM generate_series(1, 5) AS k,
                LATERAL (SELECT timestamptz '2029-12-31 00:00:00Z' + random() * interval '2 years' + k * interval '0 second' AS t) AS ts`,
        [inserted++]);
    };
    const items = await walk('/leases', admin, { limit: '100' }, insertSome);
    assert.ok(inserted >= 29, `inserts happened during the walk (${inserted})`);
    const seen = assertNoDuplicates(items);
    const missing = [...before].filter((id) => !seen.has(id));
    assert.deepEqual(missing, [], 'every row present when the walk began was returned');
    for (let i = 1; i < items.length; i++) assert.ok(items[i - 1].created_at >= items[i].created_at, 'newest first');
  });

  test('owners see only their own leases; admins see everyone\'s', async () => {
    const ownerA = await b.token({ sub: 'page:owner-a' });
    const mine = await walk('/leases', ownerA, { limit: '1000' });
    assert.deepEqual(assertNoDuplicates(mine), await sqlIds(`subject = 'page:owner-a'`));
    assert.ok(mine.every((l) => l.subject === 'page:owner-a' && l.issuer === b.issuer.issuer));
    const peek = await walk('/leases', ownerA, { subject: 'page:owner-b', limit: '1000' });
    assert.deepEqual(peek, [], 'a subject filter cannot widen what an owner sees');
    const stranger = await walk('/leases', await b.token({ sub: 'page:nobody' }), { limit: '10' });
    assert.deepEqual(stranger, []);
    const all = await walk('/leases', admin, { subject: 'page:owner-b', limit: '1000' });
    assert.deepEqual(assertNoDuplicates(all), await sqlIds(`subject = 'page:owner-b'`));
  });

  test('filters subject, policy, state, username, since and until match the SQL they stand for', async () => {
    const [micro] = await b.pg.query(`SELECT to_char(min(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS lo,
      to_char((min(created_at) + interval '3 ms') AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') AS hi
      FROM broker.leases WHERE created_at BETWEEN '2030-06-01' AND '2030-06-02'`);
    const cases: [Record<string, string>, string, unknown[]][] = [
      [{ subject: 'page:other' }, `subject = 'page:other'`, []],
      [{ policy: 'pol-odd' }, `policy = 'pol-odd'`, []],
      [{ state: 'revoke_failed' }, `state = 'revoke_failed'`, []],
      [{ username: 'page_17' }, `username = 'page_17'`, []],
      [{ since: micro.lo, until: micro.hi }, 'created_at >= $1 AND created_at < $2', [micro.lo, micro.hi]],
      [{ subject: 'page:owner-a', state: 'expired', policy: 'pol-odd' }, `subject = 'page:owner-a' AND state = 'expired' AND policy = 'pol-odd'`, []],
    ];
    for (const [query, where, params] of cases) {
      const expected = await sqlIds(where, params);
      assert.ok(expected.size > 0, `the case ${where} selects something`);
      const got = await walk('/leases', admin, { ...query, limit: '37' });
      assert.deepEqual(assertNoDuplicates(got), expected, JSON.stringify(query));
    }
  });

  test('a bad cursor or limit is a 400, a good one is accepted', async () => {
    const first = await api(b, 'GET', '/leases?limit=2', admin);
    assert.equal(first.status, 200);
    assert.equal(first.body.items.length, 2);
    const next = await api(b, 'GET', `/leases?limit=2&cursor=${first.body.next_cursor}`, admin);
    assert.equal(next.status, 200);
    assert.notEqual(next.body.items[0].id, first.body.items[0].id);
    const forged = (key: unknown[]) => `cursor=${Buffer.from(JSON.stringify(key)).toString('base64url')}`;
    for (const qs of ['cursor=not-a-cursor', forged(['x']), forged(['x', 'y']), forged(['2030-01-01T00:00:00Z', 'nope']), 'limit=0', 'limit=1001', 'state=bogus', 'since=yesterday']) {
      const res = await api(b, 'GET', `/leases?${qs}`, admin);
      assert.equal(res.status, 400, qs);
    }
    assert.equal((await api(b, 'GET', '/leases')).status, 401);
  });
});

describe('GET /audit', () => {
  test('is for admins only, and pages through thousands of events without duplicates or gaps', async () => {
    await b.pg.query(
      `INSERT INTO broker.audit_events (type, issuer, subject, lease_id, policy, reason)
       SELECT 'role.orphan_dropped', $1, 'audit:' || (i % 5), CASE WHEN i % 100 = 0 THEN '11111111-1111-4111-8111-111111111111'::uuid END, 'page-pol', 'seed'
         FROM generate_series(1, 2500) AS i`, [b.issuer.issuer]);
    const forbidden = await api(b, 'GET', '/audit', await b.token({ sub: 'page:owner-a' }));
    assert.equal(forbidden.status, 403);
    assert.equal(forbidden.body.code, 'NOT_ADMIN');
    assert.equal((await api(b, 'GET', '/audit')).status, 401);

    // A type the broker writes (GET /audit refuses any other), told apart from real events by policy.
    const before = new Set((await b.pg.query(`SELECT id::text FROM broker.audit_events WHERE policy = 'page-pol'`)).map((r) => r.id));
    const more = () => b.pg.query(`INSERT INTO broker.audit_events (type, policy, reason) SELECT 'role.orphan_dropped', 'page-pol', 'late' FROM generate_series(1, 3)`).then(() => undefined);
    const items = await walk('/audit', admin, { type: 'role.orphan_dropped', policy: 'page-pol', limit: '100' }, more);
    const seen = assertNoDuplicates(items);
    assert.deepEqual([...before].filter((id) => !seen.has(id)), []);
    assert.ok(items.every((e) => e.type === 'role.orphan_dropped' && e.policy === 'page-pol'));
    for (let i = 1; i < items.length; i++) assert.ok(BigInt(items[i - 1].id) > BigInt(items[i].id), 'newest first');

    for (const cursor of ['garbage', Buffer.from('["x"]').toString('base64url'), Buffer.from('[-1]').toString('base64url')]) {
      const res = await api(b, 'GET', `/audit?cursor=${cursor}`, admin);
      assert.equal(res.status, 400, cursor);
    }
    const byLease = await walk('/audit', admin, { lease_id: '11111111-1111-4111-8111-111111111111', limit: '10' });
    assert.equal(byLease.length, 25);
    const bySubject = await walk('/audit', admin, { subject: 'audit:3', type: 'role.orphan_dropped', limit: '1000' });
    assert.equal(bySubject.length, 500);
    assert.ok(bySubject.every((e) => e.subject === 'audit:3' && e.actor_verified === true && e.at));
  });

  test('one identity\'s record: subject= is what it did, owner= what happened to its leases, whoever acted', async () => {
    await b.putPolicy('aud', { claims: { sub: 'aud:*' } });
    const alice = await b.token({ sub: 'aud:alice' });
    const lease = (await b.issue(alice)).body.lease_id as string;
    // Another caller's refused attempt on alice's lease, and an admin's revocation of it.
    assert.equal((await api(b, 'DELETE', `/leases/${lease}`, await b.token({ sub: 'aud:bob' }))).status, 404);
    assert.equal((await api(b, 'POST', '/leases/revoke', admin, { subject: 'aud:alice', reason: 'left the company' })).body.revoked, 1);

    const events = async (query: Record<string, string>) =>
      (await walk('/audit', admin, query)).map((e) => [e.type, e.subject, e.lease_id, e.detail?.owner_subject ?? null]).reverse();
    assert.deepEqual(await events({ owner: 'aud:alice' }), [
      ['credential.issued', 'aud:alice', lease, null],
      ['request.denied', 'aud:bob', lease, null],
      ['lease.revoked', 'admin:root', lease, 'aud:alice'],
    ]);
    assert.deepEqual(await events({ subject: 'aud:alice' }), [['credential.issued', 'aud:alice', lease, null]]);
    assert.deepEqual(await events({ owner: 'aud:bob' }), [], 'bob owns no lease');
    assert.deepEqual(await events({ owner: 'aud:alice', type: 'lease.revoked' }), [['lease.revoked', 'admin:root', lease, 'aud:alice']]);
    // An owner is (issuer, subject): another issuer's aud:alice is someone else.
    const [{ id: theirs }] = await b.pg.query(
      `INSERT INTO broker.leases (id, username, policy, grant_role, database, issuer, subject, state, expires_at, max_expires_at)
       VALUES (gen_random_uuid(), 'lease_aud_other', 'aud', 'app_readers', 'broker', 'https://other.example', 'aud:alice', 'active', now(), now())
       RETURNING id::text`);
    await b.pg.query(`INSERT INTO broker.audit_events (type, issuer, subject, lease_id) VALUES ('credential.issued', 'https://other.example', 'aud:alice', $1)`, [theirs]);
    assert.equal((await events({ owner: 'aud:alice' })).length, 4);
    assert.deepEqual((await events({ owner: 'aud:alice', owner_issuer: b.issuer.issuer })).map((e) => e[2]), [lease, lease, lease]);
    assert.deepEqual(await events({ owner_issuer: 'https://other.example' }), [['credential.issued', 'aud:alice', theirs, null]]);
  });

  test('the audit table is append-only, for the broker and for a superuser alike', async () => {
    const [row] = await b.pg.query(`INSERT INTO broker.audit_events (type, reason) VALUES ('test.immutable', 'original') RETURNING id`);
    const attempts = [
      `UPDATE broker.audit_events SET reason = 'forged' WHERE id = ${row.id}`,
      `DELETE FROM broker.audit_events WHERE id = ${row.id}`,
      'TRUNCATE broker.audit_events',
    ];
    for (const sql of attempts) {
      await assert.rejects(b.app.db.query(sql), /append-only/, `as broker: ${sql}`);
      await assert.rejects(b.pg.query(sql), /append-only/, `as superuser: ${sql}`);
    }
    const [kept] = await b.pg.query('SELECT reason FROM broker.audit_events WHERE id = $1', [row.id]);
    assert.equal(kept.reason, 'original');
    await b.app.db.query(`INSERT INTO broker.audit_events (type) VALUES ('test.immutable')`);
  });
});
