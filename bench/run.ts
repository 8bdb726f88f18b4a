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
 *   BENCH_ONLY=a,b       run only these scenarios (issuance, reaping, threadpool, perf, memory,
 *                        population, profile, jwt, startup, pg15, leases); the others read
 *                        "not measured"
 */
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startIssuer } from '../test/helpers/issuer.js';
import { startPostgres } from '../test/helpers/postgres.js';
import { api } from './lib/api.js';
import { BrokerChild } from './lib/broker.js';
import { machineMeta, recordPostgres } from './lib/environment.js';
import { elapsedSeconds, log } from './lib/log.js';
import { dropIssuedRoles } from './lib/population.js';
import { postmasterPid, quietPostgres } from './lib/postgres.js';
import { writeReport, type Results } from './lib/report.js';
import { DEFAULT_ITERATIONS, JSON_PATH, POLICY, PRODUCTION_ENV, PROFILE, QUICK, REPORT_PATH, ROOT, TUNED_ITERATIONS, wanted } from './lib/settings.js';
import { createContext } from './scenarios/context.js';
import { runIssuance } from './scenarios/issuance.js';
import { runJwt } from './scenarios/jwt.js';
import { runLeaseListing } from './scenarios/leases.js';
import { MemoryAt64, withoutOldSpaceCap } from './scenarios/memory.js';
import { runPerfProfile } from './scenarios/perf-profile.js';
import { runOnPg15 } from './scenarios/pg15.js';
import { runPopulation } from './scenarios/population.js';
import { runProfile } from './scenarios/profile.js';
import { runReaping } from './scenarios/reaping.js';
import { runFanout } from './scenarios/fanout.js';
import { runStartup } from './scenarios/startup.js';
import { runThreadpool } from './scenarios/threadpool.js';

/** The baseline results shown as "before", and its path relative to the repository. */
function loadBaseline(quick: boolean): { baseline?: Results; name?: string } {
  const defaultBaseline = path.join(ROOT, 'bench/baseline.json');
  const baselinePath = process.env.BENCH_BASELINE ?? (!quick && fs.existsSync(defaultBaseline) ? defaultBaseline : undefined);
  const baseline = baselinePath && fs.existsSync(baselinePath) ? (JSON.parse(fs.readFileSync(baselinePath, 'utf8')) as Results) : undefined;
  return { baseline, name: baselinePath ? path.relative(ROOT, baselinePath) : undefined };
}

/** BENCH_RENDER=results.json: write the report again from saved results, without measuring. */
function render(file: string): void {
  const results = JSON.parse(fs.readFileSync(file, 'utf8')) as Results;
  const { baseline, name } = loadBaseline(results.meta.quick);
  fs.writeFileSync(REPORT_PATH, writeReport(results, baseline, name));
  log(`report re-rendered from ${file} to ${REPORT_PATH}`);
}

/**
 * The floor's clients compute their verifiers in this process, on libuv's pool; libuv sizes the
 * pool once, at its first use, from UV_THREADPOOL_SIZE. Runs the bench again in a child with the
 * Docker image's value unless it already has it; resolves to the child's exit code, or null when
 * this process is the one to measure.
 */
async function inImageThreadpool(): Promise<number | null> {
  const size = PRODUCTION_ENV.UV_THREADPOOL_SIZE;
  if (!size || process.env.UV_THREADPOOL_SIZE === size) return null;
  const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], { stdio: 'inherit', env: { ...process.env, UV_THREADPOOL_SIZE: size } });
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => child.kill(sig));
  const [code, signal] = (await once(child, 'exit')) as [number | null, NodeJS.Signals | null];
  return code ?? 128 + (signal ? os.constants.signals[signal] : 0);
}

