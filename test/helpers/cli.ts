import { execFile } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startTestBroker, type TestBroker } from './broker.js';
import { cliBundle } from './bundle.js';

/** The checkout's entry, which loads the TypeScript through tsx. */
export const CHECKOUT_BIN = fileURLToPath(new URL('../../bin/pg-broker.js', import.meta.url));
/** The CLI the suites run: compiled from the same sources (see helpers/bundle.ts). */
export const BIN = await cliBundle();

export interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** A broker listening on loopback with policy `cli` (sub `cli:*`), and a scratch HOME for the CLI. */
export interface CliBench {
  b: TestBroker;
  url: string;
  home: string;
  /** Runs the CLI (BIN) with only PATH, HOME and PG_BROKER_URL set, plus `env`. */
  cli(args: string[], env?: Record<string, string>): Promise<CliRun>;
  /** Runs the checkout's bin/pg-broker.js (through tsx) the same way. */
  checkout(args: string[], env?: Record<string, string>): Promise<CliRun>;
  /** Runs a line as the CLI prints it for a person to paste (`pg-broker …`), through sh, in the same environment. */
  pasted(line: string, env?: Record<string, string>): Promise<CliRun>;
}

/** The command a listing printed on stderr for its next page, if any. */
export function nextPageHint(stderr: string): string | undefined {
  return /^\(more: (.*)\)$/m.exec(stderr)?.[1];
}

/** `cliTimeoutMs`: how long one CLI run may take before it is killed (60 s unless a test waits longer on purpose). */
export async function startCliBench(tmpPrefix: string, opts: { cliTimeoutMs?: number } = {}): Promise<CliBench> {
  const b = await startTestBroker();
  const url = await b.app.listen({ host: '127.0.0.1', port: 0 });
  const home = await mkdtemp(path.join(os.tmpdir(), tmpPrefix));
  await b.putPolicy('cli', { claims: { sub: 'cli:*' }, default_ttl: 120, max_ttl: 600, max_active_leases: 50 });
  const run = (file: string, args: string[], env: Record<string, string>) => new Promise<CliRun>((resolve) => {
    execFile(file, args, { env: { PATH: process.env.PATH!, HOME: home, PG_BROKER_URL: url, ...env }, timeout: opts.cliTimeoutMs ?? 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
  const cli = (args: string[], env: Record<string, string> = {}) => run(process.execPath, [BIN, ...args], env);
  const checkout = (args: string[], env: Record<string, string> = {}) => run(process.execPath, [CHECKOUT_BIN, ...args], env);
  const pasted = (line: string, env: Record<string, string> = {}) => {
    if (!line.startsWith('pg-broker ')) throw new Error(`not a pg-broker command: ${line}`);
    const script = `pg_broker() { "$PG_BROKER_NODE" "$PG_BROKER_BIN" "$@"; }\npg_broker ${line.slice('pg-broker '.length)}`;
    return run('sh', ['-c', script], { PG_BROKER_NODE: process.execPath, PG_BROKER_BIN: BIN, ...env });
  };
  return { b, url, home, cli, checkout, pasted };
}
