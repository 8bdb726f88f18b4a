import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The bench's configuration: where it writes, how big each scenario is, and the fixed names it uses. */

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const DOCKERFILE = fs.readFileSync(path.join(ROOT, 'Dockerfile'), 'utf8');
/** A variable the Docker image's ENV sets (one `NAME=value` or `NAME="a b"` per line), or '' when it sets none. */
export function imageEnv(name: string, dockerfile = DOCKERFILE): string {
  const m = new RegExp(`^\\s*(?:ENV\\s+)?${name}=(?:"([^"]*)"|(\\S+?))\\s*\\\\?$`, 'm').exec(dockerfile);
  return m ? (m[1] ?? m[2]) : '';
}
/**
 * The runtime settings the Docker image gives node, read from the Dockerfile so the bench runs its
 * broker as production does. The bench process itself (the floor's clients) runs with the same
 * UV_THREADPOOL_SIZE: bench/run.ts restarts itself with it.
 */
export const PRODUCTION_ENV = { NODE_OPTIONS: imageEnv('NODE_OPTIONS'), UV_THREADPOOL_SIZE: imageEnv('UV_THREADPOOL_SIZE') };
export const QUICK = process.env.BENCH_QUICK === '1';
export const REPORT_PATH = path.resolve(process.env.BENCH_REPORT || path.join(ROOT, 'bench/REPORT.md'));
export const JSON_PATH = REPORT_PATH.replace(/\.md$/i, '') + '.json';
export const PROFILE = process.env.BENCH_PROFILE !== '0';
const ONLY = new Set((process.env.BENCH_ONLY ?? '').split(',').map((x) => x.trim()).filter(Boolean));
/** BENCH_ONLY: whether a scenario (by the first word of its name) is to run. */
export const wanted = (name: string) => ONLY.size === 0 || ONLY.has(name);

export const SETTINGS = QUICK
  ? { burst: 40, repeats: 1, targetRepeats: 1, warmup: 0, jitWarmup: 32, tokens: 300, population: [0, 100], populationBurst: 40, ddlProbe: 10, backlog: 200, reapDrains: 2, reapCapSeconds: 60, rows: 10_000, subjects: 200, idleSeconds: 1, jwtSeconds: 0.75, jwtWarmSeconds: 0, listRequests: 40, startupRuns: 1, profileBursts: 1, sustained: { total: 200, chunk: 100 } }
  : { burst: 300, repeats: 3, targetRepeats: 8, warmup: 50, jitWarmup: 6000, tokens: 3000, population: [0, 1000, 3000], populationBurst: 100, ddlProbe: 40, backlog: 10_000, reapDrains: 3, reapCapSeconds: 240, rows: 1_000_000, subjects: 20_000, idleSeconds: 20, jwtSeconds: 5, jwtWarmSeconds: 1, listRequests: 700, startupRuns: 3, profileBursts: 3, sustained: { total: 20_000, chunk: 2000 } };
export const LEVELS = [1, 4, 16, 64];
export const DEFAULT_ITERATIONS = 4096;
export const TUNED_ITERATIONS = 1;
export const AUDIENCE = 'pg-broker';
export const POLICY = 'bench';
export const MANAGED_ROLE = 'credential_broker_managed';
export const TOKEN_TTL_SECONDS = 3 * 3600;
