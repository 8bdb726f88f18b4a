import pg from 'pg';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  HOST, LocalPostgresError, execFileP, flagArgs, initCluster, launch, postgresIds, publishOnce, resolveEngine,
  track, untrack, usable, type Engine, type Flavor, type Ids, type Server,
} from './postgres-engine.js';
import { freePort, portIsFree } from './ports.js';

export { LocalPostgresError, type Engine, type Flavor, type Ids };

/**
 * DEVELOPMENT ONLY: a local PostgreSQL for `demo`, `dev` and the tests. As root it runs as the `postgres`
 * OS user (created if missing). `serve` never uses this.
 */
export interface LocalPostgres {
  host: string;
  port: number;
  /** Major version. */
  version: number;
  superuserPassword: string;
  /** postgres://postgres:<pw>@127.0.0.1:<port>/<database ?? 'postgres'> */
  superuserUrl(database?: string): string;
  /** The PGDATA actually used; for a relocated `dir` it is under tmpDir. */
  dataDir: string;
  /** True when `dir` was not reachable by the postgres OS user and a stable directory under tmpDir is used instead. */
  relocated: boolean;
  /** Server output since it was started by this process. */
  logLines(): string[];
  /** Stops the server; removes the data dir only if it was temporary. */
  stop(): Promise<void>;
  /**
   * Stop and start again on the same port (open sessions are cut), after `downMs` (default 0)
   * without a server and, when given, once `upWhen` has settled too.
   */
  restart(opts?: { downMs?: number; upWhen?: Promise<unknown> }): Promise<void>;
}

export interface LocalPostgresOptions {
  flavor?: Flavor;
  /**
   * Persistent cluster directory (created and initdb'd on first use, reused later; the superuser password
   * is stored beside the data with mode 0600). Omit for a throwaway cluster in a temp dir that stop() deletes.
   */
  dir?: string;
  /** Default: a free port. If the given port is taken, fails with one clear line. */
  port?: number;
  /** Merged over the defaults (listen on 127.0.0.1 only, no unix socket, scram). */
  serverFlags?: Record<string, string>;
  /** Throwaway clusters, copies of the binaries and the fallback for an unreachable `dir` go here. Default: os.tmpdir(). */
  tmpDir?: string;
  /**
   * Fills a new cluster's data dir (a path that does not exist yet) instead of running initdb, e.g. by
   * copying a cached template; resolves to its superuser password.
   */
  seed?: (dataDir: string, engine: Engine, ids: Ids) => Promise<string>;
}

const DEFAULT_FLAGS: Record<string, string> = {
  listen_addresses: HOST, unix_socket_directories: '', password_encryption: 'scram-sha-256',
  log_line_prefix: '%m [%p] %q%u@%d ', // user@db on each line, so one can tell who ran what
};
// Readiness and failure detection read English messages on stderr, so these cannot be overridden.
const REQUIRED_FLAGS: Record<string, string> = { logging_collector: 'off', lc_messages: 'C' };

const newPassword = () => randomBytes(18).toString('hex');
const errorLines = (lines: string[]) => lines.filter((l) => /FATAL|ERROR|PANIC|could not/.test(l));
const portTaken = (port: number) => `port ${port} on ${HOST} is already in use; choose another port`;
// EADDRINUSE as a listener's error has it, so a caller can name its own option for the port.
const inUse = (error: LocalPostgresError) => Object.assign(error, { code: 'EADDRINUSE' });

