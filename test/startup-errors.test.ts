// `pg-broker serve` as a real process, for what only start-up shows: warnings it logs before
// anything else, and failures (a port taken, a DATABASE_URL that cannot log in) that must end
// the process with one line naming the setting, never the password.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { waitFor } from './helpers/broker.js';
import { freePort } from './helpers/ports.js';
import { spawnBroker, type BrokerProcess } from './helpers/process.js';

const PASSWORD = 's3cretPW-startup';
const BASE = { BROKER_AUDIENCE: 'pg-broker', LOG_LEVEL: 'info' };

/** A DATABASE_URL nobody listens on: the broker retries it for as long as it runs. */
async function unreachableDatabaseUrl(): Promise<string> {
  return `postgres://broker:${PASSWORD}@127.0.0.1:${await freePort()}/broker`;
}

const started: BrokerProcess[] = [];
async function spawnWaiting(env: Record<string, string>): Promise<BrokerProcess> {
  const broker = await spawnBroker({ ...BASE, ...env }, { noWait: true });
  started.push(broker);
  return broker;
}
after(() => Promise.all(started.map((b) => b.kill())));

function assertNoPassword(broker: BrokerProcess): void {
  const output = [...broker.stderr, ...broker.logs.map((l) => JSON.stringify(l))].join('\n');
  assert.ok(!output.includes(PASSWORD), 'the DATABASE_URL password reached the output');
}

describe('plain-http key sources', () => {
  const WARNING = /signing keys are fetched over plain http from another machine/;

  test('an http jwks_uri on another host is warned about at start, before the database is reached', async () => {
    const broker = await spawnWaiting({
      DATABASE_URL: await unreachableDatabaseUrl(),
      BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example.com', jwks_uri: 'http://evil.example.com/jwks?key=x' }, { issuer: 'http://idp.example.com' }]),
    });
    const warned = await waitFor('the warnings', async () => (broker.logged(WARNING).length === 2 ? broker.logged(WARNING) : null));
    assert.deepEqual(warned.map((l) => [l.level, l.variable, l.entry, l.field, l.url]), [
      [40, 'BROKER_ISSUERS', 1, 'jwks_uri', 'http://evil.example.com'],
      [40, 'BROKER_ISSUERS', 2, 'issuer', 'http://idp.example.com'],
    ]);
    assert.ok(broker.alive(), 'a warning, not a refusal');
    assertNoPassword(broker);
  });

  test('loopback http (the dev issuer, tests) and https draw no warning', async () => {
    const broker = await spawnWaiting({
      DATABASE_URL: await unreachableDatabaseUrl(),
      BROKER_ISSUERS: JSON.stringify([
        { issuer: 'http://127.0.0.1:9000' }, { issuer: 'http://localhost:9001' }, { issuer: 'http://[::1]:9002' },
        { issuer: 'https://a.example.com', jwks_uri: 'http://127.0.0.2/jwks' }, { issuer: 'https://b.example.com' },
      ]),
    });
    await waitFor('the first retry', async () => broker.logged('PostgreSQL is not reachable yet; retrying').length > 0 || null);
    assert.deepEqual(broker.logged(WARNING), []);
  });
});
