import { actAs } from '../postgres/creators.js';
import type { Queryable } from '../postgres/pool.js';
import { escapeIdent } from '../postgres/sql.js';
import type { RoleToDrop } from './teardown.js';

/**
 * Where each role's objects go: its own `reassign_to` (a lease's grant_role) while that role
 * exists, else, like an orphan's, the first other group it inherits from (never the marker role),
 * else nowhere. A group an operator dropped after issuance would otherwise make REASSIGN OWNED
 * fail with 42704 on every attempt.
 *
 * Never the broker's own role: a SECURITY DEFINER function the credential's holder created would
 * then run as the broker, which holds ADMIN OPTION on every group, for anyone allowed to call it
 * (PUBLIC by default). A role with objects and no group to take them is left for an operator.
 * A group joined without INHERIT is no target either: the creator acting for the broker reaches
 * a group's privileges only through the issued role, and REASSIGN OWNED … TO needs them.
 */
export async function reassignTargets(db: Queryable, roles: RoleToDrop[], managedRole: string): Promise<Map<string, string | null>> {
  // inherit_option exists from PostgreSQL 16 on; read through to_jsonb so 15 parses it too.
  const { rows } = await db.query<{ username: string; target: string | null }>(
    `SELECT x.username,
            COALESCE(t.rolname,
                     (SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                       WHERE m.member = r.oid AND g.rolname <> $3 AND COALESCE((to_jsonb(m) ->> 'inherit_option')::boolean, true)
                       ORDER BY g.rolname LIMIT 1)) AS target
       FROM unnest($1::text[], $2::text[]) AS x(username, target)
       LEFT JOIN pg_roles r ON r.rolname = x.username
       LEFT JOIN pg_roles t ON t.rolname = x.target`,
    [roles.map((r) => r.username), roles.map((r) => r.reassign_to), managedRole],
  );
  return new Map(rows.map((r) => [r.username, r.target]));
}

/** The failure recorded for a role that owns objects no group can take. */
export function noReassignTarget(username: string): Error {
  return new Error(`${username} owns objects and belongs to no group that could take them (its grant_role no longer exists); `
    + `reassign them by hand (REASSIGN OWNED BY ${escapeIdent(username)} TO <role>) or drop them, and the next attempt drops the role`);
}

/**
 * REASSIGN OWNED to each role's target, then DROP OWNED, in one transaction in one database.
 * Throws, sending nothing, when a role in `roles` has no target.
 */
export function ownedObjectsSql(roles: RoleToDrop[], creator: string | null, targets: Map<string, string | null>): string {
  const byTarget = new Map<string, string[]>();
  for (const role of roles) {
    const target = targets.has(role.username) ? targets.get(role.username) : role.reassign_to;
    if (!target) throw noReassignTarget(role.username);
    if (!byTarget.has(target)) byTarget.set(target, []);
    byTarget.get(target)!.push(role.username);
  }
  const statements = ['BEGIN'];
  if (creator) statements.push(actAs(creator).replace(/;\n$/, ''));
  for (const [target, owners] of byTarget) {
    statements.push(`REASSIGN OWNED BY ${owners.map(escapeIdent).join(', ')} TO ${escapeIdent(target)}`);
  }
  statements.push(`DROP OWNED BY ${roles.map((r) => escapeIdent(r.username)).join(', ')}`);
  statements.push('COMMIT');
  return statements.join(';\n');
}
