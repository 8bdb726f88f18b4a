import assert from 'node:assert/strict';
import { test } from 'node:test';
import { jsonbText } from '../../src/postgres/rows.js';

test('a NUL character becomes U+FFFD wherever it is, keys included', () => {
  assert.deepEqual(JSON.parse(jsonbText({ a: 'x\u0000y', ['k\u0000']: ['\u0000', '\u0000\u0000'] })), { a: 'x\uFFFDy', ['k\uFFFD']: ['\uFFFD', '\uFFFD\uFFFD'] });
});

test('a lone surrogate becomes U+FFFD; a surrogate pair (an emoji) is kept', () => {
  assert.deepEqual(JSON.parse(jsonbText({ a: 'x\ud800y', b: '\udfff', c: '🔥' })), { a: 'x\uFFFDy', b: '\uFFFD', c: '🔥' });
  assert.deepEqual(JSON.parse(jsonbText({ text: '\\ud800' })), { text: '\\ud800' }, 'the text backslash-u-d800 is data');
});

test('the text backslash-u-0000 is data and stays as it is, also after other backslashes', () => {
  for (const text of ['\\u0000', 'a\\u0000b', '\\\\u0000']) {
    assert.deepEqual(JSON.parse(jsonbText({ text })), { text }, JSON.stringify(text));
  }
  // An escaped backslash followed by a real NUL: the backslash stays, the NUL is replaced.
  assert.deepEqual(JSON.parse(jsonbText({ text: '\\\u0000' })), { text: '\\\uFFFD' });
  assert.equal(jsonbText({ plain: 'no nul' }), JSON.stringify({ plain: 'no nul' }));
});
