import assert from 'node:assert/strict';
import { test } from 'node:test';
import { POLICY_MAX_AGE_MS, PolicyCache } from '../../src/policy/cache.js';
import type { Policy } from '../../src/policy/repository.js';

const policy = (name: string) => ({ name }) as Policy;

test('kept policies: another token drops every issuer\'s, and none is kept past the maximum age', () => {
  let now = 1_000_000;
  const cache = new PolicyCache(() => now);
  cache.store('https://a', 'token-1', [policy('a1')]);
  cache.store('https://b', 'token-1', [policy('b1')]);
  assert.deepEqual(cache.get('https://a')?.policies, [policy('a1')]);
  assert.equal(cache.get('https://b')?.version, 'token-1');
  // Read under another token: what was kept under the old one describes another table.
  cache.store('https://a', 'token-2', [policy('a2')]);
  assert.equal(cache.get('https://b'), undefined);
  assert.deepEqual(cache.get('https://a')?.policies, [policy('a2')]);
  now += POLICY_MAX_AGE_MS - 1;
  assert.equal(cache.get('https://a')?.version, 'token-2', 'still young enough');
  now += 1;
  assert.equal(cache.get('https://a'), undefined, 'read again after the maximum age');
});
