// A stop signal during start-up, once start-up has opened something (the pool, the listeners,
// the reaper): it is closed as a normal drain closes it, and the process says so and exits 0.
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { loadConfig } from '../src/config.js';
import { createLogger } from '../src/logger.js';
import { startBroker, StartupStopped } from '../src/server.js';
import { waitFor } from './helpers/broker.js';
import { freePort } from './helpers/ports.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { spawnBroker, type BrokerProcess } from './helpers/process.js';

// The frontend's Terminate message: a connection that ends with it was closed by pg's end().
const TERMINATE = Buffer.from([0x58, 0, 0, 0, 4]);
const MIGRATION_APP = Buffer.from('pg-credential-broker migrate\0');

interface HoldingRelay {
  port: number;
  /** Resolves when a query from a connection opened after the migration's is being held. */
  holding: Promise<void>;
  release(): void;
  /** Per connection, once closed: whether the broker ended it with Terminate. */
  ends: boolean[];
  opened: number;
  close(): Promise<void>;
}

/**
 * A relay to PostgreSQL that lets the broker connect and migrate, then holds the first query of
 * every connection opened after the migration's connection closed (the pool's, for the start-up
 * checks) until release(): start-up stands still at that step, on the broker's real code.
 */
async function holdingRelay(targetPort: number): Promise<HoldingRelay> {
  let migrated = false;
  let released = false;
  const waiting: Array<() => void> = [];
  let held!: () => void;
  const holding = new Promise<void>((resolve) => { held = resolve; });
  const sockets = new Set<net.Socket>();
  const relay: HoldingRelay = {
    port: 0, holding, ends: [], opened: 0,
    release() {
      released = true;
      for (const go of waiting.splice(0)) go();
    },
    close: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
  const server = net.createServer((client) => {
    relay.opened += 1;
    const holdQuery = migrated && !released;
    const upstream = net.connect(targetPort, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('error', () => undefined);
      s.on('close', () => sockets.delete(s));
    }
    let isMigration = false;
    let first = true;
    let queued: Buffer[] | null = null;
    let tail = Buffer.alloc(0);
    client.on('data', (d: Buffer) => {
      if (first) isMigration = d.includes(MIGRATION_APP);
      first = false;
      tail = Buffer.concat([tail, d]).subarray(-TERMINATE.length);
      // A simple query ('Q') or a parse ('P') is the first thing sent after the handshake.
      if (holdQuery && queued === null && !released && (d[0] === 0x51 || d[0] === 0x50)) {
        queued = [];
        waiting.push(() => { for (const chunk of queued!) upstream.write(chunk); queued = null; });
        held();
      }
      if (queued) queued.push(d);
      else upstream.write(d);
    });
    upstream.on('data', (d) => client.write(d));
    upstream.on('close', () => client.destroy());
    client.on('close', () => {
      relay.ends.push(tail.equals(TERMINATE));
      upstream.end();
      if (isMigration) migrated = true;
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  relay.port = (server.address() as net.AddressInfo).port;
  return relay;
}

let pgs: TestPostgres;
before(async () => {
  pgs = await startPostgres();
});
after(() => pgs?.stop());

const started: BrokerProcess[] = [];
after(() => Promise.all(started.map((b) => b.kill())));

describe('pg-broker serve and a signal during start-up', () => {
  async function serveThrough(relay: HoldingRelay, noWait: boolean): Promise<BrokerProcess> {
    const url = new URL(pgs.brokerUrl);
    url.port = String(relay.port);
    const broker = await spawnBroker({
      DATABASE_URL: url.toString(), BROKER_ISSUERS: 'https://issuer.example', BROKER_AUDIENCE: 'pg-broker',
      // Generous, so the held query is not cut short by the broker itself however slow the machine.
      BROKER_QUERY_TIMEOUT: '3600',
    }, { noWait });
    started.push(broker);
    return broker;
  }

  test('SIGTERM while start-up checks the database: the step ends, the pool closes cleanly, exit 0 saying what was closed', async (t) => {
    const relay = await holdingRelay(pgs.port);
    t.after(() => relay.close());
    const broker = await serveThrough(relay, true);
    await relay.holding;
    // Not kill(), which waits for the exit: the broker is to wait for the held step first.
    process.kill(broker.pid, 'SIGTERM');
    await waitFor('the shutdown to begin', async () => broker.logged('shutting down before start-up finished').length > 0 || !broker.alive() || null);
    relay.release();
    assert.deepEqual(await broker.exited, { code: 0, signal: null });
    assert.deepEqual(broker.logged('shutting down before start-up finished').map((l) => l.signal), ['SIGTERM']);
    assert.deepEqual(broker.logged('start-up stopped by a signal').map((l) => [l.signal, l.closed]), [['SIGTERM', ['database pool']]]);
    assert.deepEqual(broker.logged('pg-credential-broker listening'), []);
    await waitFor('every connection to close', async () => relay.ends.length === relay.opened || null);
    assert.ok(relay.opened >= 3, `connected, migrated and opened the pool (${relay.opened} connections)`);
    assert.deepEqual(relay.ends, relay.ends.map(() => true), 'every connection was ended by the broker, none dropped with the process');
  });

  test('without a signal, the same start-up through the relay serves, and SIGTERM drains it as cleanly', async (t) => {
    const relay = await holdingRelay(pgs.port);
    t.after(() => relay.close());
    relay.release();
    const broker = await serveThrough(relay, false);
    assert.equal(broker.logged('pg-credential-broker listening').length, 1);
    assert.deepEqual(await broker.kill('SIGTERM'), { code: 0, signal: null });
    assert.deepEqual(broker.logged('shutting down').map((l) => l.signal), ['SIGTERM']);
    await waitFor('every connection to close', async () => relay.ends.length === relay.opened || null);
    assert.deepEqual(relay.ends, relay.ends.map(() => true));
  });
});

describe('startBroker and an abort once it listens', () => {
  async function settings() {
    const [port, metricsPort] = [await freePort(), await freePort()];
    const config = loadConfig({
      DATABASE_URL: pgs.brokerUrl, BROKER_ISSUERS: 'https://issuer.example', BROKER_AUDIENCE: 'pg-broker',
      HOST: '127.0.0.1', PORT: String(port), BROKER_METRICS_PORT: String(metricsPort),
    });
    return { config, port, metricsPort };
  }
  const refused = async (port: number) => {
    const answer = await fetch(`http://127.0.0.1:${port}/healthz`).then((r) => r.status, (err: { cause?: { code?: string } }) => err.cause?.code);
    return answer === 'ECONNREFUSED';
  };
  const brokerSessions = async () => (await pgs.query(`SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = 'pg-credential-broker'`))[0].n;

  test('aborted as the API listener comes up: start-up rejects after closing both listeners, the reaper and the pool', async () => {
    const { config, port, metricsPort } = await settings();
    const stop = new AbortController();
    // Fastify logs this once the socket listens, before listen() resolves: the earliest moment a
    // signal could come with the API listener open.
    const logger = createLogger('info', { write: (line: string) => { if (line.includes('Server listening at')) stop.abort('SIGTERM'); } });
    let served: Awaited<ReturnType<typeof startBroker>> | undefined;
    try {
      await assert.rejects(startBroker(config, { logger, signal: stop.signal }).then((b) => { served = b; }), (err: unknown) => {
        assert.ok(err instanceof StartupStopped, String(err));
        assert.deepEqual(err.closed, ['database pool', 'metrics listener', 'reaper', 'API listener']);
        assert.equal(err.closeFailure, undefined);
        return true;
      });
    } finally {
      await served?.close();
    }
    assert.equal(stop.signal.aborted, true, 'the abort came while starting');
    assert.ok(await refused(port), 'the API listener is closed');
    assert.ok(await refused(metricsPort), 'the metrics listener is closed');
    await waitFor('the pool\'s sessions to end', async () => (await brokerSessions()) === 0 || null);
  });

  test('with no abort, the same start-up serves both ports', async () => {
    const { config, port, metricsPort } = await settings();
    const served = await startBroker(config, { logger: createLogger('silent'), signal: new AbortController().signal });
    try {
      assert.equal((await fetch(`http://127.0.0.1:${port}/healthz`)).status, 200);
      assert.equal((await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).status, 200);
    } finally {
      await served.close();
    }
  });
});
