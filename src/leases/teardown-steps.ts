import type pg from 'pg';
import type { FastifyBaseLogger } from 'fastify';
import { isConnectionError, type DbTimeouts } from '../postgres/pool.js';

// What every step of a teardown shares: the roles, each role's outcome, and how one step runs over
// a batch of them.

/** A statement with its bind parameters. */
export interface Statement {
  text: string;
  values: unknown[];
}

/**
 * Runs statements as whoever ends a batch's roles (teardown.ts, runAs). `before` (no `params`
 * then) runs ahead of `sql`, as the broker, in one transaction with it: both commit or neither does.
 */
export type Run = (sql: string, params?: unknown[], before?: Statement[]) => Promise<pg.QueryResult>;

export interface RoleToDrop {
  username: string;
  /** Where objects the role owns are reassigned, so a migration's tables outlive the lease. */
  reassign_to: string;
}

export interface TeardownDeps {
  pool: pg.Pool;
  databaseUrl: string;
  managedRole: string;
  log: FastifyBaseLogger;
  /** For the connections teardown opens in other databases. */
  timeouts: DbTimeouts;
  /**
   * Awaited after each statement run as a role's ender, with how long it took: the reaper yields
   * the server to issuance between them (reaper.ts); revocations, which someone waits for, do not.
   */
  pace?: (busyMs: number) => Promise<void>;
  /**
   * SQL recording the drop of these roles, committed with their DROP ROLE (see Run's `before`):
   * a record written afterwards would be lost for good if the broker died in between, since
   * nothing is left to find the role by.
   */
  recordDrop?: (roles: RoleToDrop[]) => Statement[];
}

/** username -> null when the role is gone (dropped now or already), or the error that stopped it. */
export class TeardownResult extends Map<string, string | null> {
  /**
   * username -> the connection error (PostgreSQL down or silent) its failure came from: a caller
   * answering a request gives that the outage's 503, not a 500, once the attempt is recorded.
   */
  readonly outage = new Map<string, unknown>();
}

export function describeError(err: unknown): string {
  // PostgreSQL names the blocking objects and their databases only in DETAIL, and what to change
  // only in HINT (53200: a role owning more objects than one transaction can lock).
  const { code, message, detail, hint } = err as { code?: string; message?: string; detail?: string; hint?: string };
  const oneLine = (text: string) => text.replace(/\s*\n\s*/g, '; ');
  return `${code ? code + ': ' : ''}${message ?? String(err)}${detail ? ` (${oneLine(detail)})` : ''}${hint ? ` (hint: ${oneLine(hint)})` : ''}`.slice(0, 1000);
}

/**
 * Runs `step` for all roles at once and, if that fails, once per role, so one stubborn role
 * never holds back the rest of its batch. Returns the roles the step succeeded for; failures
 * are written to `result` prefixed with `where`.
 *
 * A connection failure is not one role's trouble: the batch fails without a retry per role,
 * each of which would wait out the same timeout. With `progress`, a step on the broker's own
 * connections that finds the server itself down or silent also ends the rest of the teardown
 * (see TeardownRun); steps in other databases pass none, since a database at its connection
 * limit or a long DROP OWNED there says nothing about the cluster.
 */
export async function stepEach(
  roles: RoleToDrop[], result: TeardownResult, where: string, step: (batch: RoleToDrop[]) => Promise<void>,
  progress?: TeardownRun,
): Promise<RoleToDrop[]> {
  if (roles.length === 0) return roles;
  if (progress?.unreachable) {
    // Named after this step, not the one that failed: it tells how far these roles got.
    for (const role of roles) {
      result.set(role.username, `${where}: not tried after ${progress.unreachable}`);
      result.outage.set(role.username, progress.cause);
    }
    return [];
  }
  try {
    await step(roles);
    return roles;
  } catch (batchErr) {
    const connection = isConnectionError(batchErr);
    const gone = connection && serverGone(batchErr);
    if (progress && gone) Object.assign(progress, { unreachable: `${where}: ${describeError(batchErr)}`, cause: batchErr });
    if (roles.length === 1 || connection) {
      for (const role of roles) {
        result.set(role.username, `${where}: ${describeError(batchErr)}`);
        // Only the cluster-wide steps (those given `progress`) speak for the server: a per-database
        // step's client-side timeout means a slow DROP OWNED there, not an outage.
        if (gone && progress) result.outage.set(role.username, batchErr);
      }
      return [];
    }
  }
  const ok: RoleToDrop[] = [];
  for (const role of roles) {
    try {
      await step([role]);
      ok.push(role);
    } catch (err) {
      result.set(role.username, `${where}: ${describeError(err)}`);
    }
  }
  return ok;
}

/** What one teardown learned that concerns all its steps. */
export interface TeardownRun {
  /**
   * Set once a step on the broker's own connections found PostgreSQL down or silent: the later
   * steps, which would each wait out the same timeout, fail at once with this.
   */
  unreachable: string | null;
  /** The error behind `unreachable`. */
  cause?: unknown;
}

/**
 * A connection error that means the server is down or not answering, not that it is busy: too
 * many connections (53300) and a wait for a free pooled connection both pass by themselves.
 */
export function serverGone(err: unknown): boolean {
  const { code, message } = err as { code?: string; message?: string };
  return code !== '53300' && !/timeout exceeded when trying to connect/.test(message ?? '');
}
