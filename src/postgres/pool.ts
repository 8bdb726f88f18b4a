import fs from 'node:fs';
import pg from 'pg';
import { parse } from 'pg-connection-string';
import type { Logger } from 'pino';

export type Queryable = Pick<pg.PoolClient, 'query'>;

const CONNECT_TIMEOUT_MS = 5000;

export interface DbTimeouts {
  /** BROKER_LOCK_TIMEOUT: 0 waits forever. */
  lockTimeoutSeconds: number;
  /** BROKER_QUERY_TIMEOUT: 0 waits forever. */
  queryTimeoutSeconds: number;
}

// How much longer than statement_timeout the client waits before it gives up on the server.
const SILENCE_GRACE_MS = 2000;

/**
 * Settings for every connection the broker opens for its work.
 * - lock_timeout (PostgreSQL's): a request blocked by another session's open transaction answers
 *   503 instead of hanging, and a DROP OWNED queued behind a long query neither stalls the reaper
 *   nor holds up every other query on that table while it waits.
 * - statement_timeout (PostgreSQL's, with `cancelOnServer`): a statement that runs too long is
 *   cancelled and its transaction rolled back by the server, which is still there to do it.
 * - query_timeout (pg's, on the client, a little later): a server that stops answering without
 *   closing the connection (a failover that leaves the old address silent, a dropped route) would
 *   otherwise hold each request until TCP gives up, many minutes later. The connection is then
 *   discarded. Without `cancelOnServer` (teardown's REASSIGN/DROP OWNED connections, one per
 *   database including the broker's own, where a long DROP OWNED should finish rather than fail
 *   on every attempt), this is the only bound, and a statement the client stopped waiting for
 *   still runs to its end on the server.
 */
export function sessionSettings(
  t: DbTimeouts, cancelOnServer: boolean,
): Pick<pg.ClientConfig, 'lock_timeout' | 'statement_timeout' | 'query_timeout' | 'connectionTimeoutMillis'> {
  const queryMs = t.queryTimeoutSeconds * 1000;
  return {
    connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
    ...(t.lockTimeoutSeconds > 0 ? { lock_timeout: t.lockTimeoutSeconds * 1000 } : {}),
    ...(queryMs > 0 && cancelOnServer ? { statement_timeout: queryMs, query_timeout: replyDeadlineMs(queryMs, 1) } : {}),
    ...(queryMs > 0 && !cancelOnServer ? { query_timeout: queryMs } : {}),
  };
}

function replyDeadlineMs(statementTimeoutMs: number, waits: number): number {
  return waits * statementTimeoutMs + SILENCE_GRACE_MS;
}

/**
 * `sql` followed by COMMIT, as one query. PostgreSQL times each statement of it on its own, and
 * two of them can take long on a healthy server: the work (a CREATE ROLE queued on a lock, say)
 * and the COMMIT. So the client waits for both before it gives up on a silent server; giving up
 * after one could report a failure for a transaction the server then commits. (The SET LOCAL and
 * COMMENT statements around the work take no time worth counting.)
 */
export function commitBatch(pool: pg.Pool, sql: string): pg.QueryConfig {
  const text = `${sql};\nCOMMIT`;
  const statementTimeout = Number(pool.options.statement_timeout) || 0;
  return statementTimeout ? ({ text, query_timeout: replyDeadlineMs(statementTimeout, 2) } as pg.QueryConfig) : { text };
}

/**
 * Every connection the broker opens searches pg_catalog alone (pg_temp last, where nothing of its
 * own lives). With the default `"$user", public`, an issued role that may create in some schema on
 * that path could define, say, `format(text, name, text)` or `hashtextextended(text, integer)`:
 * an exact match for a call's argument types beats the built-in, wherever pg_catalog is, and the
 * broker (or the creator role teardown acts as) would run it (CVE-2018-1058's pattern).
 */
export const SEARCH_PATH = 'pg_catalog, pg_temp';
// DateStyle too: pg parses timestamps only as ISO prints them, and reads null (a 500 on issuance,
// whose VALID UNTIL comes from the lease INSERT's answer) under a role's or database's
// `SET datestyle = 'SQL, DMY'`.
const SEARCH_PATH_OPTION = '-c search_path=pg_catalog,pg_temp -c datestyle=ISO';

