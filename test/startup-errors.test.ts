// `pg-broker serve` as a real process, for what only start-up shows: warnings it logs before
// anything else, and failures (a port taken, a DATABASE_URL that cannot log in) that must end
// the process with one line naming the setting, never the password.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { execFile } from 'node:child_process';
import { waitFor } from './helpers/broker.js';
import { BIN } from './helpers/cli.js';
import { freePort } from './helpers/ports.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { spawnBroker, type BrokerProcess } from './helpers/process.js';

const PASSWORD = 's3cretPW-startup';
const BASE = { BROKER_AUDIENCE: 'pg-broker', LOG_LEVEL: 'info' };

/**
 * A DATABASE_URL nobody listens on: the broker retries it for as long as it runs. Port 1 (tcpmux)
 * is never served here, where a port chosen as free could be taken by another test's server.
 */
async function unreachableDatabaseUrl(): Promise<string> {
  return `postgres://broker:${PASSWORD}@127.0.0.1:1/broker`;
}

const started: BrokerProcess[] = [];
async function spawnWaiting(env: Record<string, string>): Promise<BrokerProcess> {
  const broker = await spawnBroker({ ...BASE, ...env }, { noWait: true });
  started.push(broker);
  return broker;
}
after(() => Promise.all(started.map((b) => b.kill())));

/** `pg-broker serve` with exactly `env` (spawnBroker sets HOST and PORT itself), to its exit. */
function serveToExit(env: Record<string, string>): Promise<{ code: number | null; stderr: string }> {
  return new Promise((resolve) => {
    execFile(process.execPath, [BIN, 'serve'], { env: { PATH: process.env.PATH!, HOME: process.env.HOME ?? '/tmp', ...BASE, ...env }, timeout: 20_000 }, (err, _stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, stderr });
    });
  });
}

/** A port held by this process on 127.0.0.1 until the test ends. */
async function takenPort(t: { after(fn: () => unknown): void }): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise((resolve) => server.close(resolve)));
  return (server.address() as net.AddressInfo).port;
}

function assertNoPassword(broker: BrokerProcess): void {
  const output = [...broker.stderr, ...broker.logs.map((l) => JSON.stringify(l))].join('\n');
  assert.ok(!output.includes(PASSWORD), 'the DATABASE_URL password reached the output');
}

describe('plain-http key sources', () => {
  const WARNING = /signing keys are fetched over plain http from another machine/;

  test('an http jwks_uri on another host is warned about at start, before the database is reached', async () => {
    const broker = await spawnWaiting({
      DATABASE_URL: await unreachableDatabaseUrl(),
      BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example', jwks_uri: 'http://evil.example/jwks?key=x' }, { issuer: 'http://idp.example' }]),
    });
    const warned = await waitFor('the warnings', async () => (broker.logged(WARNING).length === 2 ? broker.logged(WARNING) : null));
    assert.deepEqual(warned.map((l) => [l.level, l.variable, l.entry, l.field, l.url]), [
      [40, 'BROKER_ISSUERS', 1, 'jwks_uri', 'http://evil.example'],
      [40, 'BROKER_ISSUERS', 2, 'issuer', 'http://idp.example'],
    ]);
    assert.ok(broker.alive(), 'a warning, not a refusal');
    assertNoPassword(broker);
  });

  test('loopback http (the dev issuer, tests) and https draw no warning', async () => {
    const broker = await spawnWaiting({
      DATABASE_URL: await unreachableDatabaseUrl(),
      BROKER_ISSUERS: JSON.stringify([
        { issuer: 'http://127.0.0.1:9000' }, { issuer: 'http://localhost:9001' }, { issuer: 'http://[::1]:9002' },
        { issuer: 'https://a.example', jwks_uri: 'http://127.0.0.2/jwks' }, { issuer: 'https://b.example' },
      ]),
    });
    await waitFor('the first retry', async () => broker.logged('PostgreSQL is not reachable yet; retrying').length > 0 || null);
    assert.deepEqual(broker.logged(WARNING), []);
  });
});

describe('an audience that reads like a list', () => {
  test('is warned about, naming the variable; one without a comma is not', async () => {
    const broker = await spawnWaiting({
      DATABASE_URL: await unreachableDatabaseUrl(), BROKER_AUDIENCE: 'pg-broker, sts.amazonaws.com',
      BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example' }, { issuer: 'https://b.example', audience: 'api://db' }]),
    });
    await waitFor('the first retry', async () => broker.logged('PostgreSQL is not reachable yet; retrying').length > 0 || null);
    const warned = broker.logged(/holds a comma, and is one audience/);
    assert.deepEqual(warned.map((l) => [l.variable, l.audience]), [['BROKER_AUDIENCE', 'pg-broker, sts.amazonaws.com']]);
  });
});

describe('a stop while PostgreSQL is not reachable yet', () => {
  test('SIGTERM ends the wait with exit 0 and a log line, as PID 1 in a container ignores a signal with no handler', async () => {
    const broker = await spawnWaiting({ DATABASE_URL: await unreachableDatabaseUrl(), BROKER_ISSUERS: 'https://issuer.example' });
    await waitFor('the first retry', async () => broker.logged('PostgreSQL is not reachable yet; retrying').length > 0 || null);
    // Without a handler Node dies of the signal itself (code null), and as PID 1 would not at all.
    assert.deepEqual(await broker.kill('SIGTERM'), { code: 0, signal: null });
    assert.deepEqual(broker.logged('shutting down before start-up finished').map((l) => l.signal), ['SIGTERM']);
  });
});

