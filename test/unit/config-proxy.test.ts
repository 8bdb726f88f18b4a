import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import Fastify from 'fastify';
import { loadConfig } from '../../src/config.js';
import { env, rejects } from './config-env.js';

const trusted = (value: string | undefined) => loadConfig(env({ BROKER_TRUST_PROXY: value })).trustProxy;

describe('BROKER_TRUST_PROXY', () => {
  test('unset, empty or only commas trusts no proxy', () => {
    for (const value of [undefined, '', '  ', ' , ']) assert.deepEqual(trusted(value), [], JSON.stringify(value));
  });

  test('a comma-separated list of IPv4 and IPv6 addresses and CIDR blocks, spaces and empty items dropped', () => {
    assert.deepEqual(trusted(' 10.0.0.0/8 , fd00::/8 '), ['10.0.0.0/8', 'fd00::/8']);
    assert.deepEqual(trusted('192.0.2.1,,198.51.100.0/24'), ['192.0.2.1', '198.51.100.0/24']);
    assert.deepEqual(trusted('127.0.0.1,::1,::ffff:10.9.0.0/112,2001:db8::1/128,10.0.0.7/32'),
      ['127.0.0.1', '::1', '::ffff:10.9.0.0/112', '2001:db8::1/128', '10.0.0.7/32']);
  });

  // Fastify hands the list to proxy-addr, which throws on an entry it cannot read: every value
  // start-up accepts must also be one it takes, and trust what the operator meant.
  test('what start-up accepts, Fastify trusts: a listed proxy\'s X-Forwarded-For is believed, any other peer\'s is not', async () => {
    const cases: Array<[string, string, string]> = [
      ['10.0.0.0/8', '10.200.3.4', '172.16.0.1'],
      ['fd00::/8', 'fd12::7', 'fe80::1'],
      ['192.0.2.1', '192.0.2.1', '192.0.2.2'],
      ['::ffff:10.9.0.0/112', '10.9.1.1', '10.8.1.1'],
      ['::ffff:10.0.0.0/104', '10.250.1.1', '11.0.0.1'],
      ['2001:db8::1/128', '2001:db8::1', '2001:db8::2'],
    ];
    for (const [value, proxy, other] of cases) {
      const app = Fastify({ trustProxy: trusted(value) });
      app.get('/', async (request) => request.ip);
      const from = async (remoteAddress: string) =>
        (await app.inject({ url: '/', remoteAddress, headers: { 'x-forwarded-for': '203.0.113.9' } })).body;
      assert.equal(await from(proxy), '203.0.113.9', `${value}: ${proxy} is a proxy`);
      assert.equal(await from(other), other, `${value}: ${other} is not`);
      await app.close();
    }
  });

  test('trusting everyone, a hop count or a word for "off" is refused, saying what to write', () => {
    const rule = 'BROKER_TRUST_PROXY: must list the addresses or CIDR blocks of the proxies in front of the broker (such as 10.0.0.0/8,fd00::/8)';
    for (const value of ['true', 'TRUE', '*', 'all']) {
      assert.equal(rejects({ BROKER_TRUST_PROXY: value }, 'BROKER_TRUST_PROXY').message, `${rule}; trusting every peer would let any client choose its own address`, value);
    }
    for (const value of ['1', '2', '0']) assert.equal(rejects({ BROKER_TRUST_PROXY: value }, 'BROKER_TRUST_PROXY').message, `${rule}, not a hop count`, value);
    for (const value of ['false', 'off', 'none']) {
      assert.equal(rejects({ BROKER_TRUST_PROXY: value }, 'BROKER_TRUST_PROXY').message, `${rule}; leave it unset or empty to trust no proxy`, value);
    }
  });

  test('an entry that is no address or block, or whose prefix is out of range, is named by its number', () => {
    const notAddress = 'is not an IP address or CIDR block (such as 10.0.0.0/8 or fd00::/8)';
    const wide = 'proxies sit in a /8 or narrower, and a wider block lets most clients choose their own address';
    const mapped = 'covers IPv4 addresses (as ::ffff:…) wider than a /8, which lets most IPv4 clients choose their own address';
    const cases: Array<[string, string]> = [
      // proxy-addr would read these as 8.0.0.1 and 10.0.0.1.
      ['010.0.0.1', `entry 1: "010.0.0.1" ${notAddress}`],
      ['10.0.0.0/8,10.1', `entry 2: "10.1" ${notAddress}`],
      ['ingress.internal', `entry 1: "ingress.internal" ${notAddress}`],
      ['uniquelocal', `entry 1: "uniquelocal" ${notAddress}`],
      ['fe80::1%eth0', `entry 1: "fe80::1%eth0" ${notAddress}`],
      ['10.0.0.0/8/8', `entry 1: "10.0.0.0/8/8" ${notAddress}`],
      ['10.0.0.0/8; 192.168.0.0/16', `entry 1: "10.0.0.0/8; 192.168.0.0/16" ${notAddress}`],
      ['10.0.0.0/33', 'entry 1: "10.0.0.0/33" has no valid prefix length: an IPv4 block\'s is 1 to 32'],
      ['10.0.0.0/', 'entry 1: "10.0.0.0/" has no valid prefix length: an IPv4 block\'s is 1 to 32'],
      ['192.0.2.1,fd00::/129', 'entry 2: "fd00::/129" has no valid prefix length: an IPv6 block\'s is 1 to 128'],
      ['0.0.0.0/0', 'entry 1: "0.0.0.0/0" is a /0 block, which trusts every address: any client could then choose its own address'],
      ['::/00', 'entry 1: "::/00" is a /0 block, which trusts every address: any client could then choose its own address'],
      // Together these two cover all of IPv4; proxy-addr matches IPv4 peers against ::ffff: blocks.
      ['0.0.0.0/1,128.0.0.0/1', `entry 1: "0.0.0.0/1" is a /1 block: ${wide}`],
      ['10.0.0.0/8,fc00::/7', `entry 2: "fc00::/7" is a /7 block: ${wide}`],
      ['::ffff:0:0/96', `entry 1: "::ffff:0:0/96" ${mapped}`],
      ['::ffff:10.0.0.0/100', `entry 1: "::ffff:10.0.0.0/100" ${mapped}`],
      ['::/64', `entry 1: "::/64" ${mapped}`],
    ];
    for (const [value, reason] of cases) assert.equal(rejects({ BROKER_TRUST_PROXY: value }, 'BROKER_TRUST_PROXY').message, `BROKER_TRUST_PROXY: ${reason}`, value);
  });

  // proxy-addr masks the address, so `192.168.1.10/24` trusted all of 192.168.1.0/24: most likely
  // one proxy's address was meant, and a whole subnet of clients could name their own address.
  test('a block whose address has host bits set is refused, suggesting the block and the one address', () => {
    const cases: Array<[string, string, string]> = [
      ['192.168.1.10/24', '192.168.1.0/24', '192.168.1.10'],
      ['10.0.0.0/8,10.1.2.3/16', '10.1.0.0/16', '10.1.2.3'],
      ['fd00::5/64', 'fd00::/64', 'fd00::5'],
      ['2001:db8:0:0:1:0:0:1/96', '2001:db8:0:0:1::/96', '2001:db8:0:0:1:0:0:1'],
      ['::ffff:10.9.1.5/112', '::ffff:10.9.0.0/112', '::ffff:10.9.1.5'],
      ['::ffff:a09:105/120', '::ffff:10.9.1.0/120', '::ffff:a09:105'],
    ];
    for (const [value, block, address] of cases) {
      const entries = value.split(',');
      const bits = entries.at(-1)!.split('/')[1];
      const single = `${address}/${address.includes(':') ? 128 : 32}`;
      assert.equal(rejects({ BROKER_TRUST_PROXY: value }, 'BROKER_TRUST_PROXY').message,
        `BROKER_TRUST_PROXY: entry ${entries.length}: "${entries.at(-1)}" has host bits set, and would trust all of ${block}: `
        + `write ${block} for that /${bits} block, or ${address} (or ${single}) for the one proxy`, value);
    }
    // The suggestions are accepted as written, and so is a block that starts where its address does.
    assert.deepEqual(trusted('192.168.1.0/24,192.168.1.10,192.168.1.10/32,fd00::/64,fd00::5/128,::ffff:10.9.0.0/112,::ffff:10.9.1.5,172.16.5.4/31'),
      ['192.168.1.0/24', '192.168.1.10', '192.168.1.10/32', 'fd00::/64', 'fd00::5/128', '::ffff:10.9.0.0/112', '::ffff:10.9.1.5', '172.16.5.4/31']);
  });
});
