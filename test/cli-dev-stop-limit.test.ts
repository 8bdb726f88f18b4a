// `pg-broker dev` stopping while a client holds a request open: a POST /credentials that sent its
// headers and part of its body, then went quiet. The broker's close waits for requests in progress,
// and nothing else would ever end this one. dev gives up on the broker after serve's drain limit
// (or at a second signal), stops the rest, PostgreSQL above all, and exits 1. The tests run in order
// on one --dir: the first makes the cluster.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, test } from 'node:test';
import { DRAIN_LIMIT_MS } from '../src/server.js';
import { waitFor } from './helpers/broker.js';
import { BIN } from './helpers/cli.js';
import { postmasterPid as pidOf, running } from './helpers/postmaster.js';
import { freePort } from './helpers/ports.js';
import { sleep, spawnWatched, type WatchedProcess } from './helpers/process.js';

const home = await mkdtemp(path.join(os.tmpdir(), 'pgcb-cli-dev-stop-'));
// Run as root, the server's OS user must reach --dir, or the cluster is moved out of sight.
await chmod(home, 0o755);
const pidFile = path.join(home, 'dev', 'postgres', 'data', 'postmaster.pid');
const ports = { broker: await freePort(), pg: await freePort(), issuer: await freePort() };
const args = ['dev', '--dir', path.join(home, 'dev'), '--port', String(ports.broker), '--pg-port', String(ports.pg), '--issuer-port', String(ports.issuer)];

// A dev that outlives its test is killed, and its server stopped, so that a failing run leaves
// nothing running and the next test starts afresh.
let current: WatchedProcess | undefined;
afterEach(async () => {
  if (current?.alive()) process.kill(current.pid, 'SIGKILL');
  await current?.exited;
  const pid = pidOf(pidFile);
  if (pid && running(pid)) {
    process.kill(pid, 'SIGQUIT');
    await waitFor('the leftover server to exit', async () => !running(pid) || null, 15_000);
  }
});
after(() => rm(home, { recursive: true, force: true }));

async function startDev(): Promise<{ dev: WatchedProcess; postmaster: number }> {
  const dev = current = spawnWatched([BIN, ...args], { PATH: process.env.PATH!, HOME: home }, 120_000);
  await waitFor('the banner', async () => dev.stdout().includes('Try it') || (dev.alive() ? null : assert.fail(`dev exited: ${dev.stderr()}`)), 60_000);
  return { dev, postmaster: pidOf(pidFile)! };
}

const refused = (port: number) => new Promise<boolean>((resolve) => {
  const socket = net.connect(port, '127.0.0.1');
  socket.once('connect', () => { socket.destroy(); resolve(false); });
  socket.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED'));
});

/** A raw connection to the broker that sends `request` and stays open; whatever comes back is collected. */
async function openConnection(request: string): Promise<{ socket: net.Socket; received(): string }> {
  const socket = net.connect(ports.broker, '127.0.0.1');
  let received = '';
  socket.on('data', (d) => (received += d));
  socket.on('error', () => undefined);
  await new Promise((resolve) => socket.once('connect', resolve));
  socket.write(request);
  return { socket, received: () => received };
}

/** POST /credentials with a valid token, its Content-Length promising 100 bytes and 10 of them sent. */
async function holdRequestOpen(): Promise<net.Socket> {
  const res = await fetch(`http://127.0.0.1:${ports.issuer}/token`, { method: 'POST', body: JSON.stringify({ sub: 'dev:alice' }) });
  const { access_token: token } = await res.json() as { access_token: string };
  const held = await openConnection(`POST /credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${token}\r\n`
    + 'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"ttl": "5');
  // The token is checked before the body is read: an answer now would mean the request is not held.
  await sleep(500);
  assert.equal(held.received(), '', 'the broker is still waiting for the rest of the body');
  return held.socket;
}

