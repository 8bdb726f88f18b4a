import { escapeIdent, escapeLit } from './sql.js';
import type { Queryable } from './pool.js';

/**
 * How the broker acts as a creator role (PostgreSQL 16+, see creators.ts): through a SECURITY
 * DEFINER function each creator owns, `broker.<creator>(statements text)`, which runs its
 * argument as that creator. Only the broker may execute it.
 *
 * Why not SET ROLE: PostgreSQL checks SET ROLE by walking every role the session user may become,
 * which includes each creator's memberships, that is one row per live issued role; every change to
 * any role's memberships (each issuance and each teardown is one) throws that walk's cache away.
 * With 10,000 live issued roles a SET LOCAL ROLE cost about 8 ms of server CPU, as much as the
 * whole issuance. Calling a function checks one EXECUTE privilege, granted to the broker directly.
 *
 * The function gives the broker nothing it lacked: it already may SET ROLE to every creator. It
 * refuses a session whose login may not SET ROLE to the broker: EXECUTE is also held by every role
 * that inherits the broker's privileges, while SET ROLE needs SET on each link, so a role granted
 * the broker WITH INHERIT TRUE, SET FALSE (a reporting role, say) could otherwise act as a creator.
 * Statements that take bind parameters, those in other databases (where no such function
 * exists) and a `role` setting (refused inside SECURITY DEFINER) still use SET LOCAL ROLE.
 */

/**
 * The function's body for the broker's role `broker`: only a session that logged in as it, or
 * whose login may SET ROLE to it, may run it. The first test is the broker's own and costs
 * nothing; pg_has_role would walk the memberships of every creator (see above). Not 42501, which
 * issuance reads as creators lacking ADMIN OPTION.
 */
function body(broker: string): string {
  return `BEGIN
  IF session_user <> ${escapeLit(broker)} THEN
    IF NOT pg_has_role(session_user, ${escapeLit(broker)}, 'SET') THEN
      RAISE EXCEPTION 'only the broker''s role may act as a creator role, by logging in as it or through SET ROLE';
    END IF;
  END IF;
  EXECUTE statements;
END`;
}
// A cluster-wide createrole_self_grant ('set, inherit') would make the creator a member of every
// role it creates: the issued roles' privileges for the creators, and every live role back in the
// membership graphs PostgreSQL walks. search_path: nothing the statements name resolves elsewhere.
const SETTINGS = ['search_path=pg_catalog, pg_temp', 'createrole_self_grant='];

export function creatorFunction(creator: string): string {
  return `broker.${escapeIdent(creator)}`;
}

/** Text quoted for SQL without changing a character of it, so the server's log shows it as sent. */
export function dollarQuote(text: string): string {
  let tag = 'pgcb';
  // The quote ends at the tag's first occurrence, which may also begin inside the text's end.
  while ((text + `$${tag}$`).indexOf(`$${tag}$`) !== text.length) tag += '_';
  return `$${tag}$${text}$${tag}$`;
}

/** One statement that runs `sql` (one or more statements) as `creator`; `sql` itself for null (the broker acts). */
export function asCreator(creator: string | null, sql: string): string {
  return creator ? `SELECT ${creatorFunction(creator)}(${dollarQuote(sql)})` : sql;
}

/**
 * Makes sure each creator owns its function, as above, executable by the current user and by no
 * one else (PUBLIC loses the default EXECUTE), and run only by sessions that are, or may become,
 * the current user. A function that differs in any of that is made again. The creator needs CREATE and USAGE on the schema only while it creates its function.
 */
export async function ensureCreatorFunctions(db: Queryable, creators: string[]): Promise<void> {
  const { rows: [{ me }] } = await db.query<{ me: string }>('SELECT current_user AS me');
  const { rows } = await db.query<{ name: string; exists: boolean; owner: string | null }>(
    `SELECT n AS name, p.oid IS NOT NULL AS exists, o.rolname AS owner
       FROM unnest($1::text[]) AS n
       LEFT JOIN pg_proc p ON p.pronamespace = 'broker'::regnamespace AND p.proname = n AND p.proargtypes = '25'::oidvector
       LEFT JOIN pg_roles o ON o.oid = p.proowner
      WHERE p.oid IS NULL OR o.rolname IS DISTINCT FROM n OR NOT p.prosecdef OR p.prosrc <> $2
         OR p.prorettype <> 'void'::regtype OR p.proconfig IS DISTINCT FROM $3::text[]
         OR NOT has_function_privilege(current_user, p.oid, 'EXECUTE')
         OR EXISTS (SELECT 1 FROM aclexplode(COALESCE(p.proacl, acldefault('f', p.proowner))) a
                     WHERE a.privilege_type = 'EXECUTE' AND a.grantee NOT IN (p.proowner, (SELECT oid FROM pg_roles WHERE rolname = current_user)))`,
    [creators, body(me), SETTINGS],
  );
  if (rows.length === 0) return;
  for (const row of rows) {
    const creator = escapeIdent(row.name);
    const fn = `${creatorFunction(row.name)}(text)`;
    // Made afresh rather than replaced, so no grant an older one carried survives. One owned by
    // someone else (the broker, say) is dropped by the broker, the creator's own by the creator.
    const statements = [
      ...(row.exists && row.owner !== row.name ? [`DROP FUNCTION ${fn}`] : []),
      `GRANT CREATE, USAGE ON SCHEMA broker TO ${creator}`,
      `SET LOCAL ROLE ${creator}`,
      ...(row.exists && row.owner === row.name ? [`DROP FUNCTION ${fn}`] : []),
      `CREATE FUNCTION ${creatorFunction(row.name)}(statements text) RETURNS void LANGUAGE plpgsql SECURITY DEFINER
         SET search_path = pg_catalog, pg_temp SET createrole_self_grant = '' AS ${dollarQuote(body(me))}`,
      `REVOKE ALL ON FUNCTION ${fn} FROM PUBLIC`,
      `GRANT EXECUTE ON FUNCTION ${fn} TO ${escapeIdent(me)}`,
      'RESET ROLE',
      `REVOKE CREATE, USAGE ON SCHEMA broker FROM ${creator}`,
    ];
    await db.query(statements.join(';\n'));
  }
}
