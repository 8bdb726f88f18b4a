import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  claimMatches,
  globMatch,
  matchClaims,
  readClaim,
  validatePatterns,
  type ClaimPatterns,
} from '../../src/policy/match.js';

function fixture(name: string): Record<string, Record<string, unknown>> {
  return JSON.parse(readFileSync(new URL(`../fixtures/${name}`, import.meta.url), 'utf8'));
}

const github = fixture('github-actions-claims.json');
const kubernetes = fixture('kubernetes-sa-claims.json');

test('globMatch: literal patterns are exact, anchored and case-sensitive', () => {
  assert.equal(globMatch('main', 'main'), true);
  assert.equal(globMatch('main', 'mainline'), false);
  assert.equal(globMatch('main', 'xmain'), false);
  assert.equal(globMatch('main', 'Main'), false);
  assert.equal(globMatch('', ''), true);
  assert.equal(globMatch('', 'a'), false);
});

test('globMatch: prefix, suffix and middle stars', () => {
  assert.equal(globMatch('refs/heads/*', 'refs/heads/main'), true);
  assert.equal(globMatch('refs/heads/*', 'refs/heads/'), true);
  assert.equal(globMatch('refs/heads/*', 'refs/tags/v1'), false);
  assert.equal(globMatch('*@example.com', 'ana@example.com'), true);
  assert.equal(globMatch('*@example.com', 'ana@example.com.evil'), false);
  assert.equal(globMatch('repo:*:ref:refs/heads/main', 'repo:a/b:ref:refs/heads/main'), true);
  assert.equal(globMatch('repo:*:ref:refs/heads/main', 'repo:a/b:ref:refs/heads/mainx'), false);
  assert.equal(globMatch('a*b*c', 'abc'), true);
  assert.equal(globMatch('a*b*c', 'aXbYc'), true);
  assert.equal(globMatch('a*b*c', 'acb'), false);
  assert.equal(globMatch('ab*ba', 'aba'), false, 'prefix and suffix may not overlap');
  assert.equal(globMatch('ab*ba', 'abba'), true);
  assert.equal(globMatch('a*a*a', 'aaa'), true);
  assert.equal(globMatch('a*a*a', 'aa'), false);
  assert.equal(globMatch('a*bc*bc', 'abcbc'), true);
  assert.equal(globMatch('*', ''), true);
  assert.equal(globMatch('*', 'anything at all'), true);
  assert.equal(globMatch('**', 'x'), true);
  assert.equal(globMatch('x**y', 'xy'), true);
});

test('globMatch: * crosses / and :', () => {
  assert.equal(globMatch('repo:*', 'repo:octo-org/octo-repo:ref:refs/heads/main'), true);
  assert.equal(globMatch('a*z', 'a/b:c/z'), true);
});

test('globMatch: regex metacharacters and other glob syntax are literal', () => {
  for (const literal of ['.', '+', '(', ')', '$', '^', '\\', '|', '{1}', '[a]', '?']) {
    assert.equal(globMatch(`a${literal}b`, `a${literal}b`), true, literal);
  }
  assert.equal(globMatch('a.b', 'aXb'), false);
  assert.equal(globMatch('a+', 'aa'), false);
  assert.equal(globMatch('a?c', 'abc'), false);
  assert.equal(globMatch('[ab]', 'a'), false);
  assert.equal(globMatch('\\*', 'x'), false, 'no escapes: backslash is literal, star still a star');
  assert.equal(globMatch('\\*', '\\x'), true);
  assert.equal(globMatch('^main$', 'main'), false);
  assert.equal(globMatch('(a)*$', '(a)xyz$'), true);
});

test('globMatch: pathological pattern against a long string returns', () => {
  const value = 'a'.repeat(10_000);
  assert.equal(globMatch('*a*a*a*a*a*a*a*a*a*a*a*a*b', value), false);
  assert.equal(globMatch('*a*a*a*a*a*a*a*a*a*a*a*a*b', `${value}b`), true);
  const long = `*${'a*'.repeat(500)}b`;
  assert.equal(globMatch(long, value), false);
});

test('readClaim: top-level names are verbatim, even with dots and slashes', () => {
  const claims = { sub: 's', 'kubernetes.io': { namespace: 'prod' }, 'a/b': 'slash', 'x.y': 1 };
  assert.equal(readClaim(claims, 'sub'), 's');
  assert.equal(readClaim(claims, 'a/b'), 'slash');
  assert.equal(readClaim(claims, 'x.y'), 1);
  assert.equal(readClaim(claims, 'kubernetes.io.namespace'), undefined, 'never split on dots');
  assert.equal(readClaim(claims, 'missing'), undefined);
});