/** What a stop that gave up on the broker must still have done: PostgreSQL and every port gone. */
async function assertRestStopped(postmaster: number): Promise<void> {
  assert.equal(running(postmaster), false, `the postmaster (pid ${postmaster}) has exited`);
  assert.equal(existsSync(pidFile), false, 'PostgreSQL shut down, removing its postmaster.pid');
  for (const port of [ports.pg, ports.issuer, ports.broker]) assert.ok(await refused(port), `port ${port} is closed`);
}

/** `exited`, or a failure naming the output once `ms` has passed without it. */
async function exitWithin(dev: WatchedProcess, ms: number) {
  const status = await Promise.race([dev.exited, sleep(ms).then(() => null)]);
  return status ?? assert.fail(`dev still running ${ms} ms after the signal; stderr: ${dev.stderr()}`);
}

test('an idle kept-alive connection does not hold the stop: SIGINT exits 0 promptly, nothing printed', async () => {
  const { dev, postmaster } = await startDev();
  const idle = await openConnection('GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n');
  await waitFor('the health answer', async () => idle.received().includes('\r\n\r\n') || null, 5_000);
  assert.match(idle.received(), /^HTTP\/1\.1 200 /);
  const signalled = Date.now();
  process.kill(dev.pid, 'SIGINT');
  assert.deepEqual(await exitWithin(dev, 10_000), { code: 0, signal: null }, dev.stderr());
  assert.ok(Date.now() - signalled < 10_000, `stopped in ${Date.now() - signalled} ms`);
  assert.equal(dev.stderr(), '');
  await assertRestStopped(postmaster);
  idle.socket.destroy();
});

test('a request held open: dev gives up on the broker after the drain limit, stops PostgreSQL and exits 1', async () => {
  const { dev, postmaster } = await startDev();
  const held = await holdRequestOpen();
  const signalled = Date.now();
  process.kill(dev.pid, 'SIGINT');
  // PostgreSQL's own stop takes well under a second here; it is killed after 10 s at worst.
  assert.deepEqual(await exitWithin(dev, DRAIN_LIMIT_MS + 12_000), { code: 1, signal: null }, dev.stderr());
  const took = Date.now() - signalled;
  assert.ok(took >= DRAIN_LIMIT_MS - 500, `dev waited for the broker up to the limit (exited after ${took} ms)`);
  assert.match(dev.stderr(), new RegExp(`^pg-broker dev: the broker did not stop within ${DRAIN_LIMIT_MS / 1000} s .*; stopping the dev issuer, PostgreSQL without it$`, 'm'));
  assert.equal(dev.stderr().trim().split('\n').length, 1, `one line: ${dev.stderr()}`);
  await assertRestStopped(postmaster);
  assert.equal(held.destroyed || held.readableEnded, true, 'the held connection was ended');
  held.destroy();
});

test('a second SIGINT stops the wait for the broker at once; PostgreSQL is still stopped, exit 1', async () => {
  const { dev, postmaster } = await startDev();
  const held = await holdRequestOpen();
  process.kill(dev.pid, 'SIGINT');
  // The broker's close has begun once its listener refuses new connections.
  await waitFor('the broker to stop listening', async () => (await refused(ports.broker)) || null, 5_000, 20);
  await sleep(300);
  assert.ok(dev.alive(), `dev still waits for the held request: ${dev.stderr()}`);
  const again = Date.now();
  process.kill(dev.pid, 'SIGINT');
  assert.deepEqual(await exitWithin(dev, 12_000), { code: 1, signal: null }, dev.stderr());
  assert.ok(Date.now() - again < 10_000, `exited ${Date.now() - again} ms after the second SIGINT`);
  assert.match(dev.stderr(), /^pg-broker dev: SIGINT while stopping: no longer waiting for the broker to stop; stopping the dev issuer, PostgreSQL without it$/m);
  await assertRestStopped(postmaster);
  held.destroy();
});
