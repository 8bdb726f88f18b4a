import type { Queryable } from './pool.js';
import { escapeIdent, escapeLit } from './sql.js';

/**
 * Which database's deployment a marker role belongs to, written in the role's comment (roles are
 * cluster-wide, comments on them too). The orphan sweep drops every member of the marker role
 * without a lease in its own database, so a second deployment in another database sharing the
 * marker role (the default name makes that easy) would drop the first one's live roles. The
 * claim lets start-up refuse that, and lets the sweep stop if the claim is taken away.
 */
const PREFIX = 'pg-credential-broker: marker role of the deployment in database ';

export function markerComment(database: string): string {
  return PREFIX + JSON.stringify(database);
}

/** The database named by a marker comment, or null when the comment is not one (or absent). */
export function claimedDatabase(comment: string | null): string | null {
  if (!comment?.startsWith(PREFIX)) return null;
  try {
    const name: unknown = JSON.parse(comment.slice(PREFIX.length));
    return typeof name === 'string' ? name : null;
  } catch {
    return null;
  }
}

export interface MarkerClaim {
  /** The database this connection is in. */
  database: string;
  /** The database the marker role's comment names, or null when it names none. */
  claimedBy: string | null;
}

export async function readMarkerClaim(db: Queryable, role: string): Promise<MarkerClaim> {
  const { rows: [row] } = await db.query<{ database: string; comment: string | null }>(
    `SELECT current_database() AS database,
            (SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1) AS comment`,
    [role],
  );
  return { database: row.database, claimedBy: claimedDatabase(row.comment) };
}

/** Refuses a marker role another database's deployment has claimed. */
export async function refuseForeignMarker(db: Queryable, role: string): Promise<void> {
  const { database, claimedBy } = await readMarkerClaim(db, role);
  if (claimedBy !== null && claimedBy !== database) throw new Error(otherDeployment(role, claimedBy));
}

/**
 * Claims the (existing) marker role for this database's deployment, or refuses when another
 * database's deployment has. A comment that is not a claim (none, or an operator's own) is
 * replaced. `db` must be one connection, not a pool: the claim is a transaction of its own.
 *
 * Deployments in two databases share no advisory lock (those are per database), so two first
 * start-ups could both read "unclaimed" and both write. The no-op ALTER ROLE rewrites the role's
 * catalogue row and holds that row until COMMIT, so the second waits there, and then fails
 * ("tuple concurrently updated"); tried again, it reads the first one's claim.
 */
export async function claimMarker(db: Queryable, role: string, attempts = 3): Promise<void> {
  const seen = await readMarkerClaim(db, role);
  if (seen.claimedBy === seen.database) return;
  if (seen.claimedBy !== null) throw new Error(otherDeployment(role, seen.claimedBy));
  await db.query('BEGIN');
  try {
    await db.query(`ALTER ROLE ${escapeIdent(role)} NOLOGIN`);
    const { database, claimedBy } = await readMarkerClaim(db, role);
    if (claimedBy !== null && claimedBy !== database) throw new Error(otherDeployment(role, claimedBy));
    if (claimedBy === null) await db.query(`COMMENT ON ROLE ${escapeIdent(role)} IS ${escapeLit(markerComment(database))}`);
    await db.query('COMMIT');
  } catch (err) {
    await db.query('ROLLBACK').catch(() => undefined);
    const { code, message } = err as { code?: string; message: string };
    // The waiting ALTER ROLE fails once the other claim commits, rather than waiting and going on.
    if (message === 'tuple concurrently updated' && attempts > 1) return claimMarker(db, role, attempts - 1);
    if (code !== '42501') throw err;
    throw new Error(`cannot record this deployment on its marker role ${role} (BROKER_MANAGED_ROLE): ${message}; ` +
      `the broker's role needs CREATEROLE, and on PostgreSQL 16+ also ${role} granted to it WITH ADMIN OPTION`);
  }
}

export function otherDeployment(role: string, database: string): string {
  return `BROKER_MANAGED_ROLE ${role} belongs to the deployment in database ${JSON.stringify(database)}: give each deployment ` +
    `its own BROKER_MANAGED_ROLE (two deployments sharing one would drop each other's live roles as orphans); if that ` +
    `deployment is gone or its database was renamed, run COMMENT ON ROLE ${escapeIdent(role)} IS NULL and start again`;
}
