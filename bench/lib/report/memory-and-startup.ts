import type { Results } from '../results.js';
import { fmt } from '../stats.js';

/** Memory (P6) and start-up (P7). */
export function renderMemoryAndStartup(r: Results): string[] {
  const out: string[] = [];
  out.push('## Memory (P6) and start-up (P7)');
  out.push('');
  if (r.memory) {
    out.push(`- Broker RSS sampled every 100 ms from /proc during the 64-client issuance runs: max ${r.memory.perRun.map((v) => `${fmt(v, 0)} MB`).join(' (default) and ')} (tuned).`);
    const mb = (b: number) => fmt(b / 1024 ** 2, 0);
    for (const [i, u] of (r.memory.usage ?? []).entries()) {
      out.push(`  - \`process.memoryUsage()\` right after the 64-client runs (${i === 0 ? 'default' : 'tuned'}): rss ${mb(u.rss)} MB = V8 heap ${mb(u.heapTotal)} MB (${mb(u.heapUsed)} MB used) + external ${mb(u.external)} MB (array buffers ${mb(u.arrayBuffers)} MB) + the rest (code, stacks, the tsx loader thread's isolate, native allocations).`);
    }
  }
  if (r.startup) {
    out.push(`- Start to ready: \`node bin/pg-broker.js serve\` spawned with the broker's environment against the running, already-migrated PostgreSQL, timed until \`GET /readyz\` first answers 200 (polled every 5 ms): ${r.startup.runsMs.map((v) => `${fmt(v, 0)} ms`).join(', ')}; median ${fmt(r.startup.medianMs, 0)} ms${r.startup.idleRssMb ? `, idle RSS ${fmt(r.startup.idleRssMb, 0)} MB` : ''}. This includes Node start-up and tsx loading the TypeScript sources (bin/pg-broker.js registers tsx), the migration check, building the app and the first SELECT 1.`);
    if (r.startup.bundled) out.push(`- For comparison (not a target): the same CLI bundled to plain JavaScript by esbuild, started the same way: ${r.startup.bundled.runsMs.map((v) => `${fmt(v, 0)} ms`).join(', ')}; median ${fmt(r.startup.bundled.medianMs, 0)} ms, idle RSS ${fmt(r.startup.bundled.idleRssMb, 0)} MB.`);
  }
  out.push('');
  return out;
}
