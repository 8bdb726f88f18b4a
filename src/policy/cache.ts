import type { Policy } from './repository.js';

export interface PolicySnapshot {
  /** broker.policy_version's token when these were read: every change to the table replaces it. */
  version: string;
  policies: Policy[];
  /** When they were read (Date.now()). */
  readAt: number;
}

/**
 * Kept policies are read again after this long whatever the token says: a change that fires no
 * trigger (ALTER TABLE … DISABLE TRIGGER, a child table of broker.policies) then counts within it.
 */
export const POLICY_MAX_AGE_MS = 60_000;

/**
 * Each issuer's enabled policies as last read, under the token every change to the table replaces
 * (migrations/006_policy_version.sql). Issuance decides with them and has its lease INSERT insert
 * only while the token still reads the same, in the statement that takes the lease; so a
 * credential is never issued under policies older than that statement's snapshot, as when they
 * were read afresh for every credential. Per app: tests run several apps, on several databases,
 * in one process.
 */
export class PolicyCache {
  private version: string | null = null;
  private readonly byIssuer = new Map<string, PolicySnapshot>();

  constructor(private readonly now: () => number = Date.now) {}

  get(issuer: string): PolicySnapshot | undefined {
    const kept = this.byIssuer.get(issuer);
    return kept && this.now() - kept.readAt < POLICY_MAX_AGE_MS ? kept : undefined;
  }

  /**
   * Keeps what was just read. Tokens have no order: a read that lost a race to a newer one may
   * replace it, and the next request's INSERT then finds the token moved and reads again.
   */
  store(issuer: string, version: string, policies: Policy[]): PolicySnapshot {
    if (version !== this.version) this.byIssuer.clear();
    this.version = version;
    const snapshot = { version, policies, readAt: this.now() };
    this.byIssuer.set(issuer, snapshot);
    return snapshot;
  }
}
