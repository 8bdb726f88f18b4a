// The crash suite's checks of broker.leases against the roles PostgreSQL holds, and its PRNG.
import { connectAs } from './broker.js';
import type { TestPostgres } from './postgres.js';

/** A seeded PRNG (mulberry32), so a failing run can be replayed with CRASH_SEED. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface Snapshot {
  inTeardown: Set<string>;
  ended: number;
}

export async function snapshot(pgs: TestPostgres): Promise<Snapshot> {
  const rows = await pgs.query<{ id: string }>(`SELECT id FROM broker.leases WHERE state IN ('revoking', 'revoke_failed')`);
  const [ended] = await pgs.query<{ n: number }>(`SELECT count(*)::int AS n FROM broker.leases WHERE state IN ('expired', 'revoked')`);
  return { inTeardown: new Set(rows.map((r) => r.id)), ended: ended.n };
}

/** Members of the marker role (that the broker issued) without any lease row. */
export async function rolesWithoutLease(pgs: TestPostgres, marker: string): Promise<string[]> {
  const rows = await pgs.query<{ rolname: string }>(
    `SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid JOIN pg_roles g ON g.oid = m.roleid
      WHERE g.rolname = $1 AND NOT m.admin_option AND NOT r.rolsuper AND NOT r.rolcreaterole AND r.rolname <> 'broker'
        AND NOT EXISTS (SELECT 1 FROM broker.leases l WHERE l.username = r.rolname)`,
    [marker],
  );
  return rows.map((r) => r.rolname);
}

/** Active leases not yet past expiry whose role is missing, cannot log in, or has another VALID UNTIL. */
export async function activeLeasesWithoutLogin(pgs: TestPostgres): Promise<string[]> {
  const rows = await pgs.query<{ id: string; problem: string }>(
    `SELECT l.id, CASE WHEN r.oid IS NULL THEN 'no role' WHEN NOT r.rolcanlogin THEN 'NOLOGIN'
                       ELSE 'VALID UNTIL ' || r.rolvaliduntil || ' <> ' || l.expires_at END AS problem
       FROM broker.leases l LEFT JOIN pg_roles r ON r.rolname = l.username
      WHERE l.state = 'active' AND l.expires_at > now()
        AND (r.oid IS NULL OR NOT r.rolcanlogin OR r.rolvaliduntil IS DISTINCT FROM l.expires_at)`,
  );
  return rows.map((r) => `${r.id}: ${r.problem}`);
}

/** Logs in with the credential; true when it worked. */
export async function canLogIn(pgs: TestPostgres, cred: { username: string; password: string }): Promise<boolean> {
  try {
    const client = await connectAs(pgs, cred);
    await client.end();
    return true;
  } catch {
    return false;
  }
}
