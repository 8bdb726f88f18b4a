import type { Queryable } from './pool.js';
import { grantRoleProblem } from './roles.js';

// Enough for every group any sane policy table names; past it the oldest answers go first.
const MAX_REMEMBERED = 1000;

/**
 * Re-checks at issuance that a policy's grant_role is still safe to hand out. PUT /policies
 * checks it when the policy is stored, but the group can change afterwards (an operator runs
 * `GRANT pg_read_server_files TO app_readers`), and from then on every credential would carry
 * it. The answer is remembered for `intervalMs`, so issuance walks the catalogue once per
 * interval and group, not once per credential; 0 checks every time.
 */
export class GrantRoleGuard {
  private readonly answers = new Map<string, { problem: string | null; at: number }>();

  constructor(
    private readonly managedRole: string,
    private readonly intervalMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** Why `grantRole` may not be handed out, or null when it is safe (as of at most one interval ago). */
  async problem(db: Queryable, grantRole: string): Promise<string | null> {
    const at = this.now();
    const known = this.answers.get(grantRole);
    if (known && at - known.at < this.intervalMs) return known.problem;
    const problem = await grantRoleProblem(db, grantRole, this.managedRole);
    this.remember(grantRole, problem, at);
    return problem;
  }

  /**
   * Drops the remembered answer, so the next check reads the catalogue: for when something else
   * showed it stale (CREATE ROLE … IN ROLE found the group gone).
   */
  forget(grantRole: string): void {
    this.answers.delete(grantRole);
  }

  /** Records an answer found elsewhere (PUT /policies has just checked the role). */
  remember(grantRole: string, problem: string | null, at = this.now()): void {
    this.answers.delete(grantRole);
    if (this.answers.size >= MAX_REMEMBERED) this.answers.delete(this.answers.keys().next().value!);
    this.answers.set(grantRole, { problem, at });
  }
}
