import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { ROLE_NAME_PATTERN } from '../src/postgres/role-name.js';
import { connectAs, startTestBroker, type TestBroker } from './helpers/broker.js';

// Hostile request bodies, query strings and claims. Each must get a clean 4xx problem (or, for
// claims, a safe role); none may be a 500, and no answer may leak PostgreSQL's own error text.

let b: TestBroker;
const seen: Array<{ label: string; status: number; body: string }> = [];

// Phrases PostgreSQL puts in its error messages; our own texts never use them.
const PG_ERROR_TEXT = [
  /syntax error/i, /violates/i, /\brelation\b/i, /duplicate key/i, /invalid byte sequence/i, /unsupported Unicode escape/i,
  /invalid input syntax/i, /null value in column/i, /(role|relation|database|column|schema|function) "[^"]*" does not exist/i,
  /\bSQLSTATE\b/i, /current transaction is aborted/i, /out of range for type/i, /value too long for type/i, /permission denied/i,
];

interface Sent {
  method?: 'GET' | 'POST' | 'PUT' | 'DELETE';
  url?: string;
  token?: string | null;
  payload?: unknown;
  raw?: string;
  contentType?: string;
}

async function send(label: string, req: Sent): Promise<{ status: number; body: string; json: () => any; headers: Record<string, unknown> }> {
  const headers: Record<string, string> = {};
  if (req.token !== null) headers.authorization = `Bearer ${req.token ?? (await b.token())}`;
  if (req.raw !== undefined || req.contentType) headers['content-type'] = req.contentType ?? 'application/json';
  const res = await b.app.inject({
    method: req.method ?? 'POST',
    url: req.url ?? '/credentials',
    headers,
    ...(req.raw !== undefined ? { payload: req.raw } : req.payload !== undefined ? { payload: req.payload as object } : {}),
  });
  seen.push({ label, status: res.statusCode, body: res.body });
  return { status: res.statusCode, body: res.body, json: () => res.json(), headers: res.headers };
}

function assertProblem(res: { status: number; body: string; headers: Record<string, unknown> }, status: number, label: string): void {
  assert.equal(res.status, status, `${label}: ${res.status} ${res.body}`);
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/, label);
  const body = JSON.parse(res.body);
  assert.equal(body.status, status, label);
  assert.equal(typeof body.code, 'string', label);
  assert.ok(body.detail.length > 0, label);
}

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '1000000', BROKER_RATE_LIMIT_IDENTITY: '1000000' } });
  await b.putPolicy('battery', { claims: { sub: 'repo:octo-org/*' }, default_ttl: 300, max_ttl: 600, max_active_leases: 1000 });
  // Admits whatever subject a token carries, to push hostile subjects all the way to CREATE ROLE.
  await b.putPolicy('any-subject', { claims: { battery: 'yes' }, default_ttl: 60, max_ttl: 600, max_active_leases: 1000 });
  // Copies a hostile, free-form claim into the lease record.
  await b.putPolicy('free-text', { claims: { battery: 'free', note: '*' }, default_ttl: 60, max_ttl: 600, max_active_leases: 1000 });
});

after(async () => b?.close());

describe('POST /credentials bodies', () => {
  const bad: Array<[string, Sent]> = [
    ['unknown field', { payload: { unknown: 1 } }],
    ['unknown field next to a valid one', { payload: { policy: 'battery', admin: true } }],
    ['ttl as a string', { payload: { ttl: '60' } }],
    ['ttl fractional', { payload: { ttl: 60.5 } }],
    ['ttl boolean', { payload: { ttl: true } }],
    ['ttl null', { payload: { ttl: null } }],
    ['ttl array', { payload: { ttl: [60] } }],
    ['ttl object', { payload: { ttl: { seconds: 60 } } }],
    ['ttl negative', { payload: { ttl: -1 } }],
    ['ttl zero', { payload: { ttl: 0 } }],
    ['ttl huge', { payload: { ttl: 1e12 } }],
    ['ttl beyond 2^53', { raw: '{"ttl": 123456789012345678901234567890}' }],
    ['ttl overflowing to Infinity', { raw: '{"ttl": 1e400}' }],
    ['ttl over the policy max_ttl', { payload: { policy: 'battery', ttl: 601 } }],
    ['policy a number', { payload: { policy: 123 } }],
    ['policy empty', { payload: { policy: '' } }],
    ['policy null', { payload: { policy: null } }],
    ['policy too long', { payload: { policy: 'p'.repeat(64) } }],
    ['body an array', { raw: '[]' }],
    ['body a string', { raw: '"battery"' }],
    ['body a number', { raw: '42' }],
    ['body JSON null', { raw: 'null' }],
    ['invalid JSON', { raw: '{"policy": "battery",' }],
    ['empty body declared as JSON', { raw: '' }],
    ['__proto__ key', { raw: '{"__proto__": {"admin": true}}' }],
    ['constructor.prototype key', { raw: '{"constructor": {"prototype": {"admin": true}}}' }],
  ];

  for (const [label, req] of bad) {
    test(`${label} → 400`, async () => assertProblem(await send(label, req), 400, label));
  }

  test('unknown or hostile policy names → 403, the same answer as a policy that refuses', async () => {
    for (const policy of ['does-not-exist', "x'; DROP TABLE broker.policies; --", 'any-subject', 'nul\u0000name', '🔥'.repeat(10)]) {
      const res = await send(`policy ${JSON.stringify(policy)}`, { payload: { policy } });
      assertProblem(res, 403, policy);
      assert.equal(res.json().code, 'NO_POLICY');
    }
  });

  test('a body that is not JSON → 400 or 415; a body over 64 KB → 413', async () => {
    for (const contentType of ['text/plain', 'application/x-www-form-urlencoded', 'application/xml']) {
      const res = await send(`${contentType} body`, { raw: 'ttl=60', contentType });
      assertProblem(res, res.status === 415 ? 415 : 400, contentType);
    }
    const big = JSON.stringify({ policy: 'battery', pad: 'x'.repeat(70 * 1024) });
    assertProblem(await send('large body', { raw: big }), 413, 'large body');
  });

  test('a valid body still works after all of that', async () => {
    const res = await send('control', { payload: { policy: 'battery', ttl: 60 } });
    assert.equal(res.status, 201, res.body);
  });
});

