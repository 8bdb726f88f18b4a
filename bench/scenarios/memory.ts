import type { BrokerChild } from '../lib/broker.js';
import type { Results } from '../lib/results.js';

/**
 * P6: the broker's RSS at 64 concurrent issuers, sampled during the 64-client issuance runs
 * (default, then tuned iterations), with `process.memoryUsage()` read right after each.
 */
export class MemoryAt64 {
  private readonly rss: number[] = [];
  private readonly usage: NodeJS.MemoryUsage[] = [];

  async record(broker: BrokerChild, maxRss: number): Promise<void> {
    this.rss.push(maxRss);
    this.usage.push(await broker.request<NodeJS.MemoryUsage>('memory'));
  }

  /** Into the results, when any 64-client run was sampled. */
  writeTo(results: Results): void {
    if (this.rss.length) results.memory = { maxRssMbAt64: Math.max(...this.rss), perRun: this.rss, usage: this.usage };
  }
}
