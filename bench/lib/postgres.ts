import pg from 'pg';
import type { TestPostgres } from '../../test/helpers/postgres.js';
import * as proc from './proc.js';

/** The bench's PostgreSQL: statement logging off, and the postmaster's pid for CPU accounting. */

/**
 * The test helper starts PostgreSQL with log_statement=all for tests that read the log. The
 * bench turns statement logging off for every session (floor and broker alike). ALTER SYSTEM
 * cannot override a `-c` flag given on the server's command line (command-line settings rank
 * above postgresql.auto.conf), so per-role defaults do the job when it does not take.
 */
export async function quietPostgres(pgs: TestPostgres): Promise<string> {
  await pgs.query(`ALTER SYSTEM SET log_statement = 'none'`, [], 'postgres');
  await pgs.query('SELECT pg_reload_conf()', [], 'postgres');
  await new Promise((r) => setTimeout(r, 200));
  const [{ source }] = await pgs.query<{ source: string }>(`SELECT source FROM pg_settings WHERE name = 'log_statement'`, [], 'postgres');
  const check = new pg.Client({ connectionString: pgs.brokerUrl });
  // As every bench client: an idle connection's error surfaces at its next query, not as a crash.
  check.on('error', () => undefined);
  await check.connect();
  let value = (await check.query<{ log_statement: string }>('SHOW log_statement')).rows[0].log_statement;
  await check.end();
  if (value === 'none') return `ALTER SYSTEM SET log_statement = 'none' (source: ${source})`;
  await pgs.query(`ALTER ROLE ALL SET log_statement = 'none'`, [], 'postgres');
  const again = new pg.Client({ connectionString: pgs.brokerUrl });
  again.on('error', () => undefined);
  await again.connect();
  value = (await again.query<{ log_statement: string }>('SHOW log_statement')).rows[0].log_statement;
  await again.end();
  if (value !== 'none') throw new Error(`could not turn log_statement off (still ${value})`);
  return `ALTER SYSTEM SET log_statement = 'none' did not override the server's -c log_statement=all (command line ranks above postgresql.auto.conf), so ALTER ROLE ALL SET log_statement = 'none' applies it to every session`;
}

/** The postmaster: the parent of a backend, read while that backend's session is still open. */
export async function postmasterPid(pgs: TestPostgres): Promise<number> {
  const client = new pg.Client({ connectionString: pgs.superuserUrl });
  client.on('error', () => undefined);
  await client.connect();
  try {
    const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid');
    const ppid = proc.parentPid(rows[0].pid);
    if (!ppid) throw new Error('could not find the postmaster pid in /proc');
    return ppid;
  } finally {
    await client.end();
  }
}
