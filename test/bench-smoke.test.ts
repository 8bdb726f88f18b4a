import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { perfProblem } from '../bench/lib/perf.js';
import { PG15_INITDB } from '../bench/scenarios/pg15.js';

/**
 * The benchmark script runs end to end in quick mode and writes a well-formed report. Nothing
 * here looks at how fast anything was: timings on a shared CI machine are not a test.
 */

const ROOT = fileURLToPath(new URL('../', import.meta.url));
// Only a guard against a hung run: the quick run takes well under a minute alone, but shares the
// machine with the rest of the suite.
const TIMEOUT_MS = 300_000;

let dir: string;
let report = '';
let json: any;
let run: { code: number | null; signal: NodeJS.Signals | null; output: string };
// V8 logs in the checkout (a profiling flag turns one on per process): none may be left behind.
const v8Logs = () => readdirSync(ROOT).filter((f) => /^isolate-.*-v8\.log$/.test(f)).sort();
let v8LogsBefore: string[] = [];

before(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'pgcb-bench-'));
  v8LogsBefore = v8Logs();
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith('NODE_TEST')) env[k] = v;
  run = await new Promise((resolve) => {
    const child = spawn(process.execPath, ['--import', 'tsx', 'bench/run.ts'], {
      cwd: ROOT,
      env: { ...env, BENCH_QUICK: '1', BENCH_REPORT: path.join(dir, 'REPORT.md'), BENCH_BASELINE: '' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout.on('data', (c: Buffer) => (output += c.toString()));
    child.stderr.on('data', (c: Buffer) => (output += c.toString()));
    const timer = setTimeout(() => child.kill('SIGTERM'), TIMEOUT_MS);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, output });
    });
  });
  report = await readFile(path.join(dir, 'REPORT.md'), 'utf8').catch(() => '');
  json = JSON.parse(await readFile(path.join(dir, 'REPORT.json'), 'utf8').catch(() => 'null'));
}, { timeout: TIMEOUT_MS + 10_000 });

