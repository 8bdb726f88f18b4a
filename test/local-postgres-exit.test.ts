// A process that embeds PostgreSQL (the demo, a test run, `pg-broker dev`) and is ended by a signal
// while its server is still coming up: the server must not outlive it. The exit clean-up learns of
// the server process as soon as it is spawned, not once it accepts connections.
import assert from 'node:assert/strict';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { waitFor } from './helpers/broker.js';
import { postmasterPid as pidOf, running } from './helpers/postmaster.js';
import { freePort } from './helpers/ports.js';
import { spawnWatched } from './helpers/process.js';

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

const postmasterPid = () => pidOf(pidFile);

const leftovers: number[] = [];
after(async () => {
  for (const pid of leftovers) if (running(pid)) process.kill(pid, 'SIGQUIT');
  await rm(home, { recursive: true, force: true });
});

test('SIGTERM while the embedded server comes up: the process ends by it, and its server stops too', async () => {
  // The signal must land between the server's spawn and its readiness; a trial where the embedding
  // process reported ready first proves nothing about that window, and another is run.
  for (let attempt = 1; ; attempt++) {
    const child = spawnWatched(['--import', 'tsx', '--input-type=module', '-e', script], process.env, 90_000);
    const postmaster = await waitFor('postmaster.pid', async () => postmasterPid()
      ?? (child.alive() ? null : assert.fail(`the embedding process exited: ${child.stderr()}`)), 60_000, 5);
    leftovers.push(postmaster);
    process.kill(child.pid, 'SIGTERM');
    // Ended by the signal, as without the clean-up: it is re-raised once the server is told to stop.
    assert.deepEqual(await child.exited, { code: null, signal: 'SIGTERM' }, child.stderr());
    await waitFor(`the postmaster (pid ${postmaster}) to exit`, async () => !running(postmaster) || null, 15_000)
      .catch(() => assert.fail(`the server (pid ${postmaster}) outlived the process that started it${child.stdout().includes('ready') ? ' (it was ready before the signal)' : ''}`));
    if (!child.stdout().includes('ready')) return;
    assert.ok(attempt < 4, 'the server was ready before the signal in every trial');
  }
});
