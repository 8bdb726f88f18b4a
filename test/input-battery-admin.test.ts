import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { assertProblem, batterySender } from './helpers/battery.js';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

// Hostile query strings, path parameters and admin bodies, each with its well-formed
// counterpart. None may be a 500, and no answer may leak PostgreSQL's own error text: send()
// checks both on every response. Request bodies and claims: input-battery.test.ts.

let b: TestBroker;
const send = batterySender(() => b);

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '1000000', BROKER_RATE_LIMIT_IDENTITY: '1000000' } });
  await b.putPolicy('battery', { claims: { sub: 'repo:octo-org/*' }, default_ttl: 300, max_ttl: 600, max_active_leases: 1000 });
  // A second policy, so that a page of one has a next one.
  await b.putPolicy('battery-other', { claims: { sub: 'repo:other-org/*' } });
});

after(async () => b?.close());

describe('query strings, path parameters and admin bodies', () => {
  test('bad lease and audit queries → 400', async () => {
    const admin = await b.adminToken();
    const cases: Array<[string, string, string?]> = [
      ['lease id not a uuid', '/leases/not-a-uuid'],
      ['lease id with SQL', `/leases/${encodeURIComponent("1' OR '1'='1")}`],
      ['limit zero', '/leases?limit=0'],
      ['limit huge', '/leases?limit=100000000'],
      ['limit text', '/leases?limit=ten'],
      ['since not a timestamp', '/leases?since=yesterday'],
      ['until out of range', '/leases?until=99999-01-01T00:00:00Z'],
      ['state unknown', '/leases?state=zombie'],
      ['cursor garbage', '/leases?cursor=%27%3B--'],
      ['cursor base64 of garbage', `/leases?cursor=${Buffer.from('["x","y"]').toString('base64url')}`],
      ['unknown query field', '/leases?sql=1'],
      ['audit cursor garbage', '/audit?cursor=zzz', admin],
      ['audit since garbage', '/audit?since=now', admin],
      ['policies limit negative', '/policies?limit=-1', admin],
    ];
    for (const [label, url, token] of cases) {
      assertProblem(await send(label, { method: 'GET', url, token }), 400, label);
    }
    // One sentence naming the allowed values, not one "must be equal to constant" per value.
    const state = await send('state in capitals', { method: 'GET', url: '/leases?state=ACTIVE' });
    assertProblem(state, 400, 'state in capitals');
    assert.equal(state.json().detail, 'querystring/state must be equal to one of the allowed values (pending, active, revoking, expired, revoked, revoke_failed)');
  });

  test('the well-formed counterparts of those queries → 200', async () => {
    const admin = await b.adminToken();
    const token = await b.token();
    const get = async (label: string, url: string, tok = token) => {
      const res = await send(label, { method: 'GET', url, token: tok });
      assert.equal(res.status, 200, `${label}: ${res.status} ${res.body}`);
      return res.json();
    };
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const issued = await send('lease to list', { payload: { policy: 'battery' } });
      assert.equal(issued.status, 201, issued.body);
      ids.push(issued.json().lease_id);
    }
    assert.equal((await get('lease id a uuid', `/leases/${ids[0]}`)).id, ids[0]);
    // Newest first: the second lease heads the page.
    const first = await get('limit 1', '/leases?limit=1');
    assert.deepEqual(first.items.map((l: { id: string }) => l.id), [ids[1]]);
    assert.equal(typeof first.next_cursor, 'string');
    const next = await get('cursor from a page', `/leases?limit=1&cursor=${encodeURIComponent(first.next_cursor)}`);
    assert.deepEqual(next.items.map((l: { id: string }) => l.id), [ids[0]]);
    assert.ok((await get('limit at its maximum', '/leases?limit=1000')).items.length >= 2);
    const filtered = await get('since, until and state', '/leases?since=2000-01-01T00:00:00Z&until=9999-01-01T00:00:00Z&state=active');
    assert.ok(ids.every((id) => filtered.items.some((l: { id: string }) => l.id === id)), 'both leases are listed');
    assert.deepEqual((await get('since in the future', '/leases?since=9999-01-01T00:00:00Z')).items, []);

    const audit = await get('audit since the epoch', `/audit?limit=1&since=${new Date(0).toISOString()}`, admin);
    assert.equal(audit.items.length, 1);
    assert.equal(typeof audit.next_cursor, 'string');
    const older = await get('audit cursor from a page', `/audit?limit=1&cursor=${encodeURIComponent(audit.next_cursor)}`, admin);
    assert.equal(older.items.length, 1);
    assert.ok(BigInt(older.items[0].id) < BigInt(audit.items[0].id), 'the next page is older');
    assert.deepEqual((await get('audit since in the future', '/audit?since=9999-01-01T00:00:00Z', admin)).items, []);

    const policies = await get('policies limit 1', '/policies?limit=1', admin);
    assert.equal(policies.items.length, 1);
    assert.equal(typeof policies.next_cursor, 'string', 'more than one policy exists');
  });

  test('NUL bytes in lease and audit filters are a clean 400; odd text that PostgreSQL can hold is a 200', async () => {
    const admin = await b.adminToken();
    const cases: Array<[string, number]> = [
      ['/leases?subject=%00', 400],
      ['/leases?username=a%00b', 400],
      ['/leases?policy=%00', 400],
      ['/audit?subject=%00', 400],
      ['/leases?issuer=%27%3B%20DROP', 200],
      ['/audit?type=%F0%9F%94%A5', 400],
      ['/audit?type=credential.issued', 200],
      // The same filters with storable values.
      ['/leases?subject=a', 200],
      ['/leases?username=ab', 200],
      ['/leases?policy=battery', 200],
      ['/audit?subject=a', 200],
    ];
    for (const [url, status] of cases) {
      const res = await send(`filter ${url}`, { method: 'GET', url, token: admin });
      if (status === 200) assert.equal(res.status, 200, `${url}: ${res.status} ${res.body}`);
      else assertProblem(res, status, url);
    }
    const named = await send('filter NUL named', { method: 'GET', url: '/leases?username=a%00b', token: admin });
    assert.equal(named.json().detail, 'querystring/username holds a NUL character, which PostgreSQL cannot store');
    // An audit type the broker never writes is a misspelling, answered with the ones it does.
    const misspelt = await send('audit type misspelt', { method: 'GET', url: '/audit?type=credential.issue', token: admin });
    assertProblem(misspelt, 400, 'audit type misspelt');
    assert.match(misspelt.json().detail, /^querystring\/type must be equal to one of the allowed values \(credential\.issued, credential\.denied, .*request\.failed\)$/);
    // The filters apply: a storable subject finds exactly that subject's leases.
    const issued = await send('lease to filter', { payload: { policy: 'battery' } });
    assert.equal(issued.status, 201, issued.body);
    const sub = 'repo:octo-org/octo-repo:ref:refs/heads/main';
    const found = await send('filter by subject', { method: 'GET', url: `/leases?subject=${encodeURIComponent(sub)}&limit=1000`, token: admin });
    assert.equal(found.status, 200, found.body);
    const items: Array<{ id: string; subject: string }> = found.json().items;
    assert.ok(items.some((l) => l.id === issued.json().lease_id));
    assert.ok(items.every((l) => l.subject === sub));
  });

  test('unknown lease id → 404; bad renew bodies → 400; a good one, or none, → 200', async () => {
    assertProblem(await send('unknown lease', { method: 'GET', url: `/leases/${randomUUID()}` }), 404, 'unknown lease');
    const issued = await send('lease to renew', { payload: { policy: 'battery' } });
    assert.equal(issued.status, 201);
    const id = issued.json().lease_id;
    const token = await b.token();
    for (const payload of [{ ttl: -5 }, { ttl: 0 }, { ttl: '60' }, { extra: 1 }]) {
      assertProblem(await send(`renew ${JSON.stringify(payload)}`, { url: `/leases/${id}/renew`, token, payload }), 400, JSON.stringify(payload));
    }
    const unchanged = await send('lease after bad renews', { method: 'GET', url: `/leases/${id}`, token });
    assert.equal(unchanged.json().expires_at, issued.json().expires_at, 'the refused renewals changed nothing');

    // ttl 60, then no body at all (the policy default_ttl, 300): each moves expiry to now + ttl.
    for (const [label, payload, ttl] of [['renew {"ttl":60}', { ttl: 60 }, 60], ['renew without a body', undefined, 300]] as const) {
      const before = Date.now();
      const res = await send(label, { url: `/leases/${id}/renew`, token, payload });
      const after = Date.now();
      assert.equal(res.status, 200, `${label}: ${res.body}`);
      const lease = res.json();
      assert.equal(lease.id, id);
      assert.equal(lease.state, 'active');
      assert.equal(lease.capped, false);
      const expires = Date.parse(lease.expires_at);
      // Rounded up to a whole second after now + ttl.
      assert.ok(expires >= before + ttl * 1000 && expires <= after + ttl * 1000 + 1000, `${label}: ${lease.expires_at}`);
      const [role] = await b.pg.query('SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1', [lease.username]);
      assert.equal(new Date(role.rolvaliduntil).toISOString(), lease.expires_at, `${label}: VALID UNTIL follows`);
    }
  });

  test('hostile policy definitions → 400 with a reason', async () => {
    const admin = await b.adminToken();
    const base = { issuer: b.issuer.issuer, claims: { sub: 'x' }, grant_role: 'app_readers', database: b.pg.database };
    const put = (label: string, name: string, payload: unknown) => send(label, { method: 'PUT', url: `/policies/${name}`, token: admin, payload });
    // The base definition itself is accepted, so each refusal below is down to what the case changed.
    const good = await put('base policy', 'battery-base', base);
    assert.equal(good.status, 201, good.body);
    assert.deepEqual(good.json().claims, base.claims);

    // PostgreSQL refuses a NUL in a bind parameter; the broker refuses it first, naming where it is.
    const NUL_REFUSED = (at: string) => new RegExp(`^${at} holds a NUL character, which PostgreSQL cannot store$`);
    const cases: Array<[string, string, Record<string, unknown>, 'INVALID_POLICY' | 'BAD_REQUEST', RegExp]> = [
      ['name with a space', 'bad%20name', base, 'BAD_REQUEST', /^params\/name must be a policy name of 1 to 63 characters/],
      ['name too long', 'n'.repeat(100), base, 'BAD_REQUEST', /^params\/name must be a policy name of 1 to 63 characters/],
      ['name with a quote', "a'b", base, 'BAD_REQUEST', /^params\/name must be a policy name of 1 to 63 characters/],
      ['grant_role missing', 'p1', { ...base, grant_role: 'no_such_role' }, 'INVALID_POLICY', /^grant_role no_such_role does not exist$/],
      ['grant_role with SQL', 'p2', { ...base, grant_role: "x\"; DROP ROLE broker; --" }, 'INVALID_POLICY', /^grant_role x"; DROP ROLE broker; -- does not exist$/],
      ['grant_role with NUL', 'p3', { ...base, grant_role: 'app\u0000readers' }, 'BAD_REQUEST', NUL_REFUSED('body/grant_role')],
      ['grant_role superuser', 'p4', { ...base, grant_role: 'postgres' }, 'INVALID_POLICY', /^grant_role postgres has SUPERUSER$/],
      ['grant_role predefined', 'p5', { ...base, grant_role: 'pg_read_server_files' }, 'INVALID_POLICY', /^grant_role pg_read_server_files is a predefined PostgreSQL role$/],
      ['grant_role the marker role', 'p6', { ...base, grant_role: b.config.managedRole }, 'INVALID_POLICY', /^grant_role cannot be the broker marker role$/],
      ['database missing', 'p7', { ...base, database: 'no_such_db' }, 'INVALID_POLICY', /^database no_such_db does not exist/],
      ['database with NUL', 'p8', { ...base, database: 'bro\u0000ker' }, 'BAD_REQUEST', NUL_REFUSED('body/database')],
      ['database with SQL', 'p9', { ...base, database: "x'; DROP DATABASE broker; --" }, 'INVALID_POLICY', /^database x'; DROP DATABASE broker; -- does not exist/],
      ['no claims', 'p10', { ...base, claims: {} }, 'INVALID_POLICY', /^a policy must bind at least one claim$/],
      ['claim pattern not a string', 'p11', { ...base, claims: { sub: 5 } }, 'BAD_REQUEST', /^body\/claims\/sub must be a glob or a list of 1 to 100 globs, each a string: a claim matches by its JSON text, so write true or 42 as "true" or "42"$/],
      ['claim pattern a boolean', 'p11b', { ...base, claims: { ref_protected: true } }, 'BAD_REQUEST', /^body\/claims\/ref_protected must be a glob or a list of 1 to 100 globs, each a string: .* write true or 42 as "true"/],
      // A value of a branch's type keeps that branch's own message.
      ['claim pattern too long', 'p11c', { ...base, claims: { sub: 'x'.repeat(1025) } }, 'BAD_REQUEST', /^body\/claims\/sub must NOT have more than 1024 characters$/],
      ['claim pattern list holding a boolean', 'p11d', { ...base, claims: { sub: ['x', true] } }, 'BAD_REQUEST', /^body\/claims\/sub\/1 must be string$/],
      ['claim pattern list empty', 'p12', { ...base, claims: { sub: [] } }, 'BAD_REQUEST', /^body\/claims\/sub must NOT have fewer than 1 items$/],
      ['bad JSON pointer', 'p13', { ...base, claims: { '/a~2b': 'x' } }, 'INVALID_POLICY', /^claim "\/a~2b" is not a valid JSON pointer/],
      ['unlisted issuer', 'p14', { ...base, issuer: 'https://evil.example' }, 'INVALID_POLICY', /^issuer https:\/\/evil\.example is not one of BROKER_ISSUERS$/],
      ['default_ttl over max_ttl', 'p15', { ...base, default_ttl: 100, max_ttl: 50 }, 'INVALID_POLICY', /^default_ttl \(100\) must not exceed max_ttl \(50\)$/],
      ['ttl negative', 'p16', { ...base, max_ttl: -1 }, 'BAD_REQUEST', /^body\/max_ttl must be >= 1$/],
      // Ajv's additionalProperties message does not name the property.
      ['unknown field', 'p17', { ...base, superuser: true }, 'BAD_REQUEST', /^body must NOT have additional properties: "superuser" is not one of its fields$/],
      ['claims with NUL pattern', 'p18', { ...base, claims: { sub: 'a\u0000b' } }, 'BAD_REQUEST', NUL_REFUSED('body/claims/sub')],
      ['claim name with NUL', 'p18b', { ...base, claims: { sub: 'x', 'a\u0000\nb': 'y' } }, 'BAD_REQUEST', /^body\/claims has a field name holding a NUL character, which PostgreSQL cannot store$/],
      ['description with NUL', 'p19', { ...base, description: 'a\u0000b' }, 'BAD_REQUEST', NUL_REFUSED('body/description')],
      ['connection_limit 0', 'p20', { ...base, connection_limit: 0 }, 'INVALID_POLICY', /^connection_limit 0 would issue credentials that can never log in/],
      // 40 characters pass the schema's maxLength of 63, but PostgreSQL counts 80 bytes and would cut them.
      ['grant_role over 63 bytes', 'p21', { ...base, grant_role: '\u00e9'.repeat(40) }, 'INVALID_POLICY', /^grant_role is 80 bytes in UTF-8; PostgreSQL names hold at most 63$/],
      ['claim name over 256 characters', 'p22', { ...base, claims: { sub: 'x', ['c'.repeat(257)]: 'y' } }, 'INVALID_POLICY', /^claim name "c{40}"… is longer than 256 characters$/],
    ];
    for (const [label, name, payload, code, detail] of cases) {
      const res = await put(label, name, payload);
      assertProblem(res, 400, label);
      assert.equal(res.json().code, code, `${label}: ${res.body}`);
      assert.match(res.json().detail, detail, label);
    }
    for (let i = 1; i <= 22; i++) {
      assertProblem(await send(`p${i} not stored`, { method: 'GET', url: `/policies/p${i}`, token: admin }), 404, `p${i} not stored`);
    }
    const deleted = await send('delete base policy', { method: 'DELETE', url: '/policies/battery-base', token: admin });
    assert.equal(deleted.status, 204, deleted.body);
  });
});