export async function startLocalPostgres(opts: LocalPostgresOptions = {}): Promise<LocalPostgres> {
  const flavor = opts.flavor ?? 'embedded';
  const fail = (reason: string, serverErrors?: string[]) => new LocalPostgresError(flavor, reason, serverErrors);
  if (opts.port !== undefined && !(Number.isInteger(opts.port) && opts.port > 0 && opts.port < 65536)) {
    throw fail(`invalid port ${opts.port}`);
  }
  const tmpDir = path.resolve(opts.tmpDir ?? os.tmpdir());
  const ids = postgresIds();
  if (!usable(tmpDir, ids)) throw fail(`${tmpDir} is not traversable by the postgres OS user`);
  const engine = await resolveEngine(flavor, ids, tmpDir);
  const serverArgs = flagArgs({ ...DEFAULT_FLAGS, ...opts.serverFlags, ...REQUIRED_FLAGS });
  const initialise = async (dataDir: string, sync: boolean) => {
    if (opts.seed) return opts.seed(dataDir, engine, ids);
    const password = newPassword();
    await initCluster(engine, dataDir, password, ids, { sync });
    return password;
  };

  const entry = track({});
  let cluster: { dataDir: string; password: string; relocated: boolean };
  try {
    if (opts.dir) {
      cluster = await openPersistent(path.resolve(opts.dir), tmpDir, engine, ids, initialise, fail);
    } else {
      entry.removeDir = await fsp.mkdtemp(path.join(tmpDir, `pgcb-${flavor}-`));
      if (ids) await fsp.chown(entry.removeDir, ids.uid, ids.gid);
      const dataDir = path.join(entry.removeDir, 'data');
      cluster = { dataDir, password: await initialise(dataDir, false), relocated: false };
    }
  } catch (e) {
    if (entry.removeDir) await fsp.rm(entry.removeDir, { recursive: true, force: true });
    untrack(entry);
    throw e instanceof LocalPostgresError ? e : fail((e as Error).message ?? String(e));
  }
  const { dataDir, password } = cluster;
  const lines: string[] = [];
  let server: Server | undefined;
  let port = 0;
  let version = 0;
  const shutdown = async () => {
    await server?.stop();
    if (entry.removeDir) await fsp.rm(entry.removeDir, { recursive: true, force: true });
    untrack(entry);
  };

  try {
    // Only after the stale-pid check, so that a leftover server of this very cluster is named as such.
    if (opts.port !== undefined && !(await portIsFree(HOST, opts.port))) throw inUse(fail(portTaken(opts.port)));
    for (let attempt = 1; !server; attempt++) {
      port = opts.port ?? (await freePort(HOST));
      const from = lines.length;
      try {
        server = await launch(engine, dataDir, port, password, ids, lines, serverArgs, (child) => { entry.child = child; });
      } catch (e) {
        const errs = errorLines(lines.slice(from));
        const taken = errs.some((l) => /already in use|could not bind/.test(l));
        if (taken && opts.port !== undefined) throw inUse(fail(portTaken(port), errs));
        if (taken && attempt < 4) continue; // lost a race for the free port
        throw fail(`${(e as Error).message}: ${errs.slice(-3).join(' | ') || lines.slice(-3).join(' | ')}`, errs);
      }
    }
    entry.child = server.child;
    version = await serverVersion(port, password).catch((e: Error & { code?: string }) => {
      throw fail(e.code === '28P01'
        ? `the cluster in ${dataDir} does not accept its superuser password`
        : `server started but a superuser query failed: ${e.message}`);
    });
  } catch (e) {
    await shutdown().catch(() => undefined);
    throw e;
  }

  // A second stop() waits for the first instead of returning while the server is still up.
  let stopping: Promise<void> | undefined;
  return {
    host: HOST, port, version, superuserPassword: password, dataDir, relocated: cluster.relocated,
    superuserUrl: (database = 'postgres') => `postgres://postgres:${password}@${HOST}:${port}/${encodeURIComponent(database)}`,
    logLines: () => [...lines],
    stop() {
      stopping ??= shutdown();
      return stopping;
    },
    async restart({ downMs = 0, upWhen } = {}) {
      if (stopping) throw new Error('restart() after stop()');
      await server!.stop();
      if (downMs > 0) await sleep(downMs);
      await upWhen?.catch(() => undefined);
      const from = lines.length;
      server = await launch(engine, dataDir, port, password, ids, lines, serverArgs, (child) => { entry.child = child; }).catch((e: Error) => {
        const errs = errorLines(lines.slice(from));
        throw fail(`restart on port ${port} failed: ${e.message}: ${errs.slice(-3).join(' | ') || lines.slice(-3).join(' | ')}`, errs);
      });
      entry.child = server.child;
    },
  };
}

