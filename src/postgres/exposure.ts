import type { Queryable } from './pool.js';

/**
 * Who besides the broker may connect to the broker's own database: PUBLIC, the marker role every
 * issued role belongs to (on 15; on 16+ issued roles join it WITH INHERIT FALSE, so its grants
 * reach none of them), or a group a policy hands out. A login there can take the advisory locks
 * the broker relies on (migration, reaper leadership, each identity's issuance lock) and so
 * stall it.
 */
export async function brokerDatabaseOpenTo(db: Queryable, managedRole: string): Promise<string[]> {
  // CASE, not AND: has_database_privilege raises on a role that does not exist.
  const { rows } = await db.query<{ role: string }>(
    `SELECT r AS role FROM (SELECT 'public' AS r UNION SELECT $1 WHERE current_setting('server_version_num')::int < 160000
                            UNION SELECT grant_role FROM broker.policies) AS candidates
      WHERE CASE WHEN r = 'public' OR EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
                 THEN has_database_privilege(r, current_database(), 'CONNECT') ELSE false END
      ORDER BY r`,
    [managedRole],
  );
  const roles = rows.map((row) => row.role);
  // Every role holds what PUBLIC holds: name the marker only for a grant of its own.
  return roles.includes('public') ? ['public'] : roles;
}

/**
 * Why credentials of a policy mapping onto `grantRole` could connect to the broker's own database
 * (see brokerDatabaseOpenTo), or null when they could not. Read when a policy is stored, which the
 * start-up check never sees.
 */
export async function grantReachesBrokerDatabase(db: Queryable, grantRole: string): Promise<string | null> {
  const { rows } = await db.query<{ db: string; grant_reaches: boolean; public_reaches: boolean }>(
    `SELECT current_database() AS db, has_database_privilege($1, current_database(), 'CONNECT') AS grant_reaches,
            has_database_privilege('public', current_database(), 'CONNECT') AS public_reaches`,
    [grantRole],
  );
  const row = rows[0];
  if (!row?.grant_reaches) return null;
  const who = row.public_reaches ? 'PUBLIC holds CONNECT there' : `grant_role ${grantRole} holds CONNECT there, itself or through a group`;
  return `credentials issued under this policy can connect to the broker's own database ${row.db} (${who}), where a login can take the broker's advisory locks`
    + ` and stall issuance or reaping: revoke that CONNECT (README, Least-privilege setup)`;
}
