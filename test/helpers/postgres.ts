import pg from 'pg';
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { LocalPostgresError, startLocalPostgres, type LocalPostgres } from '../../src/dev/embedded-postgres.js';
import { execFileP, initCluster, postgresIds, publishOnce, usable, type Engine, type Ids } from '../../src/dev/postgres-engine.js';

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
  /** Stops the server and starts it again on the same port, `downMs` (default 0) later. */
  restart(opts?: { downMs?: number; upWhen?: Promise<unknown> }): Promise<void>;
}

type Flavor = 'embedded' | 'pg15';

const TEMPLATE_LAYOUT = 'v1'; // bump when initdb flags change, so stale cached templates are ignored
// Data dirs are ~1000 files; on a slow disk creating them dominates start time. PG_TEST_TMPDIR=/dev/shm
// (tmpfs) makes a start ~6x faster, but Docker's default 64 MB /dev/shm is too small, so not the default.
const tmpRoot = () => process.env.PG_TEST_TMPDIR || os.tmpdir();
// Test-only: durability off for speed, every statement logged so tests can assert on server activity.
const TEST_FLAGS = {
  max_connections: '200', shared_buffers: '16MB', fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off',
  log_statement: 'all', log_min_messages: 'warning',
  // Off by default in PostgreSQL; on here so tests can show what an issued role does with it.
  max_prepared_transactions: '4',
};

const fail = (flavor: string, msg: string) => new Error(`startPostgres(${flavor}): ${msg.replace(/\s*\n\s*/g, ' | ')}`);
const quoteIdent = (s: string) => `"${s.replace(/"/g, '""')}"`;

/** An initdb'd cluster cached per binary version; each start copies it instead of running initdb. */
async function ensureTemplate(engine: Engine, ids: Ids): Promise<{ dataDir: string; password: string }> {
  const key = createHash('sha256').update(`${TEMPLATE_LAYOUT}|${engine.versionText}`).digest('hex').slice(0, 12);
  const dir = path.join(tmpRoot(), `pgcb-template-${engine.flavor}-${key}`);
  const dataDir = path.join(dir, 'data');
  const pwPath = path.join(dir, 'superuser.pw');
  await publishOnce(dir, () => fs.existsSync(path.join(dataDir, 'global', 'pg_control')) && fs.existsSync(pwPath), async (staging) => {
    if (ids) await fs.promises.chown(staging, ids.uid, ids.gid);
    const password = randomBytes(18).toString('hex');
    await initCluster(engine, path.join(staging, 'data'), password, ids, { sync: false });
    await fs.promises.writeFile(path.join(staging, 'superuser.pw'), password, { mode: 0o600 });
  });
  return { dataDir, password: fs.readFileSync(pwPath, 'utf8').trim() };
}

function grantGroupsSql(version: number, groups: string[]): string {
  const list = groups.map(quoteIdent).join(', ');
  // The least the README documents: PG 16+ needs ADMIN OPTION to grant a group onward, and no
  // INHERIT or SET; on 15 CREATEROLE alone may grant any non-superuser role (and is too much).
  return version >= 16 ? `GRANT ${list} TO broker WITH ADMIN OPTION, INHERIT FALSE, SET FALSE` : 'SELECT 1';
}

const reasonOf = (e: unknown) => (e instanceof LocalPostgresError ? e.reason : (e as Error).message ?? String(e));

export async function startPostgres(opts: { flavor?: Flavor } = {}): Promise<TestPostgres> {
  // PG_TEST_FLAVOR lets a whole suite run again on another server version (see test/pg15/).
  const flavor = opts.flavor ?? (process.env.PG_TEST_FLAVOR === 'pg15' ? 'pg15' : 'embedded');
  if (!usable(tmpRoot(), postgresIds())) throw fail(flavor, `${tmpRoot()} is not traversable by the postgres user; set PG_TEST_TMPDIR`);
  let templateDir: string | undefined;
  let local: LocalPostgres;
  try {
    local = await startLocalPostgres({
      flavor, tmpDir: tmpRoot(), serverFlags: TEST_FLAGS,
      seed: async (dataDir, engine, ids) => {
        const template = await ensureTemplate(engine, ids);
        templateDir = path.dirname(template.dataDir);
        await execFileP('cp', ['-a', template.dataDir, dataDir]);
        // The template keeps the uid it was created with; the postgres user may have been recreated since.
        if (ids && fs.statSync(template.dataDir).uid !== ids.uid) await execFileP('chown', ['-R', `${ids.uid}:${ids.gid}`, dataDir]);
        return template.password;
      },
    });
  } catch (e) {
    const noServerReason = !(e instanceof LocalPostgresError && e.serverErrors.length);
    const hint = templateDir && noServerReason ? ` (if this persists, delete the cached template ${templateDir})` : '';
    throw fail(flavor, reasonOf(e) + hint);
  }
  const { port } = local;
  // One short-lived client per call, so tests never share session state with the helper.
  const run = async (sqls: string[], params: unknown[], database: string, quiet: boolean) => {
    // Setup runs with log_statement=none: tests that scan the log see only their own traffic.
    const client = new pg.Client({ host: local.host, port, user: 'postgres', password: local.superuserPassword, database,
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
  const { version } = local;
  try {
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
    await local.stop().catch(() => undefined);
    throw fail(flavor, reasonOf(e));
  }

  return {
    host: local.host, port, version, database: 'broker',
    superuserUrl: local.superuserUrl(),
    brokerUrl: `postgres://broker:${brokerPassword}@${local.host}:${port}/broker`,
    logLines: () => local.logLines(),
    query,
    stop: () => local.stop(),
    async restart(opts) {
      await local.restart(opts).catch((e) => { throw e instanceof LocalPostgresError ? fail(flavor, e.reason) : e; });
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
