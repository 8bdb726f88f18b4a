import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { freePort } from '../../test/helpers/ports.js';
import { log } from '../lib/log.js';
import * as proc from '../lib/proc.js';
import { DEFAULT_ITERATIONS, ROOT, SETTINGS } from '../lib/settings.js';
import { median } from '../lib/stats.js';
import type { BenchContext } from './context.js';

/** P7: start to ready of `pg-broker serve`, and its idle RSS; through tsx, and bundled for comparison. */
export async function runStartup(ctx: BenchContext): Promise<void> {
  const { results } = ctx;
  const env = ctx.brokerEnv(DEFAULT_ITERATIONS);
  const runs: Array<{ ms: number; idleRssMb: number }> = [];
  for (let i = 0; i < SETTINGS.startupRuns; i++) runs.push(await timeStartup(env));
  results.startup = { runsMs: runs.map((r) => r.ms), medianMs: median(runs.map((r) => r.ms)), idleRssMb: median(runs.map((r) => r.idleRssMb)) };
  log(`start to ready: ${runs.map((r) => r.ms.toFixed(0)).join(', ')} ms; idle RSS ${(results.startup.idleRssMb ?? 0).toFixed(0)} MB`);
  const bundle = await bundleCli().catch((err: Error) => {
    log(`no bundled comparison: ${err.message}`);
    return null;
  });
  if (bundle) {
    try {
      const b: Array<{ ms: number; idleRssMb: number }> = [];
      for (let i = 0; i < SETTINGS.startupRuns; i++) b.push(await timeStartup(env, bundle.entry));
      results.startup.bundled = { runsMs: b.map((r) => r.ms), medianMs: median(b.map((r) => r.ms)), idleRssMb: median(b.map((r) => r.idleRssMb)) };
      log(`start to ready, bundled to plain JS: ${b.map((r) => r.ms.toFixed(0)).join(', ')} ms; idle RSS ${results.startup.bundled.idleRssMb.toFixed(0)} MB`);
    } finally {
      fs.rmSync(bundle.dir, { recursive: true, force: true });
    }
  }
}

/**
 * Spawns `node <entry> serve` and times it until GET /readyz answers 200; then, after a short
 * pause, reads its idle RSS.
 */
async function timeStartup(env: Record<string, string>, entry = path.join(ROOT, 'bin/pg-broker.js')): Promise<{ ms: number; idleRssMb: number }> {
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

/**
 * For comparison only: the same CLI bundled to plain JavaScript with esbuild (installed with
 * tsx), so start-up and memory without the tsx loader can be measured. Null when esbuild is
 * not there. The bundle lives in a temp dir with node_modules and migrations linked in.
 */
async function bundleCli(): Promise<{ entry: string; dir: string } | null> {
  const esbuild = path.join(ROOT, 'node_modules/.bin/esbuild');
  if (!fs.existsSync(esbuild)) return null;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgcb-bundle-'));
  await new Promise<void>((resolve, reject) => {
    const child = spawn(esbuild, [path.join(ROOT, 'src/cli/index.ts'), '--bundle', '--platform=node', '--format=esm', '--packages=external',
      `--outfile=${path.join(dir, 'src/cli/index.mjs')}`, '--log-level=error'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (c: Buffer) => (err += c.toString()));
    child.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`esbuild exited ${code}: ${err.slice(-300)}`))));
  });
  fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'));
  fs.symlinkSync(path.join(ROOT, 'migrations'), path.join(dir, 'migrations'));
  const entry = path.join(dir, 'bin.mjs');
  fs.writeFileSync(entry, "const { main } = await import('./src/cli/index.mjs');\nawait main(process.argv);\n");
  return { entry, dir };
}
