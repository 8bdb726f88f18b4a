import { spawn } from 'node:child_process';
import { once } from 'node:events';
import http from 'node:http';
import path from 'node:path';
import { freePort } from '../../test/helpers/ports.js';
import { compiledEntries } from '../lib/bundle.js';
import { log } from '../lib/log.js';
import * as proc from '../lib/proc.js';
import { DEFAULT_ITERATIONS, ROOT, SETTINGS } from '../lib/settings.js';
import { median } from '../lib/stats.js';
import type { BenchContext } from './context.js';

/**
 * P7: start to ready of `pg-broker serve` as production runs it (the CLI compiled as by `npm run
 * build`, on plain node), and its idle RSS; then through tsx (bin/pg-broker.js, as dev checkouts
 * run it) for comparison.
 */
export async function runStartup(ctx: BenchContext): Promise<void> {
  const { results } = ctx;
  const env = ctx.brokerEnv(DEFAULT_ITERATIONS);
  const series = async (entry: string) => {
    const runs: Array<{ ms: number; idleRssMb: number }> = [];
    for (let i = 0; i < SETTINGS.startupRuns; i++) runs.push(await timeStartup(env, entry));
    return { runsMs: runs.map((r) => r.ms), medianMs: median(runs.map((r) => r.ms)), idleRssMb: median(runs.map((r) => r.idleRssMb)) };
  };
  const compiled = await series((await compiledEntries()).cli);
  log(`start to ready, compiled: ${compiled.runsMs.map((ms) => ms.toFixed(0)).join(', ')} ms; idle RSS ${compiled.idleRssMb.toFixed(0)} MB`);
  const tsx = await series(path.join(ROOT, 'bin/pg-broker.js'));
  log(`start to ready through tsx: ${tsx.runsMs.map((ms) => ms.toFixed(0)).join(', ')} ms; idle RSS ${tsx.idleRssMb.toFixed(0)} MB`);
  results.startup = { entry: 'compiled', ...compiled, tsx };
}

/**
 * Spawns `node <entry> serve` and times it until GET /readyz answers 200; then, after a short
 * pause, reads its idle RSS.
 */
async function timeStartup(env: Record<string, string>, entry: string): Promise<{ ms: number; idleRssMb: number }> {
  const port = await freePort();
  const start = performance.now();
  const child = spawn(process.execPath, [entry, 'serve'], {
    cwd: ROOT,
    env: { ...env, PORT: String(port) },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  const stderr: string[] = [];
  child.stderr!.on('data', (c: Buffer) => stderr.push(c.toString()));
  const exited = once(child, 'exit');
  try {
    const deadline = start + 30_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`${path.basename(entry)} serve exited ${child.exitCode}: ${stderr.join('').slice(-500)}`);
      const status = await new Promise<number>((resolve) => {
        const req = http.get({ host: '127.0.0.1', port, path: '/readyz', timeout: 1000, agent: false }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on('error', () => resolve(0));
        req.on('timeout', () => {
          req.destroy();
          resolve(0);
        });
      });
      if (status === 200) {
        const ms = performance.now() - start;
        await new Promise((r) => setTimeout(r, 500));
        return { ms, idleRssMb: proc.memoryMb(child.pid!).rss };
      }
      if (performance.now() > deadline) throw new Error(`${path.basename(entry)} serve not ready after 30 s`);
      await new Promise((r) => setTimeout(r, 5));
    }
  } finally {
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
}
