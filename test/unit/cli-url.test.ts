import assert from 'node:assert/strict';
import { test } from 'node:test';
import { brokerUrl, CliError, plainHttpWarning } from '../../src/cli/client.js';

test('plain http to another host is warned about; https and loopback are not', () => {
  for (const url of ['http://pg-broker.internal', 'http://10.0.0.5:8080', 'http://[fd00::1]:8080', 'http://localhost.evil.example', 'http://127.evil.example', 'http://127.0.0.1.nip.io']) {
    assert.match(plainHttpWarning(url) ?? 'none', /plain http/, url);
  }
  for (const url of ['https://pg-broker.internal', 'http://127.0.0.1:8080', 'http://127.9.9.9', 'http://localhost:8080', 'http://[::1]:8080', 'not a url']) {
    assert.equal(plainHttpWarning(url), null, url);
  }
});

test('--url and PG_BROKER_URL must be an http(s) base URL, refused naming which one; a good one is taken as given', () => {
  const refused = (flag: string | undefined, env: Record<string, string>, message: RegExp) =>
    assert.throws(() => brokerUrl(flag, env), (err: Error) => err instanceof CliError && message.test(err.message), `${flag} ${JSON.stringify(env)}`);
  refused('ftp://x', {}, /^--url must be the broker's http\(s\) URL, like https:\/\/pg-broker\.internal; ftp: is no scheme/);
  refused('not a url', {}, /^--url must be the broker's http\(s\) URL, like https:\/\/pg-broker\.internal; got "not a url"$/);
  refused(undefined, { PG_BROKER_URL: 'pg-broker.internal:8080' }, /^PG_BROKER_URL must be the broker's http\(s\) URL/);
  refused('https://pg-broker.internal/?x=1', {}, /^--url must be the broker's base URL, without a query or fragment$/);
  refused('https://pg-broker.internal?', {}, /^--url must be the broker's base URL, without a query or fragment$/);
  refused('https://pg-broker.internal#', {}, /^--url must be the broker's base URL, without a query or fragment$/);
  // A password in the URL is refused and not repeated, whether or not the rest parses.
  for (const url of ['https://u:s3cret-pw@pg-broker.internal', 'https://u:s3cret-pw@[bad', 'https://u:s3c/ret-pw@host', 'https://u:1234/s3cret-pw@host', `https://${'u'.repeat(300)}:s3cret-pw@host`]) {
    refused(url, {}, /^--url must not carry a user or password \(user:password@\), or any @; the broker takes a bearer token$/);
    assert.throws(() => brokerUrl(url, {}), (err: Error) => !err.message.includes('s3c'), url);
  }
  assert.equal(brokerUrl('https://pg-broker.internal/', {}), 'https://pg-broker.internal');
  assert.equal(brokerUrl(undefined, { PG_BROKER_URL: 'https://gw.example/broker' }), 'https://gw.example/broker');
  assert.equal(brokerUrl('http://127.0.0.1:8080', { PG_BROKER_URL: 'ftp://ignored' }), 'http://127.0.0.1:8080');
});
