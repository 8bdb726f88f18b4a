import assert from 'node:assert/strict';
import { test } from 'node:test';
import { rateLimitKey } from '../../src/client-address.js';

test('the per-IP rate limit counts an IPv6 address by its /64, an IPv4 one (mapped or not) by itself', () => {
  const cases: Array<[string, string]> = [
    ['203.0.113.9', '203.0.113.9'],
    ['::ffff:203.0.113.9', '203.0.113.9'],
    ['::FFFF:203.0.113.9', '203.0.113.9'],
    ['2001:db8:1:2:aaaa::1', '2001:db8:1:2::/64'],
    ['2001:0db8:0001:0002:ffff:ffff:ffff:ffff', '2001:db8:1:2::/64'],
    ['2001:db8::1', '2001:db8:0:0::/64'],
    ['2001:db8:1:3::1', '2001:db8:1:3::/64'],
    ['fe80::1%eth0', 'fe80:0:0:0::/64'],
    ['::1', '0:0:0:0::/64'],
    ['::', '0:0:0:0::/64'],
    ['64:ff9b::192.0.2.33', '64:ff9b:0:0::/64'],
    ['2001:db8:1:2:3:4:5:6', '2001:db8:1:2::/64'],
  ];
  for (const [ip, key] of cases) assert.equal(rateLimitKey(ip), key, ip);
  // Two hosts in one /64 share a key; the next /64 does not.
  assert.equal(rateLimitKey('2001:db8:1:2::a'), rateLimitKey('2001:db8:1:2:ffff::b'));
  assert.notEqual(rateLimitKey('2001:db8:1:2::a'), rateLimitKey('2001:db8:1:3::a'));
});
