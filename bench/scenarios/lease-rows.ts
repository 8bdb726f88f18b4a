import pg from 'pg';
import type { TestPostgres } from '../../test/helpers/postgres.js';

/**
 * P5's table: `rows` lease rows bulk-loaded into broker.leases, spread over `subjects` subjects,
 * 20 policies and three states, with the migration's indexes rebuilt afterwards. Returns seconds.
 * Policy and state vary independently (state from g mod 100, policy from g div 100): every policy
 * holds about 1 % active, 9 % revoked and 90 % expired rows, so a policy + state filter is as
 * selective as the state alone.
 */
export async function insertLeaseRows(pgs: TestPostgres, issuer: string, rows: number, subjects: number): Promise<number> {
  const start = performance.now();
  // Index builds after a bulk load beat a million index insertions; the definitions are read
  // back from the catalogue, so the indexes are exactly the migration's.
  const indexes = await pgs.query<{ name: string; def: string }>(
    `SELECT indexname AS name, indexdef AS def FROM pg_indexes
      WHERE schemaname = 'broker' AND tablename = 'leases'
        AND indexname NOT IN (SELECT conname FROM pg_constraint WHERE conrelid = 'broker.leases'::regclass)`,
  );
  const client = new pg.Client({ connectionString: pgs.superuserUrl.replace(/\/postgres$/, '/broker') });
  client.on('error', () => undefined);
  await client.connect();
  try {
    await client.query(`SET maintenance_work_mem = '256MB'`);
    for (const ix of indexes) await client.query(`DROP INDEX broker.${pg.escapeIdentifier(ix.name)}`);
    const batch = 250_000;
    for (let from = 1; from <= rows; from += batch) {
      const to = Math.min(rows, from + batch - 1);
      // Newest rows have the highest g; created_at is unique to the millisecond and spreads over days.
      await client.query(
        `INSERT INTO broker.leases (id, username, policy, grant_role, database, issuer, subject, claims, state, created_at,
                                    expires_at, max_expires_at, ended_at, ended_by, end_reason, client_ip, user_agent, request_id)
         SELECT gen_random_uuid(), 'lease_p5_' || g, 'p5-policy-' || ((g / 100) % 20), 'app_readers', 'broker', $3,
                'p5-subject-' || (g % $4), jsonb_build_object('sub', 'p5-subject-' || (g % $4)),
                s.state, c.at,
                CASE WHEN s.state = 'active' THEN now() + interval '1 day' ELSE c.at + interval '15 minutes' END,
                CASE WHEN s.state = 'active' THEN now() + interval '2 days' ELSE c.at + interval '1 hour' END,
                CASE WHEN s.state = 'active' THEN NULL ELSE c.at + interval '15 minutes' END,
                CASE WHEN s.state = 'active' THEN NULL WHEN s.state = 'expired' THEN 'reaper' ELSE 'admin' END,
                CASE WHEN s.state = 'active' THEN NULL WHEN s.state = 'expired' THEN 'expired' ELSE 'revoked by request' END,
                '10.0.' || (g % 250) || '.' || (g % 200), 'bench/1.0', gen_random_uuid()::text
           FROM generate_series($1::int, $2::int) AS g,
                LATERAL (SELECT date_trunc('milliseconds', now() - interval '1 hour' - ($5::int - g) * interval '250 milliseconds') AS at) c,
                LATERAL (SELECT CASE WHEN g % 100 = 0 THEN 'active' WHEN g % 10 = 0 THEN 'revoked' ELSE 'expired' END AS state) s`,
        [from, to, issuer, subjects, rows],
      );
    }
    for (const ix of indexes) await client.query(ix.def);
    await client.query('VACUUM ANALYZE broker.leases');
  } finally {
    await client.end().catch(() => undefined);
  }
  return (performance.now() - start) / 1000;
}