describe('HOST', () => {
  test('a HOST that is no address or host name stops start-up before the database is tried', async () => {
    const run = await serveToExit({ DATABASE_URL: await unreachableDatabaseUrl(), BROKER_ISSUERS: 'https://issuer.example', HOST: 'not a host' });
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /^pg-broker: configuration error: HOST: must be an IP address .* \(got "not a host"\)\n$/);
  });
});

describe('against a real PostgreSQL', () => {
  let pgs: TestPostgres;
  before(async () => {
    pgs = await startPostgres();
  });
  after(() => pgs?.stop());
  const env = () => ({ DATABASE_URL: pgs.brokerUrl, BROKER_ISSUERS: 'https://issuer.example', BROKER_SCRAM_ITERATIONS: '1' });
  /** The test cluster's broker URL with `change` applied. */
  const brokerUrlWith = (change: (url: URL) => void) => {
    const url = new URL(pgs.brokerUrl);
    change(url);
    return url.toString();
  };

  test('a DATABASE_URL that cannot log in stops start-up with one line naming it, its user, address and database, never the password', async () => {
    const where = `user broker at 127.0.0.1:${pgs.port}, database`;
    const cases: Array<[string, string]> = [
      [brokerUrlWith((u) => { u.password = PASSWORD; }), `${where} broker): password authentication failed for user "broker"`],
      [brokerUrlWith((u) => { u.password = PASSWORD; u.pathname = '/nosuchdb'; }), `${where} nosuchdb): password authentication failed for user "broker"`],
      [brokerUrlWith((u) => { u.pathname = '/nosuchdb'; }), `${where} nosuchdb): database "nosuchdb" does not exist`],
      [brokerUrlWith((u) => { u.password = PASSWORD; u.search = '?sslrootcert=/nonexistent/root.crt'; }), `${where} broker): ENOENT: no such file or directory, open '/nonexistent/root.crt'`],
    ];
    const secret = new URL(pgs.brokerUrl).password;
    for (const [url, reason] of cases) {
      const run = await serveToExit({ ...env(), DATABASE_URL: url });
      assert.equal(run.code, 1, run.stderr);
      assert.equal(run.stderr, `pg-broker: DATABASE_URL (${reason}\n`);
      assert.ok(!run.stderr.includes(PASSWORD) && !run.stderr.includes(secret), 'no password');
    }
  });

  test('the retry line names the address it retries, also when the connection is cut rather than refused', async (t) => {
    // Accepts and hangs up at once, as a proxy in front of a PostgreSQL that is not up yet does.
    const cutter = net.createServer((socket) => socket.destroy());
    await new Promise<void>((resolve) => cutter.listen(0, '127.0.0.1', resolve));
    t.after(() => new Promise((resolve) => cutter.close(resolve)));
    const cutPort = (cutter.address() as net.AddressInfo).port;
    const refused = await unreachableDatabaseUrl();
    for (const [url, address, message] of [
      // A hang-up reads as either, depending on whether the startup packet got there first (RST).
      [`postgres://broker:${PASSWORD}@127.0.0.1:${cutPort}/broker`, `127.0.0.1:${cutPort}`, /Connection terminated unexpectedly|ECONNRESET/],
      [refused, new URL(refused).host, /ECONNREFUSED/],
    ] as const) {
      const broker = await spawnWaiting({ DATABASE_URL: url, BROKER_ISSUERS: 'https://issuer.example' });
      const line = await waitFor('a retry line', async () => broker.logged('PostgreSQL is not reachable yet; retrying')[0]);
      assert.equal(line.variable, 'DATABASE_URL');
      assert.equal(line.address, address);
      assert.match(line.err.message, message);
      await broker.kill();
      assertNoPassword(broker);
    }
  });

  test('PORT taken: one line naming PORT, exit 1; a free one serves', async (t) => {
    const good = await spawnBroker({ ...BASE, ...env() });
    started.push(good);
    await good.kill();
    const port = await takenPort(t);
    const taken = await spawnBroker({ ...BASE, ...env() }, { port, noWait: true });
    started.push(taken);
    assert.deepEqual(await taken.exited, { code: 1, signal: null });
    assert.deepEqual(taken.stderr, [`pg-broker: PORT ${port} is already in use on 127.0.0.1 (EADDRINUSE)`]);
  });

  test('BROKER_METRICS_PORT taken: one line naming BROKER_METRICS_PORT; a free one serves /metrics', async (t) => {
    const port = await takenPort(t);
    const taken = await spawnWaiting({ ...env(), BROKER_METRICS_PORT: String(port) });
    assert.deepEqual(await taken.exited, { code: 1, signal: null });
    assert.deepEqual(taken.stderr, [`pg-broker: BROKER_METRICS_PORT ${port} is already in use on 127.0.0.1 (EADDRINUSE)`]);

    const metricsPort = await freePort();
    const good = await spawnBroker({ ...BASE, ...env(), BROKER_METRICS_PORT: String(metricsPort) });
    started.push(good);
    const scraped = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
    assert.equal(scraped.status, 200);
    await good.kill();
  });
});
