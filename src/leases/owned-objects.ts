import { actAs } from '../postgres/creators.js';
import type { Queryable } from '../postgres/pool.js';
import { escapeIdent } from '../postgres/sql.js';
import type { RoleToDrop } from './teardown.js';

/**
 * Where each role's objects go: its own `reassign_to` (a lease's grant_role) while that role
 * exists, else, like an orphan's (reaper/orphans.ts), its first group other than the marker
 * role, else the broker's own role. A group an operator dropped after issuance would otherwise
 * make REASSIGN OWNED fail with 42704 on every attempt, and the role could never be dropped.
 */
export interface ReassignTargets {
  /** username -> the role its objects go to. */
  to: Map<string, string>;
  /** The broker's own role (the last fallback). */
  broker: string;
}

export async function reassignTargets(db: Queryable, roles: RoleToDrop[], managedRole: string): Promise<ReassignTargets> {
  const { rows } = await db.query<{ username: string; target: string; broker: string }>(
    `SELECT x.username, current_user AS broker,
            COALESCE(t.rolname,
                     (SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                       WHERE m.member = r.oid AND g.rolname <> $3 ORDER BY g.rolname LIMIT 1),
                     current_user) AS target
       FROM unnest($1::text[], $2::text[]) AS x(username, target)
       LEFT JOIN pg_roles r ON r.rolname = x.username
       LEFT JOIN pg_roles t ON t.rolname = x.target`,
    [roles.map((r) => r.username), roles.map((r) => r.reassign_to), managedRole],
  );
  return { to: new Map(rows.map((r) => [r.username, r.target])), broker: rows[0]?.broker ?? '' };
}

/**
 * REASSIGN OWNED to each role's target, then DROP OWNED, in one transaction in one database.
 * Objects going to the broker's own role are reassigned by the broker itself: a creator role
 * (16+) lacks the broker's privileges, which REASSIGN OWNED … TO needs, so the creator first
 * grants those roles to the broker, for these statements (the roles are dropped next).
 */
export function ownedObjectsSql(roles: RoleToDrop[], creator: string | null, targets: ReassignTargets): string {
  const byTarget = new Map<string, string[]>();
  for (const role of roles) {
    const target = targets.to.get(role.username) ?? role.reassign_to;
    if (!byTarget.has(target)) byTarget.set(target, []);
    byTarget.get(target)!.push(role.username);
  }
  const reassign = (target: string) => `REASSIGN OWNED BY ${byTarget.get(target)!.map(escapeIdent).join(', ')} TO ${escapeIdent(target)}`;
  const toBroker = creator ? byTarget.get(targets.broker) : undefined;
  const statements = ['BEGIN'];
  if (creator) statements.push(actAs(creator).replace(/;\n$/, ''));
  if (toBroker) statements.push(`GRANT ${toBroker.map(escapeIdent).join(', ')} TO ${escapeIdent(targets.broker)} WITH INHERIT TRUE, SET FALSE`);
  for (const target of byTarget.keys()) if (!toBroker || target !== targets.broker) statements.push(reassign(target));
  if (toBroker) statements.push('RESET ROLE', reassign(targets.broker), actAs(creator).replace(/;\n$/, ''));
  statements.push(`DROP OWNED BY ${roles.map((r) => escapeIdent(r.username)).join(', ')}`);
  statements.push('COMMIT');
  return statements.join(';\n');
}
