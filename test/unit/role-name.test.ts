import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ROLE_NAME_PATTERN, roleNameFor } from '../../src/postgres/role-name.js';

const FIXED = Buffer.from([0, 1, 2, 25, 26, 35, 36, 71, 255, 100]);
// byte % 36 indexes a-z then 0-9: 255 % 36 = 3 -> d, 100 % 36 = 28 -> 2
const FIXED_SUFFIX = 'abcz09a9d2';

function assertValid(name: string): void {
  assert.ok(Buffer.byteLength(name, 'utf8') <= 63, `${name} is longer than 63 bytes`);
  assert.match(name, /^[a-z][a-z0-9_]*$/);
  assert.match(name, ROLE_NAME_PATTERN);
}

test('readable hint for a GitHub subject', () => {
  const name = roleNameFor('repo:octo-org/octo-repo:ref:refs/heads/main', FIXED);
  assert.equal(name, `lease_repo_octo_org_octo_repo_ref_refs_heads_main_${FIXED_SUFFIX}`);
  assertValid(name);
});

test('readable hint for a Kubernetes subject', () => {
  const name = roleNameFor('system:serviceaccount:prod:billing', FIXED);
  assert.equal(name, `lease_system_serviceaccount_prod_billing_${FIXED_SUFFIX}`);
  assertValid(name);
});

test('lowercases, collapses runs and trims underscores', () => {
  assert.equal(roleNameFor('--Hello,,  World!!--', FIXED), `lease_hello_world_${FIXED_SUFFIX}`);
  assert.equal(roleNameFor('__a__b__', FIXED), `lease_a_b_${FIXED_SUFFIX}`);
  assert.equal(roleNameFor('123', FIXED), `lease_123_${FIXED_SUFFIX}`);
});

test('an empty hint gives lease_<random>', () => {
  for (const subject of ['', '!!!', '日本語', '"\'\u0000;', '___']) {
    const name = roleNameFor(subject, FIXED);
    assert.equal(name, `lease_${FIXED_SUFFIX}`, JSON.stringify(subject));
    assertValid(name);
  }
});

test('unicode, NUL, quotes and SQL never leak into the name', () => {
  for (const subject of [
    'ünïcödé:user',
    'a\u0000b',
    `x"; DROP ROLE postgres; --`,
    "o'brien",
    'emoji😀user',
    '\u212A', // KELVIN SIGN lowercases to ASCII k
    'İstanbul',
    'pg_signal_backend',
  ]) {
    assertValid(roleNameFor(subject));
  }
  assert.equal(roleNameFor('\u212A', FIXED), `lease_k_${FIXED_SUFFIX}`);
});

test('a 10k-character unicode subject still fits in 63 bytes', () => {
  const subject = 'ñ😀a/'.repeat(2_500);
  const name = roleNameFor(subject);
  assertValid(name);
  assert.ok(name.startsWith('lease_a_a_a_'), name);
  assertValid(roleNameFor('x'.repeat(10_000)));
  assertValid(roleNameFor('é'.repeat(10_000)));
});

test('truncation never leaves a trailing or doubled underscore', () => {
  for (let length = 40; length <= 60; length++) {
    const subject = `${'a'.repeat(length)}:bbbb:cccc`;
    const name = roleNameFor(subject, FIXED);
    assertValid(name);
    assert.ok(!name.includes('__'), name);
  }
});

test('suffix is 10 characters from [a-z0-9]', () => {
  for (let i = 0; i < 200; i++) {
    assert.match(roleNameFor('sub'), /^lease_sub_[a-z0-9]{10}$/);
  }
});

test('unique over 10k calls for the same subject', () => {
  const names = new Set<string>();
  for (let i = 0; i < 10_000; i++) names.add(roleNameFor('system:serviceaccount:prod:billing'));
  assert.equal(names.size, 10_000);
});

test('refuses a random buffer shorter than 10 bytes', () => {
  assert.throws(() => roleNameFor('x', Buffer.alloc(9)), RangeError);
});

test('ROLE_NAME_PATTERN rejects names the generator cannot produce', () => {
  for (const bad of [
    'lease_',
    'lease_abc',
    'lease__abcdefghij',
    'lease_x__y_abcdefghij',
    'lease_X_abcdefghij',
    'postgres',
    `lease_${'a'.repeat(47)}_abcdefghij`,
  ]) {
    assert.doesNotMatch(bad, ROLE_NAME_PATTERN, bad);
  }
  assert.match(`lease_${'a'.repeat(46)}_abcdefghij`, ROLE_NAME_PATTERN);
});
