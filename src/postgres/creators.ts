import { ensureCreatorFunctions } from './creator-functions.js';
import { isCancelledWait, isConnectionError, type Queryable } from './pool.js';
import { escapeIdent } from './sql.js';

/**
 * Creator roles: on PostgreSQL 16+, issued roles are created by one of a few NOLOGIN roles the
 * broker may act as (creator-functions.ts), never by the broker's own role.
 *
 * Why: since 16, a non-superuser CREATEROLE role automatically holds ADMIN OPTION on every role
 * it creates, and PostgreSQL checks each CREATE ROLE … IN ROLE, ALTER ROLE and DROP ROLE by
 * walking the acting role's whole membership graph, rebuilt after every change to
 * pg_auth_members (acl.c, roles_is_member_of: an ADMIN lookup never uses the cache). With the
 * broker as creator, that graph holds every live issued role, so every role statement got slower
 * with each live lease: 12 ms per CREATE ROLE at 1,000 live leases, 56 ms at 3,000. Spread over
 * CREATOR_COUNT creators, each walk sees 1/CREATOR_COUNT of them, and issued roles are no longer
 * members of the broker at all, so the broker's own graph stays small. 64 rather than 16: with
 * 10,000 live roles, a CREATE ROLE transaction 4.2 → 1.3 ms and a DROP ROLE 1.8 → 0.6 ms, and a
 * reaper draining them kept issuance p99 within 1.2× of idle instead of 1.8–2.0×; with few live
 * roles, a teardown batch pays for more statements (one per creator holding any of its roles).
 *
 * PostgreSQL 15 checks none of this (CREATEROLE alone may create, grant and drop any
 * non-superuser role), and there the broker keeps creating roles itself.
 */
// Names get a `_cNN` suffix: BROKER_MANAGED_ROLE is limited to 59 characters so they still fit in 63.
export const CREATOR_COUNT = 64;

export function creatorNames(managedRole: string): string[] {
  return Array.from({ length: CREATOR_COUNT }, (_, k) => `${managedRole}_c${String(k).padStart(2, '0')}`);
}

/** True when the server needs creator roles (16+); 15 lets CREATEROLE act without ADMIN OPTION. */
export async function usesCreators(db: Queryable): Promise<boolean> {
  const { rows } = await db.query<{ v: number }>(`SELECT current_setting('server_version_num')::int AS v`);
  return rows[0].v >= 160000;
}

const admins = (names: string[]) => names.map(escapeIdent).join(', ');

/**
 * Makes sure, on 16+, that every creator exists (NOLOGIN, CREATEROLE), that the broker may SET
 * ROLE to it without inheriting anything from it, and that it holds ADMIN OPTION (no INHERIT, no
 * SET) on the marker role and on every group role `groups` names that the broker itself holds
 * ADMIN OPTION on, and that each has the function the broker acts through (creator-functions.ts).
 * Idempotent; callers serialise concurrent runs (migration lock). Returns the creators, or [] on 15.
 */
export async function ensureCreators(db: Queryable, managedRole: string, groups: string[] = []): Promise<string[]> {
  if (!(await usesCreators(db))) return [];
  const names = creatorNames(managedRole);
  const { rows } = await db.query<{ name: string; exists: boolean; can_login: boolean; broker_can_set: boolean }>(
    `SELECT n AS name, r.oid IS NOT NULL AS exists, COALESCE(r.rolcanlogin, false) AS can_login,
            EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.member
                     WHERE m.roleid = r.oid AND b.rolname = current_user AND m.set_option) AS broker_can_set
       FROM unnest($1::text[]) AS n LEFT JOIN pg_roles r ON r.rolname = n`,
    [names],
  );
  for (const row of rows) {
    if (row.can_login) throw new Error(`creator role ${row.name} exists and can log in; it must be a NOLOGIN role the broker created`);
    try {
      // createrole_self_grant set cluster-wide would also make the broker an inheriting member.
      if (!row.exists) await db.query(`SET LOCAL createrole_self_grant = '';\nCREATE ROLE ${escapeIdent(row.name)} NOLOGIN CREATEROLE`);
      if (!row.broker_can_set) await db.query(`GRANT ${escapeIdent(row.name)} TO CURRENT_USER WITH INHERIT FALSE, SET TRUE`);
    } catch (err) {
      // Typically a role of that name someone else created, which the broker holds no ADMIN OPTION on.
      // A connection failure or a cancelled wait keeps its own error, and with it its 503.
      if (isConnectionError(err) || isCancelledWait(err)) throw err;
      throw new Error(`cannot set up creator role ${row.name}: ${(err as Error).message}; drop it, or let the broker create it`);
    }
  }
  await ensureCreatorFunctions(db, names);
  await grantToCreators(db, names, [managedRole, ...groups]);
  return names;
}

/**
 * Grants each role in `roles` to every creator lacking it, WITH ADMIN OPTION and neither INHERIT
 * nor SET: the creators hand these roles out, they never use them. Roles the broker itself holds
 * no ADMIN OPTION on are skipped (the policy check reports those).
 */
export async function grantToCreators(db: Queryable, creators: string[], roles: string[]): Promise<void> {
  if (creators.length === 0 || roles.length === 0) return;
  // Direct catalogue reads: pg_has_role(…, 'MEMBER WITH ADMIN OPTION') would walk the broker's
  // whole membership graph once per call.
  const { rows } = await db.query<{ role: string; missing: string[] }>(
    `SELECT g.rolname AS role, array_agg(c.n ORDER BY c.n) AS missing
       FROM pg_roles g CROSS JOIN unnest($2::text[]) AS c(n) JOIN pg_roles cr ON cr.rolname = c.n
      WHERE g.rolname = ANY($1)
        AND EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.member
                     WHERE m.roleid = g.oid AND b.rolname = current_user AND m.admin_option)
        AND NOT EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.roleid = g.oid AND m.member = cr.oid AND m.admin_option)
      GROUP BY g.rolname`,
    [roles, creators],
  );
  for (const row of rows) {
    await db.query(`GRANT ${escapeIdent(row.role)} TO ${admins(row.missing)} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE`);
  }
}

/** Whether the broker itself was granted `role` WITH ADMIN OPTION (what the README asks for on 16+). */
export async function brokerHoldsAdmin(db: Queryable, role: string): Promise<boolean> {
  const { rowCount } = await db.query(
    `SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles b ON b.oid = m.member
      WHERE g.rolname = $1 AND b.rolname = current_user AND m.admin_option`,
    [role],
  );
  return (rowCount ?? 0) > 0;
}

/** A random creator: issued roles spread evenly, whatever the request pattern. */
export function pickCreator(creators: string[]): string | null {
  return creators.length === 0 ? null : creators[Math.floor(Math.random() * creators.length)];
}

/**
 * SQL expression: the creator holding ADMIN OPTION on the pg_roles row `alias`, among the names in
 * parameter `param`; NULL for roles the broker created itself (on 15, or before creators existed)
 * or that someone else made.
 */
export function creatorOf(alias: string, param: string): string {
  return `(SELECT c.rolname FROM pg_auth_members m JOIN pg_roles c ON c.oid = m.member
            WHERE m.roleid = ${alias}.oid AND m.admin_option AND c.rolname = ANY(${param}) ORDER BY 1 LIMIT 1)`;
}

/** Prefix for statements that must run as `creator` inside a transaction; '' for the broker itself. */
export function actAs(creator: string | null): string {
  return creator ? `SET LOCAL ROLE ${escapeIdent(creator)};\n` : '';
}
