import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { brokerEnv, findLeaks } from './broker.js';
import { cliBundle } from './bundle.js';
import type { TestIssuer } from './issuer.js';
import type { TestPostgres } from './postgres.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const HOST = '127.0.0.1';

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A `pg-broker serve` child process (the CLI as helpers/bundle.ts builds it) on 127.0.0.1, with its JSON log captured line by line. */
export interface BrokerProcess {
  pid: number;
  /** The port it listens on; reading it before the broker has logged its address throws. */
  readonly port: number;
  /** http://127.0.0.1:<port>, under the same rule as `port`. */
  readonly url: string;
  /** Whether its port is known: given to it, or logged by it once it listened. */
  listening(): boolean;
  /** Every stdout line parsed as JSON (pino); lines that are not JSON are kept as { raw }. */
  logs: Array<Record<string, any>>;
  /** stderr lines: anything here from a broker that did not crash on purpose is worth reading. */
  stderr: string[];
  /** Resolves when the process has exited, however that happened. */
  exited: Promise<ExitStatus>;
  alive(): boolean;
  /** Sends `signal` (default SIGKILL) and waits for the exit; harmless on a process already gone. */
  kill(signal?: NodeJS.Signals): Promise<ExitStatus>;
  /** Log lines whose `msg` equals or matches `msg`. */
  logged(msg: string | RegExp): Array<Record<string, any>>;
}

export interface SpawnOptions {
  /** How long to wait for GET /readyz to answer 200 (default 30 s). */
  readyTimeoutMs?: number;
  /** Do not wait for /readyz (the caller polls, e.g. while PostgreSQL is down). */
  noWait?: boolean;
  /**
   * Listen on this port. Without it the broker is given PORT=0 and the kernel picks one as it
   * binds; a port chosen beforehand can be taken by any process in the meantime (a CI run lost
   * one that way while the broker waited for PostgreSQL).
   */
  port?: number;
}

// Children still running when the test process ends (a failed assertion, a signal) are killed,
// so a test run never leaves a broker behind holding PostgreSQL connections.
const children = new Set<ChildProcess>();
const killChildren = () => {
  for (const child of children) child.kill('SIGKILL');
};
process.on('exit', killChildren);
// A signal ends the test process without 'exit' (helpers/postgres.ts re-raises it): kill the
// brokers first, then let the signal do what it would have done had we not listened.
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  const onSignal = () => {
    killChildren();
    process.removeListener(sig, onSignal);
    if (process.listenerCount(sig) <= 1) process.kill(process.pid, sig);
  };
  process.on(sig, onSignal);
}

function lines(into: (line: string) => void): (chunk: Buffer) => void {
  let buf = '';
  return (chunk) => {
    buf += chunk.toString('utf8');
    const parts = buf.split('\n');
    buf = parts.pop() ?? '';
    for (const p of parts) if (p.trim()) into(p);
  };
}

function tail(list: string[], n = 5): string {
  return list.slice(-n).join(' | ');
}

const LISTENING = 'pg-credential-broker listening';