test('readClaim: JSON pointers into nested objects and arrays', () => {
  const claims = {
    groups: ['admins', 'dev'],
    nested: { list: [{ name: 'first' }, { name: 'second' }] },
    'a/b': { 'c~d': 'escaped' },
    '': { '': 'empty keys' },
  };
  assert.equal(readClaim(claims, '/groups/0'), 'admins');
  assert.equal(readClaim(claims, '/groups/1'), 'dev');
  assert.equal(readClaim(claims, '/groups/2'), undefined);
  assert.equal(readClaim(claims, '/groups/01'), undefined, 'leading zeros are not indexes');
  assert.equal(readClaim(claims, '/groups/-'), undefined);
  assert.equal(readClaim(claims, '/groups/length'), undefined);
  assert.equal(readClaim(claims, '/nested/list/1/name'), 'second');
  assert.equal(readClaim(claims, '/a~1b/c~0d'), 'escaped');
  assert.equal(readClaim(claims, '/a/b'), undefined);
  assert.equal(readClaim(claims, '//'), 'empty keys');
  assert.deepEqual(readClaim(claims, '/groups'), ['admins', 'dev']);
  assert.equal(readClaim(claims, '/groups/0/x'), undefined, 'cannot descend into a string');
  assert.equal(readClaim(claims, '/bad~2escape'), undefined);
});

test('readClaim: ~01 unescapes to ~1, not to /', () => {
  assert.equal(readClaim({ '~1': 'tilde-one', '/': 'slash' }, '/~01'), 'tilde-one');
  assert.equal(readClaim({ '~1': 'tilde-one', '/': 'slash' }, '/~1'), 'slash');
});

test('readClaim: never reaches the prototype', () => {
  assert.equal(readClaim({}, 'constructor'), undefined);
  assert.equal(readClaim({}, '/constructor/name'), undefined);
  assert.equal(readClaim({}, '/__proto__'), undefined);
  assert.equal(readClaim({ list: [] }, '/list/constructor'), undefined);
});

test('readClaim: Kubernetes fixture /kubernetes.io/namespace', () => {
  const claims = kubernetes.projected;
  assert.equal(readClaim(claims, '/kubernetes.io/namespace'), 'prod');
  assert.equal(readClaim(claims, '/kubernetes.io/serviceaccount/name'), 'billing');
  assert.equal(readClaim(claims, '/aud/0'), 'pg-broker');
  assert.deepEqual(matchClaims({ '/kubernetes.io/namespace': 'prod', aud: 'pg-broker' }, claims), []);
  assert.equal(matchClaims({ '/kubernetes.io/namespace': 'staging' }, claims).length, 1);
});

test('claimMatches: pattern lists are OR, array claims match on any element', () => {
  assert.equal(claimMatches(['main', 'release/*'], 'release/1.2'), true);
  assert.equal(claimMatches(['main', 'release/*'], 'dev'), false);
  assert.equal(claimMatches([], 'anything'), false);
  assert.equal(claimMatches('admins', ['dev', 'admins']), true);
  assert.equal(claimMatches(['ops', 'adm*'], ['dev', 'admins']), true);
  assert.equal(claimMatches('ops', ['dev', 'admins']), false);
  assert.equal(claimMatches('*', []), false);
});

test('claimMatches: numbers and booleans match by their JSON text', () => {
  assert.equal(claimMatches('42', 42), true);
  assert.equal(claimMatches('4*', 42), true);
  assert.equal(claimMatches('1.5', 1.5), true);
  assert.equal(claimMatches('42.0', 42), false);
  assert.equal(claimMatches('true', true), true);
  assert.equal(claimMatches('false', false), true);
  assert.equal(claimMatches('True', true), false);
  assert.equal(claimMatches('1', true), false);
  assert.equal(claimMatches('7', [true, 7]), true);
});

test('claimMatches: an integer beyond 2^53 - 1 matches nothing, since parsing rounded it; the largest safe one matches', () => {
  // The token said 9007199254740993; JSON.parse reads it as ...992, the same number as ...992 itself.
  const rounded = JSON.parse('{"id": 9007199254740993}').id as number;
  for (const pattern of ['9007199254740992', '9007199254740993', '9007199254740*', '*']) {
    assert.equal(claimMatches(pattern, rounded), false, pattern);
  }
  assert.equal(claimMatches('9007199254740991', Number.MAX_SAFE_INTEGER), true);
  assert.equal(claimMatches('-9007199254740991', -Number.MAX_SAFE_INTEGER), true);
  assert.equal(claimMatches('*', -9007199254740992), false);
  // Written as a string, as IdPs send large ids, it matches as written.
  assert.equal(claimMatches('9007199254740993', '9007199254740993'), true);
});

test('claimMatches: null, objects, nested arrays and missing values never match', () => {
  for (const value of [null, undefined, {}, { a: 'x' }, [['x']], [null], [{}], Number.NaN]) {
    assert.equal(claimMatches('*', value), false, JSON.stringify(value));
  }
  assert.equal(claimMatches('null', null), false);
  assert.equal(claimMatches('[object Object]', {}), false);
  assert.equal(claimMatches('x', [['x']]), false);
});

test('claimMatches: a non-string pattern smuggled past validation matches nothing', () => {
  assert.equal(claimMatches([42 as unknown as string], 42), false);
  assert.equal(claimMatches(null as unknown as string, 'x'), false);
});

