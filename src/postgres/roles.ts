import { asCreator } from './creator-functions.js';
import { actAs } from './creators.js';
import type { Queryable } from './pool.js';
import { escapeIdent, escapeLit } from './sql.js';

export interface NewRole {
  username: string;
  /** A SCRAM-SHA-256 verifier: the plaintext password never reaches PostgreSQL. */
  verifier: string;
  validUntil: Date;
  connectionLimit: number;
  grantRole: string;
  managedRole: string;
  /**
   * The creator role to act as (PostgreSQL 16+, see creators.ts), or null on 15, where the
   * broker creates the role itself. Either way nobody is made a member of the issued role: the
   * teardown takes the membership it needs to end its sessions and DROP OWNED.
   */
  creator: string | null;
  assumeRole: boolean;
  comment: string;
}

/**
 * DDL for one issued role, to run inside a transaction: one statement that runs it as the
 * creator (see creator-functions.ts; on 15 the statements themselves, run by the broker). Utility statements
 * take no bind parameters, so every identifier goes through escapeIdent and every literal through
 * escapeLit; the role name itself comes from our own alphabet.
 */
export function createRoleSql(role: NewRole): string {
  const name = escapeIdent(role.username);
  const marker = escapeIdent(role.managedRole);
  // The marker role only tags what this deployment issued. Joined through IN ROLE, a holder could
  // SET ROLE to it, and whatever it created as the marker (or default privileges it set for it)
  // would outlive its lease, in reach of every other issued role. 16+ can join it without SET
  // or INHERIT (a creator acts on 16+ only); on 15 every membership allows SET ROLE.
  const statements = [
    `CREATE ROLE ${name} LOGIN PASSWORD ${escapeLit(role.verifier)} VALID UNTIL ${escapeLit(role.validUntil.toISOString())}` +
      ` CONNECTION LIMIT ${Math.trunc(role.connectionLimit)}` +
      ` IN ROLE ${escapeIdent(role.grantRole)}${role.creator ? '' : `, ${marker}`}`,
  ];
  if (role.creator) statements.push(`GRANT ${marker} TO ${name} WITH INHERIT FALSE, SET FALSE`);
  statements.push(`COMMENT ON ROLE ${name} IS ${escapeLit(role.comment)}`);
  const sql = asCreator(role.creator, statements.join(';\n'));
  if (!role.assumeRole) return sql;
  // PostgreSQL refuses to validate a `role` setting inside a SECURITY DEFINER function.
  const assume = `ALTER ROLE ${name} SET role = ${escapeLit(role.grantRole)}`;
  return role.creator ? `${sql};\n${actAs(role.creator)}${assume};\nRESET ROLE` : `${sql};\n${assume}`;
}

export async function setValidUntil(client: Queryable, username: string, validUntil: Date, creator: string | null): Promise<void> {
  await client.query(asCreator(creator, `ALTER ROLE ${escapeIdent(username)} VALID UNTIL ${escapeLit(validUntil.toISOString())}`));
}

const FORBIDDEN_ATTRIBUTES = { rolsuper: 'SUPERUSER', rolcreaterole: 'CREATEROLE', rolbypassrls: 'BYPASSRLS', rolreplication: 'REPLICATION' } as const;

/**
 * Why a role may not be handed out, or null when it is safe. A grant role that is, or is
 * (transitively) a member of, a superuser, CREATEROLE, BYPASSRLS or REPLICATION role or a
 * predefined pg_* role would let a short-lived login escalate (on PG 15 CREATEROLE can grant
 * itself pg_execute_server_program).
 */
export async function grantRoleProblem(client: Queryable, grantRole: string, managedRole: string): Promise<string | null> {
  if (grantRole === managedRole) return 'grant_role cannot be the broker marker role';
  const { rows } = await client.query<{
    rolname: string;
    rolsuper: boolean;
    rolcreaterole: boolean;
    rolbypassrls: boolean;
    rolreplication: boolean;
    rolcanlogin: boolean;
    depth: number;
  }>(
    `WITH RECURSIVE up(oid, depth) AS (
       SELECT oid, 0 FROM pg_roles WHERE rolname = $1
       UNION
       SELECT m.roleid, up.depth + 1 FROM pg_auth_members m JOIN up ON m.member = up.oid WHERE up.depth < 64
     )
     SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolbypassrls, r.rolreplication, r.rolcanlogin, min(up.depth) AS depth
       FROM up JOIN pg_roles r ON r.oid = up.oid
      GROUP BY r.rolname, r.rolsuper, r.rolcreaterole, r.rolbypassrls, r.rolreplication, r.rolcanlogin
      ORDER BY depth, r.rolname`,
    [grantRole],
  );
  if (rows.length === 0) return `grant_role ${grantRole} does not exist`;
  for (const row of rows) {
    const via = row.rolname === grantRole ? `grant_role ${grantRole}` : `grant_role ${grantRole} inherits from ${row.rolname}, which`;
    if (row.rolname.startsWith('pg_')) return `${via} is a predefined PostgreSQL role`;
    for (const [attr, label] of Object.entries(FORBIDDEN_ATTRIBUTES)) {
      if (row[attr as keyof typeof FORBIDDEN_ATTRIBUTES]) return `${via} has ${label}`;
    }
    if (row.rolname === managedRole) return `grant_role ${grantRole} is a member of the broker marker role`;
  }
  if (rows[0].rolcanlogin) return `grant_role ${grantRole} can log in; map policies onto NOLOGIN group roles`;
  return null;
}

export async function databaseExists(client: Queryable, database: string): Promise<boolean> {
  const { rowCount } = await client.query('SELECT 1 FROM pg_database WHERE datname = $1 AND datallowconn', [database]);
  return (rowCount ?? 0) > 0;
}

/**
 * SQL condition: the pg_roles row `alias` is a role this deployment issued, i.e. a plain member
 * of the marker role named by parameter `param`. On PG 16+ the broker itself is a member of the
 * marker role it created (with ADMIN OPTION), so ADMIN members, the current user and any role
 * with SUPERUSER, CREATEROLE, REPLICATION or BYPASSRLS (none of which the broker ever issues) are
 * excluded: the reaper must never be able to drop them.
 */
export function issuedRoleCondition(alias: string, param: string): string {
  return `EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                   WHERE m.member = ${alias}.oid AND g.rolname = ${param} AND NOT m.admin_option)
          AND ${alias}.rolname <> current_user AND NOT ${alias}.rolsuper AND NOT ${alias}.rolcreaterole
          AND NOT ${alias}.rolreplication AND NOT ${alias}.rolbypassrls`;
}
