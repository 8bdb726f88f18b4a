import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { BIN } from './helpers/cli.js';
import { freePort } from './helpers/ports.js';

test('dev exits with the error when a port is taken, having stopped the PostgreSQL it started', async (t) => {
  const home = await mkdtemp(path.join(os.tmpdir(), 'pgcb-cli-dev-'));
  t.after(() => rm(home, { recursive: true, force: true }));
  // Run as root, the server's OS user must reach --dir, or the cluster is moved out of sight.
  await chmod(home, 0o755);
  // The issuer starts after PostgreSQL, so its port being taken fails start-up with PostgreSQL up.
  const taken = net.createServer();
  await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
  t.after(() => taken.close());
  const issuerPort = (taken.address() as net.AddressInfo).port;
  const dir = path.join(home, 'dev');
  const args = ['dev', '--dir', dir, '--port', String(await freePort()), '--pg-port', String(await freePort()), '--issuer-port', String(issuerPort)];

  // A dev that hangs is killed at the timeout, and so has a signal rather than an exit code.
  const run = await new Promise<{ code: number | null; signal: string | null; stderr: string }>((resolve) => {
    execFile(process.execPath, [BIN, ...args], { env: { PATH: process.env.PATH!, HOME: home }, timeout: 30_000 }, (err, _stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, signal: err?.signal ?? null, stderr });
    });
  });
  assert.equal(run.signal, null, `dev exited by itself rather than hanging until killed: ${run.stderr}`);
  assert.equal(run.code, 1, run.stderr);
  assert.match(run.stderr, new RegExp(`^pg-broker: listen EADDRINUSE: address already in use 127\\.0\\.0\\.1:${issuerPort}$`, 'm'));
  // PostgreSQL did start (its cluster is there) and was shut down, which removes its pid file.
  assert.ok(existsSync(path.join(dir, 'postgres', 'data', 'PG_VERSION')), 'PostgreSQL had been started');
  assert.equal(existsSync(path.join(dir, 'postgres', 'data', 'postmaster.pid')), false, 'PostgreSQL was stopped');
});
