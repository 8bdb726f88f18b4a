import assert from 'node:assert/strict';
import { test } from 'node:test';
import { retryAfterSeconds } from '../../src/cli/client.js';
import { DEFAULT_MAX_WAIT_SECONDS, maxWaitSeconds } from '../../src/cli/rate-limit.js';

test('Retry-After is read as seconds or as an HTTP date; anything else is unreadable, not a wait of 0', () => {
  const now = Date.parse('2026-01-01T00:00:00Z');
  assert.equal(retryAfterSeconds('42', null, now), 42);
  assert.equal(retryAfterSeconds(' 7 ', null, now), 7);
  assert.equal(retryAfterSeconds('Thu, 01 Jan 2026 00:00:30 GMT', null, now), 30);
  // A date already past asks for no wait; the pacer still waits a second.
  assert.equal(retryAfterSeconds('Wed, 31 Dec 2025 23:59:00 GMT', null, now), 0);
  for (const unreadable of [null, '', 'soon', '-5', '1.5e3']) assert.equal(retryAfterSeconds(unreadable, null, now), undefined, String(unreadable));
});

test('a Retry-After date is measured from the answer\'s Date header, not this machine\'s clock, when it has one', () => {
  // This machine's clock runs an hour ahead of the server's: by it, the date has long passed.
  const aheadNow = Date.parse('2026-01-01T01:00:00Z');
  const answerDate = 'Thu, 01 Jan 2026 00:00:00 GMT';
  assert.equal(retryAfterSeconds('Thu, 01 Jan 2026 00:00:30 GMT', answerDate, aheadNow), 30);
  // An hour behind: by it, the wait would be an hour and 30 s.
  assert.equal(retryAfterSeconds('Thu, 01 Jan 2026 00:00:30 GMT', answerDate, Date.parse('2025-12-31T23:00:00Z')), 30);
  // Without a readable Date, this machine's clock is all there is; seconds ignore both.
  for (const unreadable of [null, '', 'yesterday', '0']) {
    assert.equal(retryAfterSeconds('Thu, 01 Jan 2026 00:00:30 GMT', unreadable, Date.parse('2026-01-01T00:00:10Z')), 20, String(unreadable));
  }
  assert.equal(retryAfterSeconds('12', answerDate, aheadNow), 12);
});

test('PG_BROKER_RATE_LIMIT_MAX_WAIT is whole seconds ≥ 1, 60 when unset', () => {
  assert.equal(maxWaitSeconds({}), DEFAULT_MAX_WAIT_SECONDS);
  assert.equal(DEFAULT_MAX_WAIT_SECONDS, 60);
  assert.equal(maxWaitSeconds({ PG_BROKER_RATE_LIMIT_MAX_WAIT: '5' }), 5);
  for (const bad of ['0', '', '1.5', '-1', 'ten']) {
    assert.throws(() => maxWaitSeconds({ PG_BROKER_RATE_LIMIT_MAX_WAIT: bad }), /PG_BROKER_RATE_LIMIT_MAX_WAIT must be a whole number of seconds ≥ 1/, bad);
  }
});