// The settings pg's ConnectionParameters reads from a connection string (pg 8.x).
const URL_SETTINGS = [
  'user', 'password', 'host', 'database', 'binary', 'options', 'ssl', 'sslnegotiation', 'client_encoding', 'replication',
  'application_name', 'fallback_application_name', 'statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout', 'query_timeout',
] as const;

/**
 * The settings of a connection to DATABASE_URL (to `database` instead, if given): the broker's
 * own (`ours`) under whatever the URL says, as pg merges a connectionString into its config, and
 * the search_path above. The URL is parsed here, as pg parses it, so that the search_path can
 * join the `options` the URL (or else PGOPTIONS) gives rather than be overridden by them; the
 * last `-c` of a setting wins.
 */
export function connectionConfig(databaseUrl: string, ours: pg.PoolConfig = {}, database?: string): pg.PoolConfig {
  const parsed = parse(databaseUrl) as Record<string, unknown>;
  rereadCertificateFiles(parsed);
  // Only what pg reads from a URL for a connection: a query key such as `max` or
  // `idleTimeoutMillis` sizes no pool in pg, and must not here.
  const fromUrl = Object.fromEntries(URL_SETTINGS.filter((k) => parsed[k] !== undefined).map((k) => [k, parsed[k]])) as pg.ClientConfig;
  const { port } = parsed as { port?: string | number | null };
  // `||`, as pg: an empty options in the URL leaves PGOPTIONS in force.
  const given = fromUrl.options || process.env.PGOPTIONS;
  return {
    ...ours,
    ...fromUrl,
    // pg reads a port with parseInt, as here.
    ...(port === undefined || port === null || port === '' ? {} : { port: parseInt(String(port), 10) }),
    ...(database === undefined ? {} : { database }),
    options: given ? `${given} ${SEARCH_PATH_OPTION}` : SEARCH_PATH_OPTION,
  };
}

/**
 * `parse` reads sslrootcert, sslcert and sslkey when called. pg, given the URL itself, parses it
 * again for each new connection, so a certificate rotated on disk (a client certificate renewed
 * every few weeks) took effect without a restart. To keep that, each file becomes a getter on the
 * `ssl` object all connections of one config share, read at every TLS handshake. `key` stays
 * hidden from enumeration, as pg hides it.
 */
function rereadCertificateFiles(parsed: Record<string, unknown>): void {
  const ssl = parsed.ssl;
  if (!ssl || typeof ssl !== 'object') return;
  for (const [setting, option] of [['sslrootcert', 'ca'], ['sslcert', 'cert'], ['sslkey', 'key']] as const) {
    const file = parsed[setting];
    if (typeof file !== 'string' || !(option in ssl)) continue;
    // pg reads these in a socket event handler, where a throw would end the process: a file
    // missing for a moment (a rotation that is not one rename) keeps the last contents read.
    let last = (ssl as Record<string, unknown>)[option];
    const read = () => {
      try {
        last = fs.readFileSync(file).toString();
      } catch {
        // Kept: the handshake then fails or succeeds on what was there before, as a connection error.
      }
      return last;
    };
    Object.defineProperty(ssl, option, { configurable: true, enumerable: option !== 'key', get: read });
  }
}

/**
 * Why the pool's sessions do not search as SEARCH_PATH says, or null. A pooler in between may
 * drop the `options` startup parameter (PgBouncer's ignore_startup_parameters) without a word.
 */
export async function searchPathProblem(db: Queryable): Promise<string | null> {
  const { rows: [{ path }] } = await db.query<{ path: string }>(`SELECT pg_catalog.current_setting('search_path') AS path`);
  const schemas = path.split(',').map((s) => s.trim().replace(/^"(.*)"$/, '$1'));
  if (schemas.join(',') === SEARCH_PATH.replace(' ', '')) return null;
  return `the broker's PostgreSQL sessions search "${path}", not "${SEARCH_PATH}": something between the broker and PostgreSQL dropped `
    + 'the options startup parameter that sets it (behind PgBouncer 1.20 or later, list search_path in track_extra_parameters, not options in ignore_startup_parameters). '
    + 'Refusing to start: a role an issued credential may create objects in could otherwise put functions in the broker\'s way';
}

const NO_TIMEOUTS: DbTimeouts = { lockTimeoutSeconds: 0, queryTimeoutSeconds: 0 };

