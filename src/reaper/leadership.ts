import pg from 'pg';
import type { FastifyBaseLogger } from 'fastify';
import { connectionConfig, sessionSettings, type DbTimeouts } from '../postgres/pool.js';

// Fixed key shared by every replica of a deployment's database.
export const REAPER_LOCK_KEY = 4_711_020_002;

/**
 * Reaper leadership as a session-level advisory lock held on a dedicated connection. The lock
 * lives exactly as long as that connection: if it breaks (network, server restart, the process
 * dies), PostgreSQL releases the lock and another replica's next attempt takes over.
 */
export class Leadership {
  private client: pg.Client | null = null;
  private leader = false;

  constructor(
    private readonly databaseUrl: string,
    private readonly log: FastifyBaseLogger,
    // Only the query timeout: a silent server must not hang the reaper on this connection.
    private readonly timeouts: DbTimeouts = { lockTimeoutSeconds: 0, queryTimeoutSeconds: 0 },
  ) {}

  get isLeader(): boolean {
    return this.leader;
  }

  /**
   * True when this replica holds the lock. A leader proves it still does with a round trip on
   * the lock's connection: a connection killed since the last run may not have reported its
   * death yet, and its lock is already someone else's.
   */
  async acquire(): Promise<boolean> {
    if (this.leader && this.client) {
      const client = this.client;
      try {
        await client.query('SELECT 1');
        return true;
      } catch (err) {
        this.lost(client, (err as Error).message);
      }
    }
    try {
      if (!this.client) {
        const client = new pg.Client(connectionConfig(this.databaseUrl, {
          application_name: 'pg-credential-broker leader', keepAlive: true,
          ...sessionSettings({ lockTimeoutSeconds: 0, queryTimeoutSeconds: this.timeouts.queryTimeoutSeconds }, false),
        }));
        client.on('error', (err) => this.lost(client, err.message));
        client.on('end', () => this.lost(client, 'connection ended'));
        await client.connect();
        this.client = client;
      }
      const { rows } = await this.client.query<{ ok: boolean }>('SELECT pg_try_advisory_lock($1) AS ok', [REAPER_LOCK_KEY]);
      if (rows[0].ok && !this.leader) this.log.info('became reaper leader');
      this.leader = rows[0].ok;
    } catch (err) {
      if (this.client) this.lost(this.client, (err as Error).message);
    }
    return this.leader;
  }

  private lost(client: pg.Client, reason: string): void {
    if (this.client !== client) return;
    if (this.leader) this.log.warn({ reason }, 'lost reaper leadership');
    this.leader = false;
    this.client = null;
    client.end().catch(() => undefined);
  }

  async release(): Promise<void> {
    const client = this.client;
    this.client = null;
    this.leader = false;
    if (!client) return;
    await client.query('SELECT pg_advisory_unlock_all()').catch(() => undefined);
    await client.end().catch(() => undefined);
  }
}
