import { actAs } from '../postgres/creators.js';
import type { Queryable } from '../postgres/pool.js';
import { escapeIdent, escapeLit } from '../postgres/sql.js';
import type { RoleToDrop } from './teardown-steps.js';

/**
 * SQL condition on pg_auth_members `m` joined to the group's pg_roles row `g`: a group a role's
 * objects may go to. Never the marker role (param `markerParam`), nor a group that is or inherits
 * from a predefined role or one with a privileged attribute; and only a membership with INHERIT and SET (16+; read through to_jsonb so
 * that 15, which has neither column, parses it too): the creator acting for the broker reaches a
 * group only through the issued role, and handing a function or schema over needs SET ROLE to it.
 */
export function eligibleGroupSql(markerParam: string): string {
  // The same walk as the grant_role check (roles.ts): nothing the group inherits from may be
  // predefined or privileged either.
  return `g.rolname <> ${markerParam}
          AND COALESCE((to_jsonb(m) ->> 'inherit_option')::boolean, true)
          AND COALESCE((to_jsonb(m) ->> 'set_option')::boolean, true)
          AND NOT EXISTS (
            WITH RECURSIVE up(oid) AS (SELECT g.oid UNION SELECT m2.roleid FROM pg_auth_members m2 JOIN up ON m2.member = up.oid)
            SELECT 1 FROM up JOIN pg_roles p ON p.oid = up.oid
             WHERE p.rolname LIKE 'pg\\_%' OR p.rolsuper OR p.rolcreaterole OR p.rolbypassrls OR p.rolreplication)`;
}

/**
 * Where each role's objects go: its `reassign_to` (a lease's grant_role) if it is still a group
 * the role may hand them to, else, like an orphan's, the first other such group, else nowhere. A
 * group an operator dropped after issuance would otherwise make REASSIGN OWNED fail with 42704
 * on every attempt.
 *
 * Never the broker's own role: a SECURITY DEFINER function the credential's holder created would
 * then run as the broker, which holds ADMIN OPTION on every group, for anyone allowed to call it
 * (PUBLIC by default). A role with objects and no group to take them is left for an operator.
 */
export async function reassignTargets(db: Queryable, roles: RoleToDrop[], managedRole: string): Promise<Map<string, string | null>> {
  const { rows } = await db.query<{ username: string; target: string | null }>(
    `SELECT x.username,
            (SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
              WHERE m.member = r.oid AND ${eligibleGroupSql('$3')}
              ORDER BY g.rolname = x.target DESC, g.rolname LIMIT 1) AS target
       FROM unnest($1::text[], $2::text[]) AS x(username, target)
       LEFT JOIN pg_roles r ON r.rolname = x.username`,
    [roles.map((r) => r.username), roles.map((r) => r.reassign_to), managedRole],
  );
  return new Map(rows.map((r) => [r.username, r.target]));
}

/** The failure recorded for a role that owns objects no group can take. */
export function noReassignTarget(username: string): Error {
  return new Error(`${username} owns objects and belongs to no group that could take them; `
    + `reassign them by hand (REASSIGN OWNED BY ${escapeIdent(username)} TO <role>) or drop them, and the next attempt drops the role`);
}

/** What one database holds of the roles being dropped. */
export interface OwnedHere {
  /** Roles that own objects here REASSIGN OWNED moves (not only privileges or default privileges). */
  owners: Set<string>;
  /** Roles that own a schema here. */
  schemaOwners: Set<string>;
}

/**
 * REASSIGN OWNED to each role's target, then DROP OWNED, in one transaction in one database.
 * Throws, sending nothing, when a role owning objects here has no target.
 *
 * Schemas go first: REASSIGN OWNED walks the role's objects in catalogue order, and a function
 * (or operator, collation…) met before its schema needs the new owner to hold CREATE on that
 * schema, which it has only once it owns it; with the wrong order every attempt would fail.
 * The membership this needs is taken here: on 16+ the creator may SET ROLE to the roles only
 * inside this transaction.
 */
export function ownedObjectsSql(roles: RoleToDrop[], creator: string | null, targets: Map<string, string | null>, here: OwnedHere): string {
  const byTarget = new Map<string, string[]>();
  for (const role of roles.filter((r) => here.owners.has(r.username) || here.schemaOwners.has(r.username))) {
    const target = targets.get(role.username);
    if (!target) throw noReassignTarget(role.username);
    if (!byTarget.has(target)) byTarget.set(target, []);
    byTarget.get(target)!.push(role.username);
  }
  const names = roles.map((r) => escapeIdent(r.username)).join(', ');
  const statements = ['BEGIN'];
  if (creator) {
    statements.push(actAs(creator).replace(/;\n$/, ''));
    statements.push(`GRANT ${names} TO ${escapeIdent(creator)} WITH INHERIT TRUE, SET TRUE`);
  } else {
    // PostgreSQL 15, or roles the broker created itself before creator roles existed: DROP OWNED
    // needs the roles' privileges, which CREATEROLE alone does not give.
    statements.push(`GRANT ${names} TO CURRENT_USER`);
  }
  const schemaMoves = roles.filter((r) => here.schemaOwners.has(r.username)).map((r) => [r.username, targets.get(r.username)!]);
  if (schemaMoves.length > 0) statements.push(schemasFirstSql(schemaMoves));
  for (const [target, owners] of byTarget) {
    statements.push(`REASSIGN OWNED BY ${owners.map(escapeIdent).join(', ')} TO ${escapeIdent(target)}`);
  }
  statements.push(`DROP OWNED BY ${names}`);
  if (creator) statements.push(`GRANT ${names} TO ${escapeIdent(creator)} WITH INHERIT TRUE, SET FALSE`);
  statements.push('COMMIT');
  return statements.join(';\n');
}

/** ALTER SCHEMA … OWNER TO for every schema each role owns here; names come from the catalogue. */
function schemasFirstSql(moves: string[][]): string {
  const pairs = moves.map(([owner, target]) => `(${escapeLit(owner)}, ${escapeLit(target)})`).join(', ');
  const body = `DECLARE s record; BEGIN
  FOR s IN SELECT n.nspname, m.target FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
             JOIN (VALUES ${pairs}) AS m(owner, target) ON m.owner = r.rolname
  LOOP EXECUTE pg_catalog.format('ALTER SCHEMA %I OWNER TO %I', s.nspname, s.target); END LOOP;
END`;
  // A dollar-quote tag the body cannot contain, whatever the names hold.
  let tag = 'teardown';
  while (body.includes(`$${tag}$`)) tag += '_';
  return `DO $${tag}$${body}$${tag}$`;
}
