import pg from 'pg';
import type { Logger } from 'pino';

export type Queryable = Pick<pg.PoolClient, 'query'>;

export function createPool(connectionString: string, logger: Logger, max = 10): pg.Pool {
  const pool = new pg.Pool({
    connectionString,
    max,
    connectionTimeoutMillis: 5000,
    idleTimeoutMillis: 30_000,
    application_name: 'pg-credential-broker',
  });
  // Without these listeners a server restart or a terminated backend crashes the process.
  pool.on('error', (err) => logger.warn({ err: { message: err.message, code: (err as { code?: string }).code } }, 'idle PostgreSQL connection failed'));
  pool.on('connect', (client) => client.on('error', () => undefined));
  return pool;
}

export async function withTransaction<T>(pool: pg.Pool, fn: (client: pg.PoolClient) => Promise<T>): Promise<T> {
  return withBatchedTransaction(pool, '', (client) => fn(client));
}

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
    await client.query(sql ? `${sql};\nCOMMIT` : 'COMMIT');
    committed = true;
  };
  try {
    const begun = await client.query(begin ? `BEGIN;\n${begin}` : 'BEGIN');
    // A multi-statement simple query answers with one result per statement.
    const result = await fn(client, commit, Array.isArray(begun) ? begun[begun.length - 1] : begun);
    if (!committed) await commit();
    return result;
  } catch (err) {
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

/** True when the error means PostgreSQL itself is unreachable, not that a statement failed. */
export function isConnectionError(err: unknown): boolean {
  if (!err || typeof err !== 'object') return false;
  const { code, message } = err as { code?: string; message?: string };
  if (code && CONNECTION_CODES.has(code)) return true;
  // 57P01-03: admin shutdown, crash shutdown, cannot connect now (starting up, shutting down,
  // recovery); 53300: too many connections, i.e. full for now; class 08: connection exceptions.
  if (code && (/^57P0[123]$/.test(code) || code === '53300' || code.startsWith('08'))) return true;
  return typeof message === 'string' && /Connection terminated|timeout exceeded when trying to connect|Client has encountered a connection error|Connection terminated unexpectedly/.test(message);
}
