import type { Queryable } from './pool.js';
import { databaseExists, grantRoleProblem } from './roles.js';

// Enough for every group and database any sane policy table names; past it the oldest answers go first.
const MAX_REMEMBERED = 1000;

/**
 * Re-checks at issuance that a policy can still be served: that its grant_role is still safe to
 * hand out, and that its database still takes connections. PUT /policies checks both when the
 * policy is stored, but either can change afterwards: an operator runs
 * `GRANT pg_read_server_files TO app_readers` (from then on every credential would carry it), or
 * drops the database (every credential would be a login that can connect nowhere). Answers are
 * remembered for `intervalMs`, so issuance reads the catalogue once per interval and name, not
 * once per credential; 0 checks every time.
 */
export class GrantRoleGuard {
  // Keys are `role:<name>` and `database:<name>`: one name may be both.
  private readonly answers = new Map<string, { problem: string | null; at: number }>();

  constructor(
    private readonly managedRole: string,
    private readonly intervalMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** Why `grantRole` may not be handed out, or null when it is safe (as of at most one interval ago). */
  async problem(db: Queryable, grantRole: string): Promise<string | null> {
    return this.answer(`role:${grantRole}`, () => grantRoleProblem(db, grantRole, this.managedRole));
  }

  /** Why no credential for `database` would be usable, or null when it takes connections. */
  async databaseProblem(db: Queryable, database: string): Promise<string | null> {
    return this.answer(`database:${database}`, async () => (await databaseExists(db, database))
      ? null
      : `database ${database} does not exist or does not accept connections`);
  }

  /**
   * Drops the remembered answer, so the next check reads the catalogue: for when something else
   * showed it stale (CREATE ROLE … IN ROLE found the group gone).
   */
  forget(grantRole: string): void {
    this.answers.delete(`role:${grantRole}`);
  }

  /** The same for a database: the next check reads the catalogue (PUT /policies about to store one). */
  forgetDatabase(database: string): void {
    this.answers.delete(`database:${database}`);
  }

  /** Records an answer found elsewhere (PUT /policies has just checked the role). */
  remember(grantRole: string, problem: string | null, at = this.now()): void {
    this.store(`role:${grantRole}`, problem, at);
  }

  private async answer(key: string, check: () => Promise<string | null>): Promise<string | null> {
    const at = this.now();
    const known = this.answers.get(key);
    if (known && at - known.at < this.intervalMs) return known.problem;
    const problem = await check();
    this.store(key, problem, at);
    return problem;
  }

  private store(key: string, problem: string | null, at: number): void {
    this.answers.delete(key);
    if (this.answers.size >= MAX_REMEMBERED) this.answers.delete(this.answers.keys().next().value!);
    this.answers.set(key, { problem, at });
  }
}