async function startBroker(env: Record<string, string>, fixedPort: number | undefined): Promise<BrokerProcess> {
  // Only what the broker needs (PATH, HOME) plus `env`: the test's own environment stays out.
  const child = spawn(process.execPath, [await cliBundle(), 'serve'], {
    cwd: ROOT,
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', HOME: process.env.HOME ?? '/tmp', LOG_LEVEL: 'info', ...env, HOST, PORT: String(fixedPort ?? 0) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  children.add(child);
  const logs: Array<Record<string, any>> = [];
  const stderr: string[] = [];
  child.stdout!.on('data', lines((l) => {
    try {
      logs.push(JSON.parse(l));
    } catch {
      logs.push({ raw: l });
    }
  }));
  child.stderr!.on('data', lines((l) => stderr.push(l)));
  const exited = new Promise<ExitStatus>((resolve) => {
    child.once('exit', (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    });
  });
  const alive = () => child.exitCode === null && child.signalCode === null;
  const knownPort = (): number | undefined => {
    if (fixedPort !== undefined) return fixedPort;
    const line = logs.find((l) => l.msg === LISTENING);
    return line ? Number(new URL(line.url).port) : undefined;
  };
  const port = (): number => {
    const known = knownPort();
    if (known === undefined) throw new Error(`broker ${child.pid} has not logged "${LISTENING}" yet (is LOG_LEVEL above info?), so its port is unknown`);
    return known;
  };
  return {
    pid: child.pid!,
    get port() {
      return port();
    },
    get url() {
      return `http://${HOST}:${port()}`;
    },
    listening: () => knownPort() !== undefined,
    logs,
    stderr,
    exited,
    alive,
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      if (alive()) child.kill(signal);
      return exited;
    },
    logged: (msg) => logs.filter((l) => (typeof msg === 'string' ? l.msg === msg : typeof l.msg === 'string' && msg.test(l.msg))),
  };
}

/** Polls GET /readyz until it answers 200, the process exits, or the deadline passes. */
export async function waitReady(broker: BrokerProcess, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (!broker.alive()) {
      const status = await broker.exited;
      throw new Error(`broker exited before it was ready (code ${status.code}, signal ${status.signal}): ${tail(broker.stderr)} ${tail(broker.logs.map((l) => JSON.stringify(l)), 3)}`);
    }
    if (broker.listening()) {
      try {
        const res = await fetch(`${broker.url}/readyz`, { signal: AbortSignal.timeout(1000) });
        await res.arrayBuffer();
        if (res.status === 200) return;
      } catch {
        // not listening yet
      }
    }
    if (Date.now() > deadline) {
      await broker.kill();
      throw new Error(`broker not ready after ${timeoutMs} ms: ${tail(broker.stderr)}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * Starts `pg-broker serve` with `env` on 127.0.0.1 (a port the kernel picks unless `opts.port`)
 * and, unless `opts.noWait`, waits until /readyz answers 200.
 */
export async function spawnBroker(env: Record<string, string>, opts: SpawnOptions = {}): Promise<BrokerProcess> {
  const broker = await startBroker(env, opts.port);
  spawned.push(broker);
  if (!opts.noWait) await waitReady(broker, opts.readyTimeoutMs);
  return broker;
}

/** Stops every given broker that is still running (SIGKILL unless told otherwise). */
export async function killAll(brokers: Iterable<BrokerProcess | undefined>, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
  await Promise.all([...brokers].map((b) => b?.kill(signal)));
}

export interface HttpResult {
  /** HTTP status, or 0 when the request failed without an answer (connection refused or reset). */
  status: number;
  headers: Headers | null;
  body: any;
  error?: string;
}

/**
 * One HTTP request with a hard timeout. Never throws: a broker killed mid-request gives status 0,
 * which is exactly what a client of a crashed process sees.
 */
export async function http(
  url: string,
  init: { method?: string; token?: string; body?: unknown; timeoutMs?: number } = {},
): Promise<HttpResult> {
  const headers: Record<string, string> = {};
  if (init.token) {
    headers.authorization = `Bearer ${init.token}`;
    seenSecrets.add(init.token);
  }
  if (init.body !== undefined) headers['content-type'] = 'application/json';
  try {
    const res = await fetch(url, {
      method: init.method ?? 'GET',
      headers,
      body: init.body === undefined ? undefined : JSON.stringify(init.body),
      signal: AbortSignal.timeout(init.timeoutMs ?? 15_000),
    });
    const text = await res.text();
    let body: any = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      // keep the text
    }
    if (typeof body?.password === 'string') {
      seenSecrets.add(body.password);
      seenPasswords.add(body.password);
    }
    return { status: res.status, headers: res.headers, body };
  } catch (err) {
    const cause = (err as { cause?: { code?: string; message?: string } }).cause;
    return { status: 0, headers: null, body: null, error: cause?.code ?? cause?.message ?? (err as Error).message };
  }
}

// Every broker this test process started, and every token sent and password received through
// http(): the secrets invariant is checked against all of them at the end of a suite.
const spawned: BrokerProcess[] = [];
const seenSecrets = new Set<string>();
const seenPasswords = new Set<string>();

/** Secrets (abbreviated) that reached any spawned broker's log or the PostgreSQL log. */
export function loggedSecrets(serverLog: string[]): { leaks: string[]; tokens: number; passwords: number } {
  const brokerLines = spawned.flatMap((b) => [...b.logs.map((l) => JSON.stringify(l)), ...b.stderr]);
  return { leaks: findLeaks(seenSecrets, brokerLines, serverLog), tokens: seenSecrets.size - seenPasswords.size, passwords: seenPasswords.size };
}

/**
 * The environment of a broker child process in the fault suites: reaping every second, the
 * cheapest verifier, and rate limits out of the way of their bounded load.
 */
export function childBrokerEnv(pgs: TestPostgres, issuer: TestIssuer, extra: Record<string, string> = {}): Record<string, string> {
  return brokerEnv(pgs, issuer, {
    BROKER_REAPER_INTERVAL: '1',
    BROKER_SCRAM_ITERATIONS: '1',
    BROKER_RATE_LIMIT_IP: '1000000',
    BROKER_RATE_LIMIT_IDENTITY: '1000000',
    ...extra,
  });
}

/** Waits for `ms` milliseconds. */
export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Fails, with the child's stderr, when a broker that should still be running has died. */
export async function expectAlive(broker: BrokerProcess, what: string): Promise<void> {
  if (!broker.alive()) {
    const status = await broker.exited;
    throw new Error(`${what}: broker pid ${broker.pid} died (code ${status.code}, signal ${status.signal}); stderr: ${tail(broker.stderr, 10)}`);
  }
}

/** A spawned process whose output is collected and whose exit is awaited, killed if it outlives `boundMs`. */
export interface WatchedProcess {
  pid: number;
  stdout(): string;
  stderr(): string;
  /** A process killed at the bound shows SIGKILL rather than an exit code. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  alive(): boolean;
}

export function spawnWatched(args: string[], env: NodeJS.ProcessEnv | undefined, boundMs: number): WatchedProcess {
  const child = spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const bound = setTimeout(() => child.kill('SIGKILL'), boundMs);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => {
    clearTimeout(bound);
    resolve({ code, signal });
  }));
  return { pid: child.pid!, stdout: () => out, stderr: () => err, exited, alive: () => child.exitCode === null && child.signalCode === null };
}
