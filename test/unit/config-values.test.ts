import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { loadConfig, plainHttpKeySources } from '../../src/config.js';
import { env, rejects, SECRET } from './config-env.js';

describe('HOST and issuer URLs: addresses and names as written', () => {
  test('BROKER_ISSUERS: an issuer or jwks_uri that only parses by forgiveness is refused', () => {
    const cases: Array<[string, string]> = [
      ['https:///a', 'BROKER_ISSUERS: entry 1: issuer must have its host right after "//"'],
      ['https://a.example,https:///realms/x', 'BROKER_ISSUERS: entry 2: issuer must have its host right after "//"'],
      ['https://b.example.com;https://c', 'BROKER_ISSUERS: entry 1: issuer holds two URLs; separate issuers with a comma'],
      ['https://b.example.comhttps://c.example.com', 'BROKER_ISSUERS: entry 1: issuer holds two URLs; separate issuers with a comma'],
      ['https://b.example.com;c.example.com', 'BROKER_ISSUERS: entry 1: issuer has "b.example.com;c.example.com" as its host, which is not a host name or IP address'],
      ['https://b_.-example.com', 'BROKER_ISSUERS: entry 1: issuer has "b_.-example.com" as its host, which is not a host name or IP address'],
      [JSON.stringify([{ issuer: 'https://a.example', jwks_uri: 'https:///jwks' }]), 'BROKER_ISSUERS: entry 1: jwks_uri must have its host right after "//"'],
      [JSON.stringify([{ issuer: 'https://a.example', jwks_uri: 'https://keys.example;x/jwks' }]), 'BROKER_ISSUERS: entry 1: jwks_uri has "keys.example;x" as its host, which is not a host name or IP address'],
    ];
    for (const [value, message] of cases) assert.equal(rejects({ BROKER_ISSUERS: value }, 'BROKER_ISSUERS').message, message, value);
    // What is meant is accepted: names, addresses, ports, paths, loopback with its port.
    const good = ['https://b.example.com', 'https://c.example/realms/x', 'https://idp_1.corp:8443/', 'http://127.0.0.1:9000', 'https://[2001:db8::1]/tenant', 'http://dev-issuer:9000'];
    assert.deepEqual(loadConfig(env({ BROKER_ISSUERS: good.join(',') })).issuers.map((i) => i.issuer), good);
    const withKeys = [{ issuer: 'https://a.example', jwks_uri: 'https://keys.a.example:8443/jwks.json?x=1' }];
    assert.deepEqual(loadConfig(env({ BROKER_ISSUERS: JSON.stringify(withKeys) })).issuers, withKeys);
  });

  test('HOST: an IPv4 or IPv6 address (brackets dropped, a zone id kept) or a host name', () => {
    const host = (value: string) => loadConfig(env({ HOST: value })).host;
    for (const value of ['0.0.0.0', '127.0.0.1', '::', '::1', 'fe80::1%eth0', 'localhost', 'broker.internal', 'pod-1.broker.svc.cluster.local.']) {
      assert.equal(host(value), value);
    }
    assert.equal(host('[::]'), '::');
    assert.equal(host(' 10.1.2.3 '), '10.1.2.3');
  });

  test('HOST: anything but an address or a host name is refused before start-up goes further', () => {
    for (const value of ['not a host', 'localhost:8080', 'http://0.0.0.0', '0.0.0.0/0', '10.0.0.256', '1.2.3', '[::1]:8080', '::g', 'host_-.example']) {
      const err = rejects({ HOST: value }, 'HOST', /must be an IP address \(such as 0\.0\.0\.0, :: or 127\.0\.0\.1\) or a host name/);
      assert.ok(err.message.includes(JSON.stringify(value)), `names the value: ${err.message}`);
    }
    // A user part might hold a password: not quoted.
    const err = rejects({ HOST: `broker:${SECRET}@db` }, 'HOST');
    assert.ok(!err.message.includes('@'), err.message);
  });
});

describe('plainHttpKeySources: what start-up warns about', () => {
  const sources = (issuers: unknown) => plainHttpKeySources(loadConfig(env({ BROKER_ISSUERS: typeof issuers === 'string' ? issuers : JSON.stringify(issuers) })));

  test('an http issuer (discovery) or jwks_uri on another host is accepted and listed, by origin only', () => {
    assert.deepEqual(sources('http://idp.example.com'), [{ entry: 1, field: 'issuer', origin: 'http://idp.example.com' }]);
    assert.deepEqual(sources([{ issuer: 'https://a.example.com', jwks_uri: 'http://evil.example.com:8080/jwks?token=x' }]),
      [{ entry: 1, field: 'jwks_uri', origin: 'http://evil.example.com:8080' }]);
    // The compose trial's dev issuer, reached by its service name.
    assert.deepEqual(sources('https://a.example.com,http://dev-issuer:9000'), [{ entry: 2, field: 'issuer', origin: 'http://dev-issuer:9000' }]);
    assert.deepEqual(sources('http://10.0.0.1'), [{ entry: 1, field: 'issuer', origin: 'http://10.0.0.1' }]);
  });

  test('loopback, https, and an http issuer whose keys come from an https jwks_uri are not', () => {
    for (const issuer of ['http://127.0.0.1:9000', 'http://127.8.9.10', 'http://localhost:8081', 'http://LOCALHOST', 'http://[::1]:80', 'https://idp.example.com']) {
      assert.deepEqual(sources(issuer), [], issuer);
    }
    // The issuer is only an identifier here: nothing is fetched from it.
    assert.deepEqual(sources([{ issuer: 'http://idp.example.com', jwks_uri: 'https://idp.example.com/jwks' }]), []);
    assert.deepEqual(sources([{ issuer: 'https://a.example.com', jwks_uri: 'http://127.0.0.1:9000/jwks' }]), []);
  });
});
