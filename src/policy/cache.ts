import type { Policy } from './repository.js';

export interface PolicySnapshot {
  /** broker.policy_version's counter when these were read (text: a bigint). */
  version: string;
  policies: Policy[];
}

/**
 * Each issuer's enabled policies as last read, under the counter every change to the table moves
 * (migrations/006_policy_version.sql). Issuance decides with them and has its lease INSERT insert
 * only while the counter still reads the same, in the statement that takes the lease; so a
 * credential is never issued under policies older than that statement's snapshot, as when they
 * were read afresh for every credential. Per app: tests run several apps, on several databases,
 * in one process.
 */
export class PolicyCache {
  private version: bigint | null = null;
  private readonly byIssuer = new Map<string, PolicySnapshot>();

  get(issuer: string): PolicySnapshot | undefined {
    return this.byIssuer.get(issuer);
  }

  /** Keeps what was read unless something newer is already kept; returns it either way. */
  store(issuer: string, snapshot: PolicySnapshot): PolicySnapshot {
    const version = BigInt(snapshot.version);
    if (this.version !== null && version < this.version) return snapshot;
    if (version !== this.version) this.byIssuer.clear();
    this.version = version;
    this.byIssuer.set(issuer, snapshot);
    return snapshot;
  }
}
