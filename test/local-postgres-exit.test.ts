// A process that embeds PostgreSQL (the demo, a test run, `pg-broker dev`) and is ended by a signal
// while its server is still coming up: the server must not outlive it. The exit clean-up learns of
// the server process as soon as it is spawned, not once it accepts connections.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { waitFor } from './helpers/broker.js';
import { freePort } from './helpers/ports.js';

const home = await mkdtemp(path.join(os.tmpdir(), 'pgcb-local-pg-exit-'));
// Run as root, the server's OS user must reach the cluster's dir.
await chmod(home, 0o755);
const clusterDir = path.join(home, 'postgres');
const pidFile = path.join(clusterDir, 'data', 'postmaster.pid');
const port = await freePort();
const module = pathToFileURL(path.resolve('src/dev/embedded-postgres.ts')).href;
const script = `const { startLocalPostgres } = await import(${JSON.stringify(module)});
await startLocalPostgres({ dir: ${JSON.stringify(clusterDir)}, port: ${port} });
console.log('ready');
setInterval(() => {}, 1000);`;

function postmasterPid(): number | null {
  try {
    const pid = Number(readFileSync(pidFile, 'utf8').split('\n')[0]);
    return pid > 0 ? pid : null;
  } catch {
    return null;
  }
}

/** Whether `pid` runs; a zombie nobody has reaped yet does not. */
function running(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}

const leftovers: number[] = [];
after(async () => {
  for (const pid of leftovers) if (running(pid)) process.kill(pid, 'SIGQUIT');
  await rm(home, { recursive: true, force: true });
});

test('SIGTERM while the embedded server comes up: the process ends by it, and its server stops too', async () => {
  // The signal must land between the server's spawn and its readiness; a trial where the embedding
  // process reported ready first proves nothing about that window, and another is run.
  for (let attempt = 1; ; attempt++) {
    const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    const bound = setTimeout(() => child.kill('SIGKILL'), 90_000);
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => {
      clearTimeout(bound);
      resolve({ code, signal });
    }));
    const postmaster = await waitFor('postmaster.pid', async () => postmasterPid()
      ?? (child.exitCode === null ? null : assert.fail(`the embedding process exited: ${err}`)), 60_000, 5);
    leftovers.push(postmaster);
    child.kill('SIGTERM');
    // Ended by the signal, as without the clean-up: it is re-raised once the server is told to stop.
    assert.deepEqual(await exited, { code: null, signal: 'SIGTERM' }, err);
    await waitFor(`the postmaster (pid ${postmaster}) to exit`, async () => !running(postmaster) || null, 15_000)
      .catch(() => assert.fail(`the server (pid ${postmaster}) outlived the process that started it${out.includes('ready') ? ' (it was ready before the signal)' : ''}`));
    if (!out.includes('ready')) return;
    assert.ok(attempt < 4, 'the server was ready before the signal in every trial');
  }
});
