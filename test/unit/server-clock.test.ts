import assert from 'node:assert/strict';
import { test } from 'node:test';
import { nextRenewDelayMs, readServerClock, renewDelayMs, serverNowMs } from '../../src/cli/renew-schedule.js';

const DATE = 'Tue, 01 Jan 2030 00:00:00 GMT';
const AT = Date.parse('2030-01-01T00:00:00Z');

test('a Date header is read as the end of its second, at the moment the answer arrived', () => {
  assert.deepEqual(readServerClock(DATE, 500), { serverMs: AT + 999, monoMs: 500 });
  assert.deepEqual(readServerClock(` ${DATE} `, 0), { serverMs: AT + 999, monoMs: 0 });
  // None, or no HTTP date: nothing to go by.
  for (const header of [null, '', '-5', '2030-01-01T00:00:00Z', 'yesterday GMT']) assert.equal(readServerClock(header, 500), null, String(header));
});

test('the broker\'s now moves on with the monotonic clock, whatever this machine\'s clock says', () => {
  const reading = readServerClock(DATE, 1_000)!;
  for (const localNow of [AT - 3_600_000, AT, AT + 3_600_000]) assert.equal(serverNowMs(reading, 4_000, localNow), AT + 999 + 3_000);
  assert.equal(serverNowMs(null, 4_000, AT + 5), AT + 5, 'without a reading, the local clock');
});

test('a lease answered 90 s before its expiry is renewed at two thirds of that, however far off the local clock is', () => {
  const lease = { expiresAtMs: AT + 90_000, maxExpiresAtMs: AT + 3_600_000 };
  const reading = readServerClock(DATE, 0)!;
  for (const skew of [-120_000, 0, 120_000]) {
    assert.equal(nextRenewDelayMs(lease, serverNowMs(reading, 0, AT + skew), 0), Math.round(((90_000 - 999) * 2) / 3), `skew ${skew}`);
  }
});

// The Date header can be wrong while this machine's clock is right: nginx, for one, sends its own
// Date rather than the broker's, from whatever its host's clock says. A renew falls due when either
// clock says so, so one clock off by more than the lease's lifetime neither lapses the lease nor
// stops the renewals.
test('a Date header an hour off while the local clock is right: the lease is still renewed in time', () => {
  const now = AT;
  const lease = { expiresAtMs: now + 90_000, maxExpiresAtMs: now + 3_600_000 };
  for (const offMs of [-3_600_000, 3_600_000]) {
    const reading = readServerClock(new Date(now + offMs).toUTCString(), 0)!;
    const delay = renewDelayMs(lease, reading, 0, now, 0);
    assert.ok(delay !== null && delay <= 60_000, `Date off by ${offMs / 1000} s: renewed after ${delay} ms`);
  }
  // And still by the broker's clock when this machine's is the one that is off (either way).
  for (const skew of [-120_000, 120_000]) {
    const delay = renewDelayMs(lease, readServerClock(new Date(now).toUTCString(), 0)!, 0, now + skew, 0);
    assert.ok(delay !== null && delay <= 60_000, `local clock off by ${skew / 1000} s: renewed after ${delay} ms`);
  }
});
