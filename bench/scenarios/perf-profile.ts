import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { BrokerChild } from '../lib/broker.js';
import { cpuMark, spent } from '../lib/cpu.js';
import { httpLoad } from '../lib/load.js';
import { log } from '../lib/log.js';
import { PerfRecording, perfProblem, perfScript, summarizePerf } from '../lib/perf.js';
import { dropIssuedRoles } from '../lib/population.js';
import type { PerfProfile } from '../lib/results.js';
import { DEFAULT_ITERATIONS, ROOT, SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';
import { jitWarmup } from './warmup.js';

const CONNECTIONS = 16;
// Where the bundled broker's own code sits (bench/lib/bundle.ts); its dependencies stay in node_modules.
const BROKER_CODE = /pgcb-bench-build-[^/]+\/broker\//;

/**
 * Where the broker's CPU goes at P1's point (default iterations, 16 clients), on the CPU only:
 * a broker of its own with --perf-basic-prof, warmed up, recorded by perf during `profileBursts`
 * bursts, with its CPU per request from schedstat over the same bursts.
 */
export async function runPerfProfile(ctx: BenchContext): Promise<PerfProfile> {
  const problem = perfProblem();
  if (problem) {
    log(`perf profile left out: ${problem}`);
    return { unavailable: problem };
  }
  const { pgs, pmPid, tokens } = ctx;
  const broker = await BrokerChild.start(ctx.brokerEnv(DEFAULT_ITERATIONS), { nodeFlags: ['--perf-basic-prof'] });
  const data = path.join(os.tmpdir(), `pgcb-perf-${broker.pid}.data`);
  try {
    await dropIssuedRoles(pgs, 'runs');
    await jitWarmup(ctx, broker, DEFAULT_ITERATIONS, false);
    let requests = 0;
    let brokerMs = 0;
    let recording: PerfRecording;
    try {
      recording = await PerfRecording.start(broker.pid, data);
    } catch (err) {
      // perf installed but not allowed to attach (a container's seccomp, perf_event_paranoid).
      log(`perf profile left out: ${(err as Error).message}`);
      return { unavailable: `perf record could not attach: ${(err as Error).message.split('\n')[0]}` };
    }
    try {
      for (let i = 0; i < SETTINGS.profileBursts; i++) {
        await dropIssuedRoles(pgs, 'runs');
        const before = cpuMark(broker.pid, pmPid);
        requests += (await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections: CONNECTIONS, amount: SETTINGS.burst, tokens, expect: 201 })).ok;
        brokerMs += spent(before, cpuMark(broker.pid, pmPid)).broker;
      }
    } finally {
      await recording.stop();
    }
    await dropIssuedRoles(pgs, 'runs');
    const summary = summarizePerf(perfScript(data), BROKER_CODE);
    log(`perf profile: ${summary.samples} samples, ${(brokerMs / requests).toFixed(3)} ms of broker CPU per request`);
    return {
      scenario: `POST /credentials, ${CONNECTIONS} connections, BROKER_SCRAM_ITERATIONS=${DEFAULT_ITERATIONS}, ${SETTINGS.profileBursts} bursts of ${SETTINGS.burst} after ${SETTINGS.jitWarmup} to warm up`,
      requests,
      brokerMsPerRequest: brokerMs / requests,
      ...summary,
    };
  } finally {
    await broker.close().catch(() => broker.kill());
    fs.rmSync(data, { force: true });
    fs.rmSync(data + '.old', { force: true });
    // --perf-basic-prof's symbol map, which V8 always writes to /tmp, and the V8 log the flag
    // also turns on, written to the broker's working directory (the checkout).
    fs.rmSync(`/tmp/perf-${broker.pid}.map`, { force: true });
    for (const f of fs.readdirSync(ROOT)) if (f.startsWith('isolate-') && f.endsWith(`-${broker.pid}-v8.log`)) fs.rmSync(path.join(ROOT, f), { force: true });
  }
}