async function main(): Promise<void> {
  if (process.env.BENCH_RENDER) return render(process.env.BENCH_RENDER);
  const childCode = await inImageThreadpool();
  if (childCode !== null) {
    process.exitCode = childCode;
    return;
  }
  const errors: Record<string, string> = {};
  const results: Results = { meta: machineMeta(), issuance: [], errors };

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
    await recordPostgres(pgs, results.meta);
    const pmPid = await postmasterPid(pgs);
    const issuer = await startIssuer();
    cleanups.unshift(() => issuer.close());
    const ctx = await createContext(pgs, pmPid, issuer, results);
    cleanups.unshift(() => ctx.close());

    const startBrokerWith = async (env: Record<string, string>) => {
      const b = await BrokerChild.start(env);
      brokers.add(b);
      return b;
    };
    const startBroker = (iterations: number) => startBrokerWith(ctx.brokerEnv(iterations));
    const stopBroker = async (b: BrokerChild) => {
      await b.close();
      brokers.delete(b);
    };
    const memory = new MemoryAt64();

    // ------------------------------------------------------------ issuance, default then tuned
    log(`broker with BROKER_SCRAM_ITERATIONS=${DEFAULT_ITERATIONS}`);
    let broker = await startBroker(DEFAULT_ITERATIONS);
    const put = await api(broker.url, 'PUT', `/policies/${POLICY}`, ctx.adminToken, {
      issuer: issuer.issuer, claims: { sub: 'bench:*' }, grant_role: 'app_readers', database: pgs.database,
      default_ttl: 3600, max_ttl: 7200, max_active_leases: 100_000,
    });
    if (put.status !== 201 && put.status !== 200) throw new Error(`PUT /policies/${POLICY}: ${put.status} ${JSON.stringify(put.body)}`);

    await scenario(errors, 'issuance (default)', () => runIssuance(ctx, broker, DEFAULT_ITERATIONS, memory));
    await scenario(errors, 'reaping', async () => {
      results.reaping = await runReaping(pgs, broker, ctx.tokens, ctx.popOptions('bench:reap', true));
    });
    await scenario(errors, 'fanout', async () => {
      (results.fanout ??= []).push(await runFanout(ctx, broker, DEFAULT_ITERATIONS));
    });
    await dropIssuedRoles(pgs, 'all');
    await stopBroker(broker);
    await scenario(errors, 'threadpool', async () => {
      results.threadpool = await runThreadpool(ctx);
    });
    await scenario(errors, 'perf', async () => {
      results.perfProfile = await runPerfProfile(ctx);
    });

    log(`broker with BROKER_SCRAM_ITERATIONS=${TUNED_ITERATIONS}`);
    broker = await startBroker(TUNED_ITERATIONS);
    await scenario(errors, 'issuance (tuned)', () => runIssuance(ctx, broker, TUNED_ITERATIONS, memory));
    await scenario(errors, 'fanout (tuned)', async () => {
      (results.fanout ??= []).push(await runFanout(ctx, broker, TUNED_ITERATIONS));
    });
    // At the tuned setting, where the broker allocates fastest; then the same without the image's
    // old-generation cap, on a broker of its own.
    await scenario(errors, 'memory', async () => {
      await memory.sustain(ctx, broker, PRODUCTION_ENV.NODE_OPTIONS);
      const uncapped = withoutOldSpaceCap(PRODUCTION_ENV.NODE_OPTIONS);
      if (uncapped === PRODUCTION_ENV.NODE_OPTIONS) return;
      const b = await startBrokerWith({ ...ctx.brokerEnv(TUNED_ITERATIONS), NODE_OPTIONS: uncapped });
      try {
        await memory.sustain(ctx, b, uncapped);
      } finally {
        await stopBroker(b);
      }
    });
    memory.writeTo(results);

    await scenario(errors, 'population', () => runPopulation(ctx, broker));
    if (PROFILE) await scenario(errors, 'profile', () => runProfile(ctx, broker));
    await scenario(errors, 'jwt', () => runJwt(ctx, broker));
    // Before the million-row load, whose aftermath (checkpoints, autovacuum) would be timed too.
    await scenario(errors, 'startup', () => runStartup(ctx));
    // A server of its own, so also before the million-row load's aftermath.
    await scenario(errors, 'pg15', async () => {
      results.pg15 = await runOnPg15(issuer, results, startBrokerWith, stopBroker);
    });
    await scenario(errors, 'leases', async () => {
      results.leases = await runLeaseListing(pgs, broker, issuer, ctx.adminToken);
    });
    await stopBroker(broker);

  } finally {
    for (const b of brokers) await b.close().catch(() => b.kill());
    for (const c of cleanups) await c().catch(() => undefined);
  }

  results.meta.durationSeconds = elapsedSeconds();
  // The numbers from before the optimisations, kept beside the report (BENCH_BASELINE= turns it off).
  const { baseline, name } = loadBaseline(QUICK);
  fs.mkdirSync(path.dirname(REPORT_PATH), { recursive: true });
  fs.writeFileSync(JSON_PATH, JSON.stringify(results, null, 2) + '\n');
  fs.writeFileSync(REPORT_PATH, writeReport(results, baseline, name));
  log(`report written to ${REPORT_PATH} (${results.meta.durationSeconds.toFixed(0)} s)`);
  if (Object.keys(errors).length) {
    log(`scenarios failed: ${Object.keys(errors).join(', ')}`);
    process.exitCode = 1;
  }
}

/** Runs one scenario unless BENCH_ONLY leaves it out; a failure is recorded and the bench goes on. */
async function scenario(errors: Record<string, string>, name: string, fn: () => Promise<void>): Promise<void> {
  if (!wanted(name.split(' ')[0])) return;
  try {
    await fn();
  } catch (err) {
    errors[name] = (err as Error).stack ?? String(err);
    log(`scenario ${name} failed: ${(err as Error).message}`);
  }
}

main().then(
  // Keep-alive sockets (undici, autocannon) must not hold the process open once the report is out.
  () => process.exit(process.exitCode ?? 0),
  (err: Error) => {
    log(`bench failed: ${err.stack ?? err.message}`);
    process.exit(1);
  },
);
