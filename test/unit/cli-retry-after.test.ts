import assert from 'node:assert/strict';
import { test } from 'node:test';
import { retryAfterSeconds } from '../../src/cli/client.js';
import { DEFAULT_MAX_WAIT_SECONDS, maxWaitSeconds } from '../../src/cli/rate-limit.js';

test('Retry-After is read as seconds or as an HTTP date; anything else is unreadable, not a wait of 0', () => {
  const now = Date.parse('2026-01-01T00:00:00Z');
  assert.equal(retryAfterSeconds('42', now), 42);
  assert.equal(retryAfterSeconds(' 7 ', now), 7);
  assert.equal(retryAfterSeconds('Thu, 01 Jan 2026 00:00:30 GMT', now), 30);
  // A date already past asks for no wait; the pacer still waits a second.
  assert.equal(retryAfterSeconds('Wed, 31 Dec 2025 23:59:00 GMT', now), 0);
  for (const unreadable of [null, '', 'soon', '-5', '1.5e3']) assert.equal(retryAfterSeconds(unreadable, now), undefined, String(unreadable));
});

test('PG_BROKER_RATE_LIMIT_MAX_WAIT is whole seconds ≥ 1, 60 when unset', () => {
  assert.equal(maxWaitSeconds({}), DEFAULT_MAX_WAIT_SECONDS);
  assert.equal(DEFAULT_MAX_WAIT_SECONDS, 60);
  assert.equal(maxWaitSeconds({ PG_BROKER_RATE_LIMIT_MAX_WAIT: '5' }), 5);
  for (const bad of ['0', '', '1.5', '-1', 'ten']) {
    assert.throws(() => maxWaitSeconds({ PG_BROKER_RATE_LIMIT_MAX_WAIT: bad }), /PG_BROKER_RATE_LIMIT_MAX_WAIT must be a whole number of seconds ≥ 1/, bad);
  }
});
