import type { BrokerChild } from '../lib/broker.js';
import { cpuMark, cpuPerOp } from '../lib/cpu.js';
import { httpLoad, TokenPool } from '../lib/load.js';
import { log } from '../lib/log.js';
import { strip } from '../lib/runs.js';
import { SETTINGS } from '../lib/settings.js';
import { signTokens } from '../lib/tokens.js';
import type { BenchContext } from './context.js';

/**
 * JWT verification, RS256 vs ES256: POST /policies/evaluate (verify the token, read and evaluate
 * the issuer's policies) with distinct pre-signed tokens of each algorithm, 16 connections.
 */
export async function runJwt(ctx: BenchContext, broker: BrokerChild): Promise<void> {
  const { results, issuer, userSubjects, pmPid } = ctx;
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
}
