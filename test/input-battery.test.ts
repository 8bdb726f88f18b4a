import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { ROLE_NAME_PATTERN } from '../src/postgres/role-name.js';
import { assertProblem, batterySender, type Sent } from './helpers/battery.js';
import { connectAs, startTestBroker, type TestBroker } from './helpers/broker.js';

// Hostile request bodies and claims. Each must get a clean 4xx problem (or, for claims, a safe
// role); none may be a 500, and no answer may leak PostgreSQL's own error text. send() checks the
// last two on every response. Query strings, path parameters and admin bodies:
// input-battery-admin.test.ts.

let b: TestBroker;
const send = batterySender(() => b);

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

  test('unknown policy names → 403, the same answer as a policy that refuses; names no policy can have → 400', async () => {
    for (const policy of ['does-not-exist', 'any-subject']) {
      const res = await send(`policy ${JSON.stringify(policy)}`, { payload: { policy } });
      assertProblem(res, 403, policy);
      assert.equal(res.json().code, 'NO_POLICY');
    }
    for (const policy of ["x'; DROP TABLE broker.policies; --", 'nul\u0000name', '🔥'.repeat(10)]) {
      const res = await send(`policy ${JSON.stringify(policy)}`, { payload: { policy } });
      assertProblem(res, 400, policy);
      assert.equal(res.json().code, 'BAD_REQUEST');
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
    for (const [label, sub] of [
      ['NUL byte', 'repo:octo-org/a\u0000b'], ['over 1024 chars', `repo:octo-org/${'b'.repeat(1100)}`],
      // Both would be stored as 'repo:\uFFFD', one identity; a whole pair (an emoji) is fine, above.
      ['lone high surrogate', 'repo:\uD800'], ['lone low surrogate', 'repo:\uDC00'],
    ] as const) {
      const res = await send(`sub ${label}`, { token: await b.token({ sub, battery: 'yes' }), payload: { policy: 'any-subject' } });
      assertProblem(res, 401, label);
    }
  });

  /** Issues under the free-text policy with `note` as a claim; returns the claims the lease row holds. */
  async function storedNote(note: string): Promise<unknown> {
    const label = `note ${JSON.stringify(note).slice(0, 30)}`;
    const res = await send(label, { token: await b.token({ sub: `free-${randomUUID()}`, battery: 'free', note }), payload: { policy: 'free-text' } });
    assert.equal(res.status, 201, `${label}: ${res.body}`);
    assert.match(res.json().username, ROLE_NAME_PATTERN);
    const [lease] = await b.pg.query('SELECT claims FROM broker.leases WHERE id = $1', [res.json().lease_id]);
    return lease.claims;
  }

  test('free-form claims with quotes, unicode and long text are stored verbatim', async () => {
    for (const note of [`quote ' " \\ ; --`, 'ünïcödé 🔥 \u202E', 'n'.repeat(8000)]) {
      assert.deepEqual(await storedNote(note), { battery: 'free', note }, JSON.stringify(note).slice(0, 30));
    }
  });

  test('a NUL in a free-form claim is stored as U+FFFD (jsonb cannot hold \\u0000); the lease is still issued', async () => {
    assert.deepEqual(await storedNote('nul\u0000inside'), { battery: 'free', note: 'nul\uFFFDinside' });
    assert.deepEqual(await storedNote('\u0000'), { battery: 'free', note: '\uFFFD' });
  });

  // Only a real NUL is replaced: the same six characters as text are data like any other.
  test('the literal text \\u0000 (no NUL byte) is stored verbatim', async () => {
    assert.deepEqual(await storedNote('\\u0000 literal'), { battery: 'free', note: '\\u0000 literal' });
  });

  // A token's JSON may escape half a surrogate pair; jsonb refuses that, so it is stored as U+FFFD.
  test('a lone surrogate in a claim is stored as U+FFFD, an emoji as itself', async () => {
    assert.deepEqual(await storedNote('lone \ud800 half'), { battery: 'free', note: 'lone \uFFFD half' });
    assert.deepEqual(await storedNote('fire 🔥'), { battery: 'free', note: 'fire 🔥' });
  });

  test('claim names that reach for prototypes are plain data', async () => {
    // JSON.parse makes "__proto__" an own key, as a token's JSON does; an object literal would set
    // the prototype instead, and the claim would never be signed.
    const claims = (extra: string) => JSON.parse(`{"sub":"proto"${extra},"__proto__":{"battery":"yes","admin":true},"constructor":"x","toString":"y"}`);
    const payloadOf = (token: string) => JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
    // The policy wants battery=yes: a token carrying it only under "__proto__" is not admitted…
    const hidden = await b.token(claims(''));
    assert.ok(Object.hasOwn(payloadOf(hidden), '__proto__'), 'the token carries a "__proto__" claim');
    const refused = await send('prototype claims, hidden', { token: hidden, payload: { policy: 'any-subject' } });
    assert.equal(refused.status, 403, refused.body);
    // …and the same token with its own battery=yes is, and is no admin either.
    const token = await b.token(claims(',"battery":"yes"'));
    const res = await send('prototype claims', { token, payload: { policy: 'any-subject' } });
    assert.equal(res.status, 201, res.body);
    const evaluated = await send('prototype claims evaluate', { url: '/policies/evaluate', token });
    assert.equal(evaluated.status, 200);
    const admin = await send('prototype claims admin', { method: 'GET', url: '/audit', token });
    assert.equal(admin.status, 403);
  });
});