export function createPool(connectionString: string, logger: Logger, max = 10, timeouts = NO_TIMEOUTS): pg.Pool {
  const pool = new pg.Pool(connectionConfig(connectionString, {
    max,
    idleTimeoutMillis: 30_000,
    application_name: 'pg-credential-broker',
    ...sessionSettings(timeouts, true),
  }));
  pool.on('error', (err) => logger.warn({ err: { message: err.message, code: (err as { code?: string }).code } }, 'idle PostgreSQL connection failed'));
  pool.on('connect', (client) => client.on('error', () => undefined));
  return pool;
}

export async function withTransaction<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  return withBatchedTransaction(pool, '', (client) => fn(client));
}

/**
 * Named, not left to the server's default: every transaction here takes a lock (an identity's,
 * a lease row's) and then reads what the lock guards, which is only fresh if each statement takes
 * its own snapshot. A DBA's `default_transaction_isolation = 'repeatable read'` for the broker's
 * role would otherwise freeze the snapshot before the lock wait, and let quotas be overrun.
 */
export const BEGIN = 'BEGIN ISOLATION LEVEL READ COMMITTED';

/**
 * A transaction in the fewest round trips: `begin` (statements without parameters) travels with
 * BEGIN in one simple query, whose last result `fn` receives, and `fn` ends the transaction by
 * calling `commit(sql)`, which sends `sql` and COMMIT in one simple query (a multi-statement simple query stops at the first error,
 * so COMMIT never runs after a failed `sql`). Each statement still gets its own snapshot. Any
 * error rolls back; if `fn` returns without committing, COMMIT is sent on its own.
 */
export async function withBatchedTransaction<T>(
  pool: pg.Pool,
  begin: string,
  fn: (client: pg.PoolClient, commit: (sql?: string) => Promise<void>, begun: pg.QueryResult) => Promise<T>,
): Promise<T> {
  const client = await pool.connect();
  let broken = false;
  let committed = false;
  const commit = async (sql?: string) => {
    await client.query(sql ? commitBatch(pool, sql) : 'COMMIT');
    committed = true;
  };
  try {
    const begun = await client.query(begin ? `${BEGIN};\n${begin}` : BEGIN);
    // A multi-statement simple query answers with one result per statement.
    const result = await fn(client, commit, Array.isArray(begun) ? begun[begun.length - 1] : begun);
    if (!committed) await commit();
    return result;
  } catch (err) {
    // After a query timeout the connection may still be waiting on its statement: a ROLLBACK
    // would queue behind it. Discarding the connection rolls back on the server's side.
    if (isQueryTimeout(err)) {
      broken = true;
      throw err;
    }
    try {
      await client.query('ROLLBACK');
    } catch {
      broken = true;
    }
    throw err;
  } finally {
    client.release(broken ? true : undefined);
  }
}

const CONNECTION_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ECONNABORTED', 'ETIMEDOUT', 'EPIPE', 'ENOTFOUND', 'EHOSTUNREACH', 'EHOSTDOWN', 'ENETUNREACH', 'EAI_AGAIN']);

/** pg's client-side query_timeout fired (see sessionSettings). */
export function isQueryTimeout(err: unknown): boolean {
  return err instanceof Error && err.message === 'Query read timeout';
}

/**
 * SQLSTATE 55P03 (a lock wait passed lock_timeout) or 57014 (statement_timeout, or a cancel by an
 * operator): PostgreSQL stopped the statement and rolls its transaction back.
 */
export function isCancelledWait(err: unknown): '55P03' | '57014' | null {
  const code = !!err && typeof err === 'object' ? (err as { code?: string }).code : undefined;
  return code === '55P03' || code === '57014' ? code : null;
}

/** True when the error means PostgreSQL itself is unreachable, not that a statement failed. */
export function isConnectionError(err: unknown): boolean {
  if (!err || typeof err !== 'object') return false;
  const { code, message } = err as { code?: string; message?: string };
  if (code && CONNECTION_CODES.has(code)) return true;
  // 57P01-03: admin shutdown, crash shutdown, cannot connect now (starting up, shutting down,
  // recovery); 53300: too many connections, i.e. full for now; class 08: connection exceptions.
  if (code && (/^57P0[123]$/.test(code) || code === '53300' || code.startsWith('08'))) return true;
  if (isQueryTimeout(err)) return true;
  return typeof message === 'string' && /Connection terminated|timeout exceeded when trying to connect|Client has encountered a connection error|Connection terminated unexpectedly/.test(message);
}