after(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** The cells of the markdown table row whose first cell is `id`. */
function row(id: string): string[] | undefined {
  const line = report.split('\n').find((l) => l.startsWith(`| ${id} |`));
  return line?.split('|').slice(1, -1).map((c) => c.trim());
}

describe('npm run bench (BENCH_QUICK=1)', () => {
  test('exits 0 within the time bound and writes the report', () => {
    assert.equal(run.signal, null, `bench was killed after ${TIMEOUT_MS} ms:\n${run.output.slice(-2000)}`);
    assert.equal(run.code, 0, `bench exited ${run.code}:\n${run.output.slice(-2000)}`);
    assert.ok(report.length > 0, 'REPORT.md was not written');
    assert.ok(json, 'REPORT.json was not written');
    assert.deepEqual(json.errors, {}, 'every scenario ran');
    assert.deepEqual(v8Logs(), v8LogsBefore, 'no V8 log files left in the checkout');
  });

  test('has a target row for P1 to P7 with a numeric measurement and a verdict', () => {
    for (const id of ['P1', 'P1b', 'P2', 'P3', 'P4', 'P5', 'P6', 'P7']) {
      const cells = row(id);
      assert.ok(cells, `no row for ${id}`);
      assert.equal(cells.length, 5, `${id} row has 5 columns`);
      assert.match(cells[3], /\d/, `${id} has a measured value: ${cells[3]}`);
      assert.doesNotMatch(cells[3], /not measured|NaN/, `${id} was measured: ${cells[3]}`);
      assert.match(cells[4], /\*\*(PASS|MISS)\*\*/, `${id} has a verdict: ${cells[4]}`);
    }
  });

  test('records the environment and the command', () => {
    assert.match(report, /^## Environment$/m);
    for (const item of ['date', 'command', 'Node.js', 'PostgreSQL', 'CPUs', 'fastify', 'pg', '@fastify/jwt', 'fast-jwt']) {
      const cells = row(item);
      assert.ok(cells && cells[1].length > 0, `environment lists ${item}`);
    }
    assert.match(row('command')![1], /BENCH_QUICK=1/);
    assert.match(row('Node.js')![1], /^v\d+\./);
    assert.match(row('PostgreSQL')![1], /PostgreSQL \d+/);
    assert.match(row('CPUs')![1], /^\d+ ×/);
    // The durability sentence follows the settings the server reported, not a fixed text.
    const fsync = row('pg: fsync')?.[1];
    assert.ok(fsync === 'on' || fsync === 'off', `the server's fsync is recorded: ${fsync}`);
    assert.equal(report.includes('**fsync=off'), fsync === 'off');
  });

  test('has the issuance tables at every concurrency level, with the floor ratio', () => {
    assert.equal(json.issuance.length, 2, 'default and tuned verifier settings');
    for (const set of json.issuance) {
      assert.deepEqual(set.levels.map((l: any) => l.connections), [1, 4, 16, 64]);
      for (const l of set.levels) {
        for (const v of [l.floor.rps, l.broker.rps, l.ratio, l.floor.latency.p50, l.broker.latency.p99]) assert.ok(Number.isFinite(v), `finite: ${JSON.stringify(l)}`);
        assert.ok(l.broker.ok > 0 && l.floor.ok > 0);
        assert.equal(l.broker.errors, 0, `every broker answer was a 201: ${JSON.stringify(l.broker.statusCounts ?? {})}`);
        assert.equal(l.floor.errors, 0, `every floor issuance committed: ${l.floor.firstError}`);
        // The idle share of the machine during each side's bursts, from /proc/stat: a fraction.
        for (const cpu of [l.floorCpu, l.brokerCpu]) assert.ok(cpu.idle >= 0 && cpu.idle <= 1, `idle share in [0, 1]: ${JSON.stringify(cpu)}`);
      }
    }
    for (const heading of ['## Issuance: POST /credentials vs the floor', '## Reaping (P4)', '## GET /leases over a large table (P5)', '## JWT verification: RS256 vs ES256 through the full request path', '## Memory (P6) and start-up (P7)']) {
      assert.ok(report.includes(heading), `report has "${heading}"`);
    }
    assert.match(report, /\| 64 \| [\d.]+ \|/);
  });

  test('pools P4 over its drains, each reported on its own', () => {
    const rp = json.reaping;
    assert.equal(rp.drains.length, 2, 'quick mode drains the backlog twice');
    const sum = (f: (d: any) => number) => rp.drains.reduce((s: number, d: any) => s + f(d), 0);
    assert.equal(rp.ended, sum((d) => d.ended), 'the pooled count adds the drains up');
    assert.equal(rp.ended, 2 * rp.backlog, 'each drain ended its whole backlog');
    assert.ok(Math.abs(rp.seconds - sum((d) => d.seconds)) < 1e-6, 'the pooled time adds the drains up');
    // Pooled percentiles come from all drains' requests, so each lies between the drains' own.
    const p99s = rp.drains.map((d: any) => d.earlyP99);
    assert.ok(rp.early.p99 >= Math.min(...p99s) && rp.early.p99 <= Math.max(...p99s), `pooled ${rp.early.p99} within ${p99s}`);
    const table = report.slice(report.indexOf('Each drain on its own:'));
    assert.match(table, /\n\| 1 \| \d+ \|[^\n]*×/);
    assert.match(table, /\n\| 2 \| \d+ \|[^\n]*×/);
  });

  test('times one burst from distinct identities and from a single one, at both iteration counts', () => {
    assert.deepEqual(json.fanout.map((f: any) => f.iterations), [4096, 1]);
    for (const f of json.fanout) {
      // Every request of every burst was answered 201, the single identity's included: its
      // requests queue on one lock rather than fail.
      for (const side of [f.distinct, f.same]) {
        assert.equal(side.errors, 0, JSON.stringify(side.statusCounts));
        assert.equal(side.ok, f.size * f.rounds);
        assert.ok(Number.isFinite(side.rps) && side.rps > 0);
      }
    }
    const section = report.slice(report.indexOf('## Bursts from one identity'));
    assert.ok(report.includes('## Bursts from one identity'), 'the report has the section');
    assert.match(section, /\| 4096 \| one \| \d+ \|[^\n]*\*\*[\d.]+×\*\* \|/);
    assert.match(section, /\| 1 \| one \| \d+ \|/);
  });

  test('runs the floor and the broker with the Docker image\'s UV_THREADPOOL_SIZE', async () => {
    const dockerfile = await readFile(path.join(ROOT, 'Dockerfile'), 'utf8');
    const size = /^\s*UV_THREADPOOL_SIZE=(\d+)/m.exec(dockerfile)?.[1];
    assert.ok(size, 'the Dockerfile sets UV_THREADPOOL_SIZE');
    assert.equal(json.meta.threadpoolSize, size, 'the bench process ran with it');
    assert.ok(report.includes(`UV_THREADPOOL_SIZE=${size} as the broker`), 'the report says so');
    // ...and compares the broker with libuv's default pool of 4, then other database pool sizes,
    // then V8's default young generation instead of the image's, against the floor.
    const nodeOptions = /NODE_OPTIONS="([^"]+)"/.exec(dockerfile)![1];
    const semi16 = nodeOptions.replace(/--max-semi-space-size=\d+/, '--max-semi-space-size=16');
    assert.notEqual(semi16, nodeOptions, 'the image sets its own semi-space size');
    assert.deepEqual(json.threadpool.map((t: any) => [t.size, t.dbPoolSize, t.nodeOptions]),
      [['4', 10, undefined], [size, 10, undefined], [size, 5, undefined], [size, 16, undefined], [size, 10, semi16]]);
    for (const t of json.threadpool) {
      for (const v of [t.floorRps, t.brokerRps, ...t.ratios, t.brokerCpuMs, t.maxRssMb]) assert.ok(Number.isFinite(v) && v > 0, JSON.stringify(t));
    }
    assert.match(report, /^### Runtime settings: libuv pool size, database pool size and young generation$/m);
    assert.ok(report.includes(`| ${size} | 10 | \`${semi16}\` |`), 'the young-generation row names its NODE_OPTIONS');
  });

  test('warms each broker up before measuring it, and reports its CPU per request chunk by chunk', () => {
    assert.equal(json.issuance.length, 2, 'default and tuned');
    for (const set of json.issuance) {
      assert.ok(set.warmup, `iterations ${set.iterations} has a warm-up`);
      assert.ok(set.warmup.requests > 0 && set.warmup.brokerMsPerRequest.length >= 1, JSON.stringify(set.warmup));
      for (const ms of set.warmup.brokerMsPerRequest) assert.ok(Number.isFinite(ms) && ms > 0, JSON.stringify(set.warmup));
    }
    assert.match(report, /^JIT warm-up before these runs \(\d+ credentials at 16 clients, in chunks of \d+\): broker CPU per request [\d.]+( → [\d.]+)* ms\.$/m);
  });

  test('has the on-CPU perf profile of a broker, or says why perf could not take one', () => {
    const p = json.perfProfile;
    assert.ok(p, 'the perf scenario ran');
    assert.match(report, /^### On the CPU only \(Linux perf\)$/m);
    if ('unavailable' in p) {
      // A machine without perf (or without permission to sample) still gets a well-formed report;
      // where perf works, a missing profile is a failure.
      assert.ok(perfProblem() !== null, `perf works here, yet the report has no profile: ${p.unavailable}`);
      assert.ok(report.includes(`Not measured in this run: ${p.unavailable}.`));
      return;
    }
    assert.ok(p.samples > 0 && p.brokerMsPerRequest > 0, JSON.stringify(p));
    const total = p.categories.reduce((a: number, c: { share: number }) => a + c.share, 0);
    assert.ok(Math.abs(total - 1) < 1e-9, `shares add up to 1: ${total}`);
    assert.ok(p.categories.some((c: { thread: string }) => c.thread === 'main'), 'the event loop was sampled');
    assert.match(report, /\| \*\*main thread \(event loop\)\*\* \| \*\*\d+ %\*\* \|/);
  });

  test('repeats P1, P3 and P1b on PostgreSQL 15, or says why it could not', () => {
    const p = json.pg15;
    assert.ok(p, 'the pg15 scenario ran');
    assert.match(report, /^### The same on PostgreSQL 15: P1, P3 and P1b$/m);
    if ('unavailable' in p) {
      assert.ok(!existsSync(PG15_INITDB), `PostgreSQL 15 is installed here, yet the report has no run on it: ${p.unavailable}`);
      assert.ok(report.includes(`Not measured in this run: ${p.unavailable}.`));
      return;
    }
    assert.match(p.postgres, /^PostgreSQL 15\./);
    assert.deepEqual(p.runs.map((x: any) => [x.iterations, x.level.connections]), json.issuance.map((s: any) => [s.iterations, 16]));
    for (const { level: l } of p.runs) {
      assert.ok(l.broker.ok > 0 && l.floor.ok > 0 && Number.isFinite(l.ratio), JSON.stringify(l));
      assert.equal(l.broker.errors, 0, 'every credential request was answered 201');
    }
    assert.match(report, /^On PostgreSQL 15: P1 [\d.]+× \(target ≥ 0\.9×: (pass|miss)\), P3 [\d.]+× \(target ≥ 5×: (pass|miss);/m);
  });

  test('samples RSS over a sustained 64-client run, with and without the image\'s old-generation cap', async () => {
    const dockerfile = await readFile(path.join(ROOT, 'Dockerfile'), 'utf8');
    const nodeOptions = /^\s*NODE_OPTIONS="([^"]*)"/m.exec(dockerfile)?.[1];
    assert.ok(nodeOptions?.includes('--max-old-space-size='), 'the image caps the old generation');
    const sustained = json.memory.sustained;
    assert.deepEqual(sustained.map((x: any) => x.nodeOptions), [nodeOptions, nodeOptions!.replace(/\s*--max-old-space-size=\d+/, '').trim()]);
    for (const x of sustained) {
      assert.ok(x.credentials > 0 && x.errors === 0 && x.maxRssMb > 0 && x.after.rss > 0, JSON.stringify(x));
    }
    // P6 counts the capped (image) run, and the 64-client issuance runs.
    assert.equal(json.memory.maxRssMbAt64, Math.max(...json.memory.perRun, sustained[0].maxRssMb));
    assert.match(report, /^\| `--max-semi-space-size=\d+ --max-old-space-size=\d+` \| \d+ \| \d+ \| \d+ \| \d+ \| \d+ \(\d+\) \|$/m);
  });

  test('shows the lease-listing query plans using an index', () => {
    assert.ok(json.leases.shapes.length > 0);
    for (const shape of json.leases.shapes) for (const plan of shape.plans) assert.ok(plan.indexUsed, `${shape.name}: ${plan.plan}`);
  });
});
