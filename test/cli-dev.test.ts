import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { BIN } from './helpers/cli.js';
import { freePort } from './helpers/ports.js';

test('dev exits naming the option when a port is taken, having stopped the PostgreSQL it started', async (t) => {
  const home = await mkdtemp(path.join(os.tmpdir(), 'pgcb-cli-dev-'));
  t.after(() => rm(home, { recursive: true, force: true }));
  // Run as root, the server's OS user must reach --dir, or the cluster is moved out of sight.
  await chmod(home, 0o755);
  // The issuer starts after PostgreSQL, so its port being taken fails start-up with PostgreSQL up.
  const taken = net.createServer();
  await new Promise<void>((r) => taken.listen(0, '127.0.0.1', r));
  t.after(() => taken.close());
  const takenPort = (taken.address() as net.AddressInfo).port;
  const dir = path.join(home, 'dev');
  const pgPort = String(await freePort());

  // A dev that hangs is killed at the timeout, and so has a signal rather than an exit code.
  const dev = (port: number, issuerPort: number, postgresPort = pgPort) => new Promise<{ code: number | null; signal: string | null; stderr: string }>((resolve) => {
    const args = ['dev', '--dir', dir, '--port', String(port), '--pg-port', postgresPort, '--issuer-port', String(issuerPort)];
    execFile(process.execPath, [BIN, ...args], { env: { PATH: process.env.PATH!, HOME: home }, timeout: 60_000 }, (err, _stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : null) : 0, signal: err?.signal ?? null, stderr });
    });
  });
  // The error names dev's own option for the port: the issuer's, then the broker's.
  for (const [option, run] of [['--issuer-port', await dev(await freePort(), takenPort)], ['--port', await dev(takenPort, await freePort())]] as const) {
    assert.equal(run.signal, null, `dev exited by itself rather than hanging until killed: ${run.stderr}`);
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, new RegExp(`^pg-broker: ${option} ${takenPort} is already in use on 127\\.0\\.0\\.1; choose another \\(EADDRINUSE\\)$`, 'm'));
    // PostgreSQL did start (its cluster is there) and was shut down, which removes its pid file.
    assert.ok(existsSync(path.join(dir, 'postgres', 'data', 'PG_VERSION')), 'PostgreSQL had been started');
    assert.equal(existsSync(path.join(dir, 'postgres', 'data', 'postmaster.pid')), false, 'PostgreSQL was stopped');
  }
  // PostgreSQL's own port, in the same words, before anything else starts.
  const run = await dev(await freePort(), await freePort(), String(takenPort));
  assert.deepEqual([run.signal, run.code], [null, 1], run.stderr);
  assert.match(run.stderr, new RegExp(`^pg-broker: --pg-port ${takenPort} is already in use on 127\\.0\\.0\\.1; choose another \\(EADDRINUSE\\)$`, 'm'));
});

test('dev serves, and a restart keeps the "dev" policy as it was edited', async (t) => {
  const home = await mkdtemp(path.join(os.tmpdir(), 'pgcb-cli-dev-ok-'));
  t.after(() => rm(home, { recursive: true, force: true }));
  await chmod(home, 0o755);
  const ports = { broker: await freePort(), pg: await freePort(), issuer: await freePort() };
  const args = ['dev', '--dir', path.join(home, 'dev'), '--port', String(ports.broker), '--pg-port', String(ports.pg), '--issuer-port', String(ports.issuer)];
  const broker = `http://127.0.0.1:${ports.broker}`;
  const issuer = `http://127.0.0.1:${ports.issuer}`;

  /** Starts dev, waits for its banner, runs `fn`, then stops it with SIGINT and waits for it to exit. */
  const session = async (fn: (banner: string) => Promise<void>) => {
    const child = spawn(process.execPath, [BIN, ...args], { env: { PATH: process.env.PATH!, HOME: home }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const bound = setTimeout(() => child.kill('SIGKILL'), 120_000);
    try {
      while (!out.includes('Try it')) {
        if (child.exitCode !== null) assert.fail(`dev exited early: ${err}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      await fn(out);
    } finally {
      child.kill('SIGINT');
      assert.equal(await exited, 0, err);
      clearTimeout(bound);
    }
  };
  const mint = async (sub: string) => ((await (await fetch(`${issuer}/token`, { method: 'POST', body: JSON.stringify({ sub }) })).json()) as { access_token: string }).access_token;
  const policy = async () => (await fetch(`${broker}/policies/dev`, { headers: { authorization: `Bearer ${await mint('admin:test')}` } })).json() as Promise<Record<string, unknown>>;

  await session(async (banner) => {
    assert.match(banner, /policy "dev" admitting sub dev:\*/);
    const cred = await fetch(`${broker}/credentials`, { method: 'POST', headers: { authorization: `Bearer ${await mint('dev:alice')}` } });
    assert.equal(cred.status, 201, await cred.clone().text());
    const seeded = await policy();
    const edited = await fetch(`${broker}/policies/dev`, {
      method: 'PUT',
      headers: { authorization: `Bearer ${await mint('admin:test')}`, 'content-type': 'application/json' },
      body: JSON.stringify({ issuer: seeded.issuer, grant_role: seeded.grant_role, database: seeded.database, claims: { sub: 'dev:alice' }, description: 'edited by hand' }),
    });
    assert.equal(edited.status, 200, await edited.clone().text());
  });
  await session(async (banner) => {
    assert.match(banner, /policy "dev" as you left it/);
    const kept = await policy();
    assert.deepEqual([kept.description, kept.claims], ['edited by hand', { sub: 'dev:alice' }]);
  });
});
