import type { BrokerChild } from '../lib/broker.js';
import { httpLoad } from '../lib/load.js';
import { log } from '../lib/log.js';
import { dropIssuedRoles } from '../lib/population.js';
import * as proc from '../lib/proc.js';
import type { Results, SustainedMemory } from '../lib/results.js';
import { SETTINGS } from '../lib/settings.js';
import type { BenchContext } from './context.js';

const CONNECTIONS = 64;

/**
 * P6: the broker's RSS at 64 concurrent issuers. Sampled during the 64-client issuance runs
 * (default, then tuned iterations), with `process.memoryUsage()` read right after each, and
 * over a sustained run: a few bursts say little about a heap V8 keeps growing for as long as the
 * load lasts, when its limit lets it.
 */
export class MemoryAt64 {
  private readonly rss: number[] = [];
  private readonly usage: NodeJS.MemoryUsage[] = [];
  private readonly sustained: SustainedMemory[] = [];

  /**
   * `maxRss`: the most sampled during the runs. The kernel's high-water mark (VmHWM) also counts:
   * a spike between two 100 ms samples would otherwise go unseen. It covers the broker's whole
   * life so far, all of it at 64 clients or fewer.
   */
  async record(broker: BrokerChild, maxRss: number): Promise<void> {
    this.rss.push(Math.max(maxRss, proc.memoryMb(broker.pid).hwm || 0));
    this.usage.push(await broker.request<NodeJS.MemoryUsage>('memory'));
  }

  /**
   * `SETTINGS.sustained` credentials at 64 clients, in chunks with the issued roles dropped after
   * each (so PostgreSQL's cost stays flat), RSS sampled throughout. `nodeOptions`: what the
   * broker runs with, for the report.
   */
  async sustain(ctx: BenchContext, broker: BrokerChild, nodeOptions: string): Promise<void> {
    const { total, chunk } = SETTINGS.sustained;
    const sampler = proc.sampleRss(broker.pid);
    let credentials = 0;
    let seconds = 0;
    let errors = 0;
    try {
      while (credentials < total) {
        await dropIssuedRoles(ctx.pgs, 'runs');
        const run = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections: CONNECTIONS, amount: Math.min(chunk, total - credentials), tokens: ctx.tokens, expect: 201 });
        credentials += run.ok + run.errors;
        errors += run.errors;
        seconds += run.seconds;
      }
    } finally {
      await dropIssuedRoles(ctx.pgs, 'runs');
    }
    const sampled = sampler.stop();
    const maxRss = Math.max(sampled.maxRss, sampled.hwm || 0);
    const after = await broker.request<NodeJS.MemoryUsage>('memory');
    this.sustained.push({ nodeOptions, credentials, errors, seconds, maxRssMb: maxRss, after });
    log(`sustained at ${CONNECTIONS} clients (NODE_OPTIONS=${nodeOptions || '(none)'}): ${credentials} credentials in ${seconds.toFixed(1)} s, max RSS ${maxRss.toFixed(0)} MB, ${(after.rss / 2 ** 20).toFixed(0)} MB after (errors ${errors})`);
  }

  /** Into the results, when any 64-client run was sampled. */
  writeTo(results: Results): void {
    if (!this.rss.length && !this.sustained.length) return;
    const all = [...this.rss, ...(this.sustained[0] ? [this.sustained[0].maxRssMb] : [])];
    results.memory = { maxRssMbAt64: Math.max(...all), perRun: this.rss, usage: this.usage, sustained: this.sustained };
  }
}

/** NODE_OPTIONS without --max-old-space-size: V8's own old-generation limit, for comparison. */
export function withoutOldSpaceCap(nodeOptions: string): string {
  return nodeOptions.split(/\s+/).filter((f) => f && !/^--max-old-space-size(=|$)/.test(f)).join(' ');
}