async function serverVersion(port: number, password: string): Promise<number> {
  const client = new pg.Client({ host: HOST, port, user: 'postgres', password, database: 'postgres', options: '-c log_statement=none' });
  client.on('error', () => undefined);
  await client.connect();
  try {
    const { rows } = await client.query<{ v: string }>("SELECT current_setting('server_version_num') AS v");
    return Math.floor(Number(rows[0].v) / 10000);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/** Layout: <dir>/data (PGDATA, owned by the server's OS user) and <dir>/superuser.pw (0600). */
async function openPersistent(wanted: string, tmpDir: string, engine: Engine, ids: Ids,
  initialise: (dataDir: string, sync: boolean) => Promise<string>, fail: (reason: string) => LocalPostgresError) {
  let anchor = path.dirname(wanted);
  while (!fs.existsSync(anchor)) anchor = path.dirname(anchor);
  // The server's OS user must traverse every ancestor (a project under a mode-700 home fails); the hash
  // keeps the fallback stable across runs, so the data survives there instead.
  const relocated = !usable(anchor, ids);
  const dir = relocated ? path.join(tmpDir, `pg-broker-cluster-${createHash('sha256').update(wanted).digest('hex').slice(0, 12)}`) : wanted;
  const dataDir = path.join(dir, 'data');
  const pwPath = path.join(dir, 'superuser.pw');
  try {
    await makeParents(path.dirname(dir), ids);
    if (relocated) assertPrivate(dir, ids, fail); // a predictable name in a shared tmp dir could be planted
    const valid = () => fs.existsSync(path.join(dataDir, 'PG_VERSION')) && fs.existsSync(pwPath);
    if (!valid() && fs.existsSync(dir) && fs.readdirSync(dir).length) {
      throw fail(`${dir} is not empty but holds no cluster created by pg-broker; move it away or choose another directory`);
    }
    await publishOnce(dir, valid, async (staging) => {
      if (ids) await fsp.chown(staging, ids.uid, ids.gid);
      const password = await initialise(path.join(staging, 'data'), true);
      await fsp.writeFile(path.join(staging, 'superuser.pw'), password, { mode: 0o600 });
    }, { keepExisting: true });
  } catch (e) {
    throw e instanceof LocalPostgresError ? e : fail((e as Error).message ?? String(e));
  }
  const dataMajor = Number(fs.readFileSync(path.join(dataDir, 'PG_VERSION'), 'utf8').trim());
  if (dataMajor !== engine.major) {
    throw fail(`${dataDir} holds a PostgreSQL ${dataMajor} cluster but the '${engine.flavor}' binaries are PostgreSQL ${engine.major}; use matching binaries or delete ${dir}`);
  }
  // The postgres user may have been recreated with another uid since the cluster was made.
  if (ids && fs.statSync(dataDir).uid !== ids.uid) await execFileP('chown', ['-R', `${ids.uid}:${ids.gid}`, dir]);
  await clearStalePid(dataDir, fail);
  return { dataDir, password: fs.readFileSync(pwPath, 'utf8').trim(), relocated };
}

async function makeParents(dir: string, ids: Ids): Promise<void> {
  const first = await fsp.mkdir(dir, { recursive: true });
  if (!first || !ids) return;
  // Under umask 077 new directories would stop the postgres user from reaching the cluster.
  for (let d = dir; ; d = path.dirname(d)) {
    await fsp.chmod(d, 0o755);
    if (d === first || d === path.dirname(d)) break;
  }
}

function assertPrivate(dir: string, ids: Ids, fail: (reason: string) => LocalPostgresError): void {
  let st: fs.Stats;
  try { st = fs.lstatSync(dir); } catch { return; }
  const owners = [process.getuid?.(), ids?.uid];
  if (!st.isDirectory() || !owners.includes(st.uid) || (st.mode & 0o022) !== 0) {
    throw fail(`refusing to use ${dir}: not a private directory owned by this user or the postgres user`);
  }
}

/**
 * A server that died without a shutdown leaves postmaster.pid behind. PostgreSQL removes it itself only
 * when the pid is unused; after a container restart the pid is often reused by another process of the
 * same user, and then it refuses to start. So: refuse if a server still runs in the dir, else remove it.
 */
async function clearStalePid(dataDir: string, fail: (reason: string) => LocalPostgresError): Promise<void> {
  const pidFile = path.join(dataDir, 'postmaster.pid');
  let text: string;
  try { text = fs.readFileSync(pidFile, 'utf8'); } catch { return; }
  const [pidLine, , , portLine] = text.split('\n');
  const pid = Number(pidLine);
  for (let waited = 0; ; waited += 100) {
    const users = serverProcessesIn(dataDir);
    if (users === undefined) { // no /proc: only the pid itself can be checked; otherwise PostgreSQL decides
      if (pid > 0 && processGone(pid)) await fsp.rm(pidFile, { force: true });
      return;
    }
    if (users.includes(pid)) {
      throw fail(`a server (pid ${pid}, port ${portLine?.trim()}) is already running on ${dataDir}; stop it first (kill -INT ${pid})`);
    }
    if (users.length === 0) break;
    // The postmaster is gone but its backends have not noticed yet; starting now would corrupt data.
    if (waited >= 3000) throw fail(`processes ${users.join(', ')} of a dead server still use ${dataDir}; wait or kill them`);
    await sleep(100);
  }
  await fsp.rm(pidFile, { force: true });
}

function processGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

/** Server processes of this cluster: the postmaster and its children run with the data dir as cwd. */
function serverProcessesIn(dataDir: string): number[] | undefined {
  let entries: string[];
  try { entries = fs.readdirSync('/proc'); } catch { return undefined; }
  const real = fs.realpathSync(dataDir);
  const pids: number[] = [];
  for (const e of entries) {
    if (!/^\d+$/.test(e)) continue;
    try {
      if (fs.readlinkSync(`/proc/${e}/cwd`) === real && fs.readFileSync(`/proc/${e}/comm`, 'utf8').trim() === 'postgres') {
        pids.push(Number(e));
      }
    } catch { /* exited meanwhile, or not ours to inspect */ }
  }
  return pids;
}
