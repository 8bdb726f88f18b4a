import type { Results } from '../results.js';
import { fmt } from '../stats.js';

/** The command P7 timed: the compiled CLI in current results, bin/pg-broker.js through tsx in results from before the build step. */
export function startupCommand(r: Results): string {
  return r.startup && r.startup.entry !== 'compiled' ? '`node bin/pg-broker.js serve`' : '`node dist/pg-broker.mjs serve`';
}

/** Memory (P6) and start-up (P7). */
export function renderMemoryAndStartup(r: Results): string[] {
  const out: string[] = [];
  const compiled = r.meta.brokerRuntime === 'compiled';
  out.push('## Memory (P6) and start-up (P7)');
  out.push('');
  if (r.memory) {
    out.push(`- Broker RSS sampled every 100 ms from /proc during the 64-client issuance runs (the broker process ${compiled ? 'compiled by scripts/build.ts and run by plain node, no tsx loader' : 'loaded through tsx'}): max ${r.memory.perRun.map((v) => `${fmt(v, 0)} MB`).join(' (default) and ')} (tuned).`);
    const mb = (b: number) => fmt(b / 1024 ** 2, 0);
    const rest = compiled ? 'code, stacks, native allocations' : "code, stacks, the tsx loader thread's isolate, native allocations";
    for (const [i, u] of (r.memory.usage ?? []).entries()) {
      out.push(`  - \`process.memoryUsage()\` right after the 64-client runs (${i === 0 ? 'default' : 'tuned'}): rss ${mb(u.rss)} MB = V8 heap ${mb(u.heapTotal)} MB (${mb(u.heapUsed)} MB used) + external ${mb(u.external)} MB (array buffers ${mb(u.arrayBuffers)} MB) + the rest (${rest}).`);
    }
  }
  const st = r.startup;
  if (st) {
    const runs = `${st.runsMs.map((v) => `${fmt(v, 0)} ms`).join(', ')}; median ${fmt(st.medianMs, 0)} ms${st.idleRssMb ? `, idle RSS ${fmt(st.idleRssMb, 0)} MB` : ''}`;
    const how = 'spawned with the broker\'s environment against the running, already-migrated PostgreSQL, timed until `GET /readyz` first answers 200 (polled every 5 ms)';
    if (st.entry === 'compiled') {
      out.push(`- Start to ready: ${startupCommand(r)}, the CLI compiled as \`npm run build\` compiles it (scripts/build.ts, into a temp dir from the current sources) and run by plain node as the Docker image runs it, ${how}: ${runs}. This includes Node start-up, loading the compiled code and its dependencies from node_modules, the migration check, building the app and the first SELECT 1.`);
      if (st.tsx) out.push(`- For comparison (not a target): the same start through tsx, \`node bin/pg-broker.js serve\` as a development checkout runs it: ${st.tsx.runsMs.map((v) => `${fmt(v, 0)} ms`).join(', ')}; median ${fmt(st.tsx.medianMs, 0)} ms, idle RSS ${fmt(st.tsx.idleRssMb, 0)} MB.`);
    } else {
      out.push(`- Start to ready: ${startupCommand(r)} ${how}: ${runs}. This includes Node start-up and tsx loading the TypeScript sources (bin/pg-broker.js registers tsx), the migration check, building the app and the first SELECT 1.`);
      if (st.bundled) out.push(`- For comparison (not a target): the same CLI bundled to plain JavaScript by esbuild, started the same way: ${st.bundled.runsMs.map((v) => `${fmt(v, 0)} ms`).join(', ')}; median ${fmt(st.bundled.medianMs, 0)} ms, idle RSS ${fmt(st.bundled.idleRssMb, 0)} MB.`);
    }
  }
  out.push('');
  return out;
}
