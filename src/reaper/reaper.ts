import { EventEmitter } from 'node:events';
import cron, { type ScheduledTask } from 'node-cron';
import type pg from 'pg';
import type { FastifyBaseLogger } from 'fastify';
import type { Config } from '../config.js';
import { claimDueLeases, endedByExpiry } from '../leases/claims.js';
import { finishLeases } from '../leases/finish.js';
import { creatorNames } from '../postgres/creators.js';
import type { Metrics } from '../metrics.js';
import { ClockOffsetWatch } from '../postgres/clock-offset.js';
import { Leadership } from './leadership.js';
import { reapOrphans } from './orphans.js';

export interface ReaperDeps {
  pool: pg.Pool;
  config: Config;
  log: FastifyBaseLogger;
  metrics?: Metrics;
  /** Leases per claim; defaults to REAP_BATCH. */
  batchSize?: number;
}

export interface ReapStats {
  leader: boolean;
  ended: number;
  failed: number;
  orphans: number;
}

// Roles per DROP ROLE batch: thousands in one transaction exhaust max_locks_per_transaction.
export const REAP_BATCH = 200;
// Bounded work per run, so one run never outlives a shutdown grace period by much.
const MAX_BATCHES_PER_RUN = 50;
// After each role statement that succeeded, and after the claim, while ending expired leases, the
// reaper waits twice as long as the statement took (at most MAX_PAUSE_MS), so a backlog's teardown
// leaves PostgreSQL's cores to issuance about two thirds of the time. Running flat out, a
// 10,000-role backlog drained at 742 roles/s under issuance load and pushed issuance p99 to 1.57×
// its idle value in the drain's first third; pausing as long as each statement took, 306-395 roles/s and 1.33-1.58× over three
// bench runs (one over 1.5×); twice as long, 351 roles/s and 1.33× in the run after.
// Expired leases only: their passwords already stopped at VALID UNTIL, while a revocation the
// reaper retries, or an orphan, may still have a working login.
const PAUSE_PER_BUSY = 2;
const MAX_PAUSE_MS = 1000;

/**
 * Ends what has ended: expired and revoked leases lose their roles, and managed roles without
 * a live lease are dropped. One replica at a time, through an advisory lock on a dedicated
 * connection (see Leadership). Emits 'batch' ({ended, failed}) after each batch it finishes.
 */
export class Reaper extends EventEmitter {
  private task: ScheduledTask | null = null;
  private running: Promise<ReapStats> | null = null;
  private stopping = false;
  /** Ends each pause in progress; stop() calls them. */
  private readonly pauses = new Set<() => void>();
  readonly leadership: Leadership;
  private readonly clock: ClockOffsetWatch;

  constructor(private readonly deps: ReaperDeps) {
    super();
    this.leadership = new Leadership(deps.config.databaseUrl, deps.log, deps.config);
    this.clock = new ClockOffsetWatch(deps.log, deps.metrics?.clockOffset);
  }

  start(): void {
    if (this.task) return;
    this.stopping = false;
    const intervalMs = this.deps.config.reaperIntervalSeconds * 1000;
    // A cron step like */7 restarts at every minute (…49, 56, 0), so the job ticks every second
    // and runs once a full interval has passed since the last run began: even spacing for any N.
    let lastRun = 0;
    this.task = cron.schedule('* * * * * *', () => {
      if (Date.now() - lastRun < intervalMs - 500) return;
      lastRun = Date.now();
      return this.tick();
    }, {
      noOverlap: true,
      name: 'pg-credential-broker-reaper',
      suppressMissedWarning: true,
      // node-cron prints coloured console lines by default; keep everything in the JSON log.
      logger: {
        info: (message) => this.deps.log.debug({ cron: message }, 'cron'),
        warn: (message) => this.deps.log.warn({ cron: message }, 'cron'),
        error: (message) => this.deps.log.error({ cron: String(message) }, 'cron'),
        debug: (message) => this.deps.log.debug({ cron: String(message) }, 'cron'),
      },
    });
  }

  private async tick(): Promise<void> {
    try {
      await this.reap();
    } catch (err) {
      this.deps.log.warn({ err: { message: (err as Error).message, code: (err as { code?: string }).code } }, 'reaper run failed');
    }
  }