test('matchClaims: GitHub fixture, push to main admitted, pull request refused', () => {
  const patterns: ClaimPatterns = { sub: 'repo:octo-org/octo-repo:ref:refs/heads/*' };
  assert.deepEqual(matchClaims(patterns, github.push_to_main), []);
  assert.deepEqual(matchClaims(patterns, github.pull_request), [
    {
      claim: 'sub',
      patterns: ['repo:octo-org/octo-repo:ref:refs/heads/*'],
      value: 'repo:octo-org/octo-repo:pull_request',
    },
  ]);
  assert.equal(matchClaims(patterns, github.tag).length, 1);
  assert.equal(matchClaims({ sub: 'repo:octo-org/*' }, github.tag).length, 0);
});

test('matchClaims: every key must match, and every failure is listed in key order', () => {
  const claims = { sub: 'user:1', aud: ['a', 'b'], admin: false, org: { id: 9 } };
  const patterns: ClaimPatterns = {
    sub: 'user:*',
    missing: '*',
    admin: 'true',
    org: '*',
    '/org/id': ['8', '10'],
    aud: ['b'],
  };
  assert.deepEqual(matchClaims(patterns, claims), [
    { claim: 'missing', patterns: ['*'], value: null },
    { claim: 'admin', patterns: ['true'], value: false },
    { claim: 'org', patterns: ['*'], value: { id: 9 } },
    { claim: '/org/id', patterns: ['8', '10'], value: 9 },
  ]);
  assert.deepEqual(matchClaims({ sub: 'user:*', '/org/id': '9', aud: 'a' }, claims), []);
});

test('matchClaims: the returned pattern list is a copy', () => {
  const list = ['x'];
  const [failed] = matchClaims({ sub: list }, { sub: 'y' });
  failed.patterns.push('*');
  assert.deepEqual(list, ['x']);
});

test('matchClaims: refuses to admit on an empty pattern object', () => {
  assert.throws(() => matchClaims({}, { sub: 'x' }), /at least one claim/);
});

test('validatePatterns: accepts good patterns', () => {
  assert.equal(validatePatterns({ sub: 'repo:*' }), null);
  assert.equal(validatePatterns({ sub: ['a', 'b'], '/kubernetes.io/namespace': 'prod', '/a~0~1b': '' }), null);
  assert.equal(validatePatterns({ x: 'p'.repeat(1024) }), null);
});

test('validatePatterns: names the problem', () => {
  assert.equal(validatePatterns({ 'sub ': 'repo:*' }), 'claim name "sub " has a space at one end');
  assert.equal(validatePatterns({ ' /groups/0': 'admins', sub: 'x' }), 'claim name " /groups/0" has a space at one end');
  const cases: Array<[unknown, RegExp]> = [
    [{}, /at least one claim/],
    [{ '': 'x' }, /must not be empty/],
    [{ sub: [] }, /"sub" needs at least one pattern/],
    [{ sub: ['ok', 3] }, /"sub" must be a string/],
    [{ sub: 3 }, /"sub" must map to a pattern/],
    [{ sub: null }, /"sub" must map to a pattern/],
    [{ '/a~2b': 'x' }, /"\/a~2b" is not a valid JSON pointer/],
    [{ '/a~': 'x' }, /not a valid JSON pointer/],
    [{ sub: 'p'.repeat(1025) }, /longer than 1024/],
    [{ sub: ['ok', 'p'.repeat(1025)] }, /longer than 1024/],
    [null, /must be an object/],
    [['sub'], /must be an object/],
  ];
  for (const [patterns, reason] of cases) {
    assert.match(validatePatterns(patterns as ClaimPatterns) ?? 'null', reason, JSON.stringify(patterns));
  }
});

test('validatePatterns: refuses claims that all accept any value, accepts one narrowed claim', () => {
  for (const patterns of [{ sub: '*' }, { sub: ['repo:x', '*'] }, { sub: '**', repository_owner: '*' }, { iss: 'https://token.actions.githubusercontent.com' }, { aud: 'pg-broker', sub: '*' },
    // The same claims spelt as JSON pointers.
    { '/iss': 'https://token.actions.githubusercontent.com' }, { '/aud': 'pg-broker' }, { '/aud/0': 'pg-broker', '/exp': '*' }] as ClaimPatterns[]) {
    assert.match(validatePatterns(patterns) ?? 'null', /every token of the issuer would match/, JSON.stringify(patterns));
  }
  for (const patterns of [{ sub: '*', repository_owner: 'octo-org' }, { sub: 'repo:octo-org/*' }, { note: '*', battery: 'free' }, { aud: 'pg-broker', repository: 'octo-org/app' },
    { '/aud': 'pg-broker', '/sub': 'repo:octo-org/*' }, { '/kubernetes.io/namespace': 'prod' }, { '/~1iss': 'x' }] as ClaimPatterns[]) {
    assert.equal(validatePatterns(patterns), null, JSON.stringify(patterns));
  }
});

test('validatePatterns: a tilde in a top-level name is not a pointer escape', () => {
  assert.equal(validatePatterns({ 'a~2': 'x' }), null);
});
