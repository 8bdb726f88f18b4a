// `pg-broker dev` and a stop signal sent to it alone (`kill -INT <pid>`, a supervisor; not the
// terminal's Ctrl-C, which reaches PostgreSQL as well) while it is still starting: start-up stops,
// whatever had started (PostgreSQL above all) is stopped, and dev says so and exits 0. The tests
// run in order on one --dir: the first makes the cluster, the last needs its broker database.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, test } from 'node:test';
import pg from 'pg';
import { MIGRATION_LOCK_KEY } from '../src/postgres/migrate.js';
import { waitFor } from './helpers/broker.js';
import { postmasterPid as pidOf, running } from './helpers/postmaster.js';
import { BIN } from './helpers/cli.js';
import { freePort } from './helpers/ports.js';
import { spawnWatched, type WatchedProcess } from './helpers/process.js';

const home = await mkdtemp(path.join(os.tmpdir(), 'pgcb-cli-dev-signal-'));
// Run as root, the server's OS user must reach --dir, or the cluster is moved out of sight.
await chmod(home, 0o755);
const clusterDir = path.join(home, 'dev', 'postgres');
const pidFile = path.join(clusterDir, 'data', 'postmaster.pid');
const ports = { broker: await freePort(), pg: await freePort(), issuer: await freePort() };
const args = ['dev', '--dir', path.join(home, 'dev'), '--port', String(ports.broker), '--pg-port', String(ports.pg), '--issuer-port', String(ports.issuer)];

const postmasterPid = () => pidOf(pidFile);

const refused = (port: number) => new Promise<boolean>((resolve) => {
  const socket = net.connect(port, '127.0.0.1');
  socket.once('connect', () => { socket.destroy(); resolve(false); });
  socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED'));
});

// A server that dev left behind (as it did before it listened for signals during start-up) is
// stopped after each test, so that the next one starts as if it had not, and a failing run leaves
// nothing running.
afterEach(async () => {
  const pid = postmasterPid();
  if (pid && running(pid)) {
    process.kill(pid, 'SIGQUIT');
    await waitFor('the leftover server to exit', async () => !running(pid) || null, 15_000);
  }
});
after(() => rm(home, { recursive: true, force: true }));

type DevRun = WatchedProcess;

// A dev that hangs is killed, and then shows a signal rather than an exit code.
const startDev = (): DevRun => spawnWatched([BIN, ...args], { PATH: process.env.PATH!, HOME: home }, 90_000);

/** Asserts that dev exited by itself with 0, stopped its PostgreSQL and closed its ports. */
async function assertStoppedCleanly(dev: DevRun, postmaster: number): Promise<void> {
  assert.deepEqual(await dev.exited, { code: 0, signal: null }, dev.stderr());
  assert.equal(running(postmaster), false, `the postmaster (pid ${postmaster}) has exited`);
  assert.equal(existsSync(pidFile), false, 'PostgreSQL shut down, removing its postmaster.pid');
  for (const port of [ports.pg, ports.issuer, ports.broker]) assert.ok(await refused(port), `port ${port} is closed`);
}

test('SIGINT while PostgreSQL is coming up: dev waits for it, stops it and exits 0 naming the signal', async () => {
  const dev = startDev();
  // The pid file is written as the server begins to start, well before the banner; the first start
  // also runs initdb, before that.
  const postmaster = await waitFor('postmaster.pid', async () => postmasterPid() ?? (dev.alive() ? null : assert.fail(`dev exited: ${dev.stderr()}`)), 60_000, 10);
  process.kill(dev.pid, 'SIGINT');
  await assertStoppedCleanly(dev, postmaster);
  // Start-up ends at the first step after the signal: that is PostgreSQL, unless the machine was so
  // slow that the step after it had begun.
  assert.match(dev.stderr(), /^pg-broker dev: start-up stopped by SIGINT; stopped (the dev issuer, )?PostgreSQL$/m);
  assert.doesNotMatch(dev.stdout(), /Try it/);
});

test('a start after that serves, and SIGINT stops it as before: exit 0, nothing printed', async () => {
  const dev = startDev();
  await waitFor('the banner', async () => dev.stdout().includes('Try it') || (dev.alive() ? null : assert.fail(`dev exited: ${dev.stderr()}`)), 60_000);
  const postmaster = postmasterPid()!;
  assert.equal((await fetch(`http://127.0.0.1:${ports.broker}/healthz`)).status, 200);
  process.kill(dev.pid, 'SIGINT');
  await assertStoppedCleanly(dev, postmaster);
  assert.equal(dev.stderr(), '');
});

test('SIGTERM while the broker waits to migrate: start-up stops at once, the issuer and PostgreSQL are stopped, exit 0', async () => {
  const password = readFileSync(path.join(clusterDir, 'superuser.pw'), 'utf8').trim();
  // The migration lock, taken before dev's broker asks for it, holds start-up at that step. dev
  // seeds its cluster before migrating, which leaves the test time to connect first; should dev
  // ever get there first anyway, that run is stopped and another tried.
  for (let attempt = 1; ; attempt++) {
    const dev = startDev();
    const holder = await waitFor('PostgreSQL to accept the test', async () => {
      if (!dev.alive()) assert.fail(`dev exited: ${dev.stderr()}`);
      const client = new pg.Client({ host: '127.0.0.1', port: ports.pg, user: 'postgres', password, database: 'broker' });
      client.on('error', () => undefined);
      return client.connect().then(() => client, () => null);
    }, 60_000, 10);
    try {
      await holder.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK_KEY]);
      const waiting = await waitFor('the migration to wait for the lock, or the banner', async () => {
        if (dev.stdout().includes('Try it')) return 'banner';
        const { rowCount } = await holder.query(`SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-credential-broker migrate' AND wait_event_type = 'Lock'`);
        return rowCount ? 'migration' : null;
      }, 30_000, 20);
      const postmaster = postmasterPid()!;
      process.kill(dev.pid, waiting === 'migration' ? 'SIGTERM' : 'SIGINT');
      await assertStoppedCleanly(dev, postmaster);
      if (waiting === 'banner') {
        assert.ok(attempt < 3, 'dev got past its migration before the test could hold the lock, three times');
        continue;
      }
      // Nothing of the broker had opened yet; the migration's session ended with PostgreSQL.
      assert.match(dev.stderr(), /^pg-broker dev: start-up stopped by SIGTERM; stopped the dev issuer, PostgreSQL$/m);
      assert.doesNotMatch(dev.stdout(), /Try it/);
      return;
    } finally {
      await holder.end().catch(() => undefined);
    }
  }
});