  /** One run, callable directly (tests call this instead of waiting for cron). */
  reap(options: { requireLeadership?: boolean } = {}): Promise<ReapStats> {
    if (this.running) return this.running;
    // stop() ends the schedule, not the object: an explicit later run does its full work.
    if (!this.task) this.stopping = false;
    // Every replica publishes the gauges after every run, led or not, failed or not: a lag only the
    // leader reported would stand still, not grow, when no replica leads or its runs keep failing.
    this.running = this.run(options.requireLeadership ?? true)
      .finally(() => this.updateGauges().catch((err: Error) => this.deps.log.debug({ err: { message: err.message } }, 'could not update the lease gauges')))
      .finally(() => {
        this.running = null;
      });
    return this.running;
  }

  private async run(requireLeadership: boolean): Promise<ReapStats> {
    const stats: ReapStats = { leader: false, ended: 0, failed: 0, orphans: 0 };
    if (requireLeadership && !(await this.leadership.acquire())) return stats;
    stats.leader = true;
    const { pool, config, log, metrics } = this.deps;
    const finishDeps = { pool, databaseUrl: config.databaseUrl, managedRole: config.managedRole, timeouts: config, log, metrics, retryBaseSeconds: config.reaperIntervalSeconds };
    const creators = creatorNames(config.managedRole);
    const stillLeader = () => !requireLeadership || this.leadership.isLeader;
    for (let batch = 0; batch < MAX_BATCHES_PER_RUN && !this.stopping && stillLeader(); batch++) {
      const claimStarted = performance.now();
      const leases = await claimDueLeases(pool, this.deps.batchSize ?? REAP_BATCH, creators);
      if (leases.length === 0) break;
      const pace = leases.every(endedByExpiry) ? (busyMs: number) => this.pause(busyMs * PAUSE_PER_BUSY) : undefined;
      // The claim counts as work too: it reads the catalogue for each of up to 2,000 candidates.
      await pace?.(performance.now() - claimStarted);
      const outcome = await finishLeases({ ...finishDeps, pace }, leases);
      const counts = { ended: 0, failed: 0 };
      for (const error of outcome.values()) error === null ? counts.ended++ : counts.failed++;
      stats.ended += counts.ended;
      stats.failed += counts.failed;
      this.emit('batch', counts);
    }
    if (!this.stopping && stillLeader()) stats.orphans = await reapOrphans(finishDeps);
    return stats;
  }

  /** Resolves after `ms` (at most MAX_PAUSE_MS), or at once when stop() is or was called. */
  private pause(ms: number): Promise<void> {
    if (this.stopping) return Promise.resolve();
    return new Promise((resolve) => {
      const end = () => {
        clearTimeout(timer);
        this.pauses.delete(end);
        resolve();
      };
      const timer = setTimeout(end, Math.min(ms, MAX_PAUSE_MS));
      this.pauses.add(end);
    });
  }

  private async updateGauges(): Promise<void> {
    const { metrics, pool } = this.deps;
    if (!metrics) return;
    // Timed on a connection already in hand, and the server's clock read first: a wait for the
    // pool, or the counts, inside the measured span would skew the midpoint the offset assumes.
    const client = await pool.connect();
    let rows: Array<{ active: number; lag: number | null }>;
    let serverMs: number;
    let sentMs: number;
    let answeredMs: number;
    try {
      sentMs = Date.now();
      ({ rows: [{ server_ms: serverMs }] } = await client.query<{ server_ms: number }>(
        'SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS server_ms'));
      answeredMs = Date.now();
      ({ rows } = await client.query<{ active: number; lag: number | null }>(
        `SELECT (SELECT count(*) FROM broker.leases WHERE state = 'active')::int AS active,
                extract(epoch FROM now() - LEAST(
                  (SELECT min(ended_at) FROM broker.leases WHERE state IN ('revoking', 'revoke_failed')),
                  (SELECT min(expires_at) FROM broker.leases WHERE state = 'active' AND expires_at <= now())))::float8 AS lag`));
    } finally {
      client.release();
    }
    this.clock.observe(serverMs, sentMs, answeredMs);
    metrics.activeLeases.set(rows[0].active);
    metrics.reaperLag.set(Math.max(0, rows[0].lag ?? 0));
  }

  /** Stops scheduling, lets a run in progress finish its current batch, releases leadership. */
  async stop(): Promise<void> {
    this.stopping = true;
    for (const end of [...this.pauses]) end();
    this.task?.stop();
    this.task = null;
    await this.running?.catch(() => undefined);
    await this.leadership.release();
  }
}
