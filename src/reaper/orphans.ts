import { auditJson, insertAuditFromJson } from '../audit/repository.js';
import { teardownRoles } from '../leases/teardown.js';
import { issuedRoleCondition } from '../postgres/roles.js';
import type { FinishDeps } from '../leases/revoke.js';

/** A role whose lease ended longer ago than this is an orphan even though a lease row exists. */
export const ORPHAN_GRACE_SECONDS = 300;

/**
 * Drops members of this deployment's marker role that have no live lease: created by hand, or
 * left behind by something outside the broker. Lease and role are created in one transaction,
 * so a committed role without a lease row is never one being issued right now. Objects such a
 * role owns go to the first group it belongs to, or to the broker's own role.
 */
export async function reapOrphans(deps: FinishDeps & { brokerRole: string }): Promise<number> {
  const { rows } = await deps.pool.query<{ rolname: string; reassign_to: string | null }>(
    `SELECT r.rolname,
            (SELECT g2.rolname FROM pg_auth_members m2 JOIN pg_roles g2 ON g2.oid = m2.roleid
              WHERE m2.member = r.oid AND g2.rolname <> $1 ORDER BY g2.rolname LIMIT 1) AS reassign_to
       FROM pg_roles r
      WHERE ${issuedRoleCondition('r', '$1')}
        AND NOT EXISTS (
        SELECT 1 FROM broker.leases l
         WHERE l.username = r.rolname
           AND (l.state IN ('pending', 'active', 'revoking', 'revoke_failed') OR l.ended_at > now() - make_interval(secs => $2)))
      LIMIT 200`,
    [deps.managedRole, ORPHAN_GRACE_SECONDS],
  );
  if (rows.length === 0) return 0;
  const outcome = await teardownRoles(deps, rows.map((r) => ({ username: r.rolname, reassign_to: r.reassign_to ?? deps.brokerRole })));
  const dropped = rows.filter((r) => outcome.get(r.rolname) === null);
  for (const r of rows) {
    if (outcome.get(r.rolname) !== null) deps.log.warn({ username: r.rolname, error: outcome.get(r.rolname) }, 'could not drop orphaned managed role');
  }
  if (dropped.length > 0) {
    await deps.pool.query(insertAuditFromJson(1), [
      auditJson(dropped.map((r) => ({ type: 'role.orphan_dropped', username: r.rolname, issuer: null, subject: null, reason: 'managed role without a live lease', detail: { reassigned_to: r.reassign_to ?? deps.brokerRole } }))),
    ]);
    deps.metrics?.orphans.inc(dropped.length);
    deps.log.info({ count: dropped.length }, 'dropped orphaned managed roles');
  }
  return dropped.length;
}