describe('hostile claims', () => {
  const subjects: Record<string, string> = {
    quotes: `o'brien"; DROP ROLE broker; --`,
    backslashes: '\\\\server\\share\\\'\\"',
    'dollar quoting': '$$; DROP ROLE broker; $$ $tag$ x $tag$',
    'SQL comment and semicolon': 'a;/* b */ -- c',
    unicode: 'Ärger-日本語-🔥-\u202Egnp.exe-\u0301\u200B',
    'kelvin sign and dotless i': '\u212A\u0131\u0130',
    'only symbols': `!@#$%^&*()[]{}<>?/|\`~'"`,
    'very long (1000 chars)': `repo:${'a'.repeat(995)}`,
    'newline and tab': 'line1\nline2\tcol',
    'percent and format strings': '%s%n%x%d %(name)s {0} ${x}',
  };

  for (const [label, sub] of Object.entries(subjects)) {
    test(`subject with ${label} gets a valid, working role`, async () => {
      const res = await send(`sub ${label}`, { token: await b.token({ sub, battery: 'yes' }), payload: { policy: 'any-subject' } });
      assert.equal(res.status, 201, `${label}: ${res.body}`);
      const cred = res.json();
      assert.match(cred.username, ROLE_NAME_PATTERN);
      assert.ok(Buffer.byteLength(cred.username) <= 63);
      const client = await connectAs(b.pg, cred);
      try {
        const { rows } = await client.query('SELECT current_user AS u');
        assert.equal(rows[0].u, cred.username);
      } finally {
        await client.end();
      }
      const [lease] = await b.pg.query('SELECT subject FROM broker.leases WHERE id = $1', [cred.lease_id]);
      assert.equal(lease.subject, sub, 'the subject is stored verbatim');
      const [comment] = await b.pg.query("SELECT shobj_description(oid, 'pg_authid') AS c FROM pg_roles WHERE rolname = $1", [cred.username]);
      assert.ok(String(comment.c).includes(cred.lease_id));
    });
  }

  test('subjects that cannot be stored safely are a clean 401', async () => {
    for (const [label, sub] of [['NUL byte', 'repo:octo-org/a\u0000b'], ['over 1024 chars', `repo:octo-org/${'b'.repeat(1100)}`]] as const) {
      const res = await send(`sub ${label}`, { token: await b.token({ sub, battery: 'yes' }), payload: { policy: 'any-subject' } });
      assertProblem(res, 401, label);
    }
  });

  test('free-form claims with NUL bytes, quotes, unicode and long text are stored or cleanly refused', async () => {
    const notes = ['nul\u0000inside', `quote ' " \\ ; --`, 'ünïcödé 🔥 \u202E', 'n'.repeat(8000), '\u0000', '\\u0000 literal'];
    for (const note of notes) {
      const res = await send(`note ${JSON.stringify(note).slice(0, 30)}`, { token: await b.token({ sub: `free-${randomUUID()}`, battery: 'free', note }), payload: { policy: 'free-text' } });
      assert.ok(res.status === 201 || (res.status >= 400 && res.status < 500), `${JSON.stringify(note).slice(0, 30)}: ${res.status} ${res.body}`);
      if (res.status === 201) assert.match(res.json().username, ROLE_NAME_PATTERN);
    }
  });

  test('claim names that reach for prototypes are plain data', async () => {
    const token = await b.token({ sub: 'proto', battery: 'yes', __proto__: { admin: true }, constructor: 'x', toString: 'y' } as Record<string, unknown>);
    const res = await send('prototype claims', { token, payload: { policy: 'any-subject' } });
    assert.equal(res.status, 201, res.body);
    const evaluated = await send('prototype claims evaluate', { url: '/policies/evaluate', token });
    assert.equal(evaluated.status, 200);
    const admin = await send('prototype claims admin', { method: 'GET', url: '/audit', token });
    assert.equal(admin.status, 403);
  });
});

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
  });

  test('NUL bytes and odd text in lease and audit filters are a 200 or a clean 400', async () => {
    const admin = await b.adminToken();
    for (const url of ['/leases?subject=%00', '/leases?username=a%00b', '/leases?issuer=%27%3B%20DROP', `/audit?subject=%00`, '/audit?type=%F0%9F%94%A5', '/leases?policy=%00']) {
      const res = await send(`filter ${url}`, { method: 'GET', url, token: admin });
      assert.ok(res.status === 200 || res.status === 400, `${url}: ${res.status} ${res.body}`);
    }
  });

  test('unknown lease id → 404; bad renew bodies → 400', async () => {
    assertProblem(await send('unknown lease', { method: 'GET', url: `/leases/${randomUUID()}` }), 404, 'unknown lease');
    const issued = await send('lease to renew', { payload: { policy: 'battery' } });
    assert.equal(issued.status, 201);
    const id = issued.json().lease_id;
    const token = await b.token();
    for (const payload of [{ ttl: -5 }, { ttl: 0 }, { ttl: '60' }, { extra: 1 }]) {
      assertProblem(await send(`renew ${JSON.stringify(payload)}`, { url: `/leases/${id}/renew`, token, payload }), 400, JSON.stringify(payload));
    }
  });

  test('hostile policy definitions → 400 with a reason', async () => {
    const admin = await b.adminToken();
    const base = { issuer: b.issuer.issuer, claims: { sub: 'x' }, grant_role: 'app_readers', database: b.pg.database };
    const cases: Array<[string, string, Record<string, unknown>]> = [
      ['name with a space', 'bad%20name', base],
      ['name too long', 'n'.repeat(100), base],
      ['name with a quote', "a'b", base],
      ['grant_role missing', 'p1', { ...base, grant_role: 'no_such_role' }],
      ['grant_role with SQL', 'p2', { ...base, grant_role: "x\"; DROP ROLE broker; --" }],
      ['grant_role with NUL', 'p3', { ...base, grant_role: 'app\u0000readers' }],
      ['grant_role superuser', 'p4', { ...base, grant_role: 'postgres' }],
      ['grant_role predefined', 'p5', { ...base, grant_role: 'pg_read_server_files' }],
      ['grant_role the marker role', 'p6', { ...base, grant_role: b.config.managedRole }],
      ['database missing', 'p7', { ...base, database: 'no_such_db' }],
      ['database with NUL', 'p8', { ...base, database: 'bro\u0000ker' }],
      ['database with SQL', 'p9', { ...base, database: "x'; DROP DATABASE broker; --" }],
      ['no claims', 'p10', { ...base, claims: {} }],
      ['claim pattern not a string', 'p11', { ...base, claims: { sub: 5 } }],
      ['claim pattern list empty', 'p12', { ...base, claims: { sub: [] } }],
      ['bad JSON pointer', 'p13', { ...base, claims: { '/a~2b': 'x' } }],
      ['unlisted issuer', 'p14', { ...base, issuer: 'https://evil.example' }],
      ['default_ttl over max_ttl', 'p15', { ...base, default_ttl: 100, max_ttl: 50 }],
      ['ttl negative', 'p16', { ...base, max_ttl: -1 }],
      ['unknown field', 'p17', { ...base, superuser: true }],
      ['claims with NUL pattern', 'p18', { ...base, claims: { sub: 'a\u0000b' } }],
      ['description with NUL', 'p19', { ...base, description: 'a\u0000b' }],
    ];
    for (const [label, name, payload] of cases) {
      const res = await send(label, { method: 'PUT', url: `/policies/${name}`, token: admin, payload });
      assert.ok(res.status === 400 || res.status === 404, `${label}: ${res.status} ${res.body}`);
      assertProblem(res, res.status, label);
    }
  });
});

describe('every answer of this file', () => {
  test('no 5xx and no PostgreSQL error text in any response body', () => {
    assert.ok(seen.length > 80, `${seen.length} responses checked`);
    const fivexx = seen.filter((r) => r.status >= 500).map((r) => `${r.label}: ${r.status} ${r.body}`);
    assert.deepEqual(fivexx, []);
    const leaks = seen.flatMap((r) => PG_ERROR_TEXT.filter((re) => re.test(r.body)).map((re) => `${r.label}: ${re} in ${r.body.slice(0, 300)}`));
    assert.deepEqual(leaks, []);
  });
});


