import type { Queryable } from '../postgres/pool.js';
import { escapeLit } from '../postgres/sql.js';
import { decodeCursor, encodeCursor, isoRow } from '../postgres/rows.js';
import { policyShapeProblem } from './shape.js';
import type { PolicyBody, PolicyInputBody } from '../schemas/policy.js';
import { POLICY_DEFAULTS } from '../schemas/policy.js';

const COLUMNS = `name, description, issuer, audience, claims, grant_role, database, default_ttl, max_ttl,
  max_active_leases, connection_limit, assume_role, enabled, created_at, updated_at`;

export type Policy = PolicyBody;

export async function getPolicy(db: Queryable, name: string): Promise<Policy | null> {
  const { rows } = await db.query(`SELECT ${COLUMNS} FROM broker.policies WHERE name = $1`, [name]);
  return rows[0] ? isoRow<Policy>(rows[0]) : null;
}

/** Every policy of this issuer, disabled ones included, for explaining a token. */
export async function policiesForIssuer(db: Queryable, issuer: string): Promise<Policy[]> {
  const { rows } = await db.query(`SELECT ${COLUMNS} FROM broker.policies WHERE issuer = $1 ORDER BY name`, [issuer]);
  return rows.map((r) => isoRow<Policy>(r));
}

/**
 * The issuer's enabled policies with the policies' change token (broker.policy_version, a random
 * UUID replaced on every change), as parameter-free SQL to share a simple query with BEGIN: one row
 * per policy, or a single row of nulls but the token.
 */
export function enabledPoliciesSql(issuer: string): string {
  return `SELECT v.token::text AS policy_version, ${COLUMNS}
            FROM broker.policy_version v LEFT JOIN broker.policies ON issuer = ${escapeLit(issuer)} AND enabled ORDER BY name`;
}

/** The rows of enabledPoliciesSql: the token they were read under, and the policies. */
export function policySnapshot(rows: Record<string, unknown>[]): { version: string; policies: Policy[] } {
  // The migration puts the one row there, and nothing in the broker deletes it.
  if (rows.length === 0) throw new Error('broker.policy_version holds no row: INSERT INTO broker.policy_version (token) VALUES (gen_random_uuid())');
  return {
    version: String(rows[0].policy_version),
    policies: rows.filter((r) => r.name !== null).map(({ policy_version: _, ...r }) => isoRow<Policy>(r)),
  };
}

export async function listPolicies(db: Queryable, limit: number, cursor?: string): Promise<{ items: Policy[]; next_cursor: string | null }> {
  const after = cursor ? decodeCursor(cursor, 1) : null;
  if (cursor && !after) throw new Error('INVALID_CURSOR');
  const { rows } = await db.query(
    `SELECT ${COLUMNS} FROM broker.policies WHERE ($1::text IS NULL OR name > $1) ORDER BY name LIMIT $2`,
    [after?.[0] ?? null, limit + 1],
  );
  const items = rows.slice(0, limit).map((r) => isoRow<Policy>(r));
  return { items, next_cursor: rows.length > limit ? encodeCursor([items[items.length - 1].name]) : null };
}

/** Inserts or replaces a policy; `created` tells which. Omitted optional fields take defaults. */
export async function putPolicy(db: Queryable, name: string, input: PolicyInputBody): Promise<{ policy: Policy; created: boolean }> {
  const p = { ...POLICY_DEFAULTS, ...input };
  const { rows } = await db.query(
    `INSERT INTO broker.policies AS p (name, description, issuer, audience, claims, grant_role, database, default_ttl, max_ttl,
        max_active_leases, connection_limit, assume_role, enabled)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
     ON CONFLICT (name) DO UPDATE SET description = EXCLUDED.description, issuer = EXCLUDED.issuer,
        audience = EXCLUDED.audience, claims = EXCLUDED.claims, grant_role = EXCLUDED.grant_role,
        database = EXCLUDED.database, default_ttl = EXCLUDED.default_ttl, max_ttl = EXCLUDED.max_ttl,
        max_active_leases = EXCLUDED.max_active_leases, connection_limit = EXCLUDED.connection_limit,
        assume_role = EXCLUDED.assume_role, enabled = EXCLUDED.enabled, updated_at = now()
     RETURNING ${COLUMNS}, (xmax = 0) AS created`,
    [
      name, p.description, p.issuer, p.audience ?? null, JSON.stringify(p.claims), p.grant_role, p.database,
      p.default_ttl, p.max_ttl, p.max_active_leases, p.connection_limit, p.assume_role, p.enabled,
    ],
  );
  const { created, ...policy } = rows[0];
  return { policy: isoRow<Policy>(policy), created: created as boolean };
}

/** Deletes a policy; what it was (for the audit event), or null when there was none. */
export async function deletePolicy(db: Queryable, name: string): Promise<Policy | null> {
  const { rows } = await db.query(`DELETE FROM broker.policies WHERE name = $1 RETURNING ${COLUMNS}`, [name]);
  return rows[0] ? isoRow<Policy>(rows[0]) : null;
}

/**
 * Stored policies whose claims today's rules would refuse (a rule stored before a check was
 * added), with the reason. They still issue: start-up only warns, so that no deployment stops
 * issuing on an upgrade.
 */
export async function policiesRefusedNow(db: Queryable): Promise<Array<{ policy: string; problem: string }>> {
  const { rows } = await db.query(`SELECT ${COLUMNS} FROM broker.policies ORDER BY name`);
  return rows.map((r) => isoRow<Policy>(r)).flatMap((r) => {
    const problem = policyShapeProblem(r);
    return problem ? [{ policy: r.name, problem }] : [];
  });
}
