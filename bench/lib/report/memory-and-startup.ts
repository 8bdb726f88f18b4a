import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';

/** The chunk size the sustained run used, from the run's recorded settings. */
const SUSTAINED_CHUNK = (r: Results) => (r.meta.settings as { sustained?: { chunk?: number } }).sustained?.chunk ?? Number.NaN;

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
    if (r.memory.perRun.length) out.push(`- Broker RSS sampled every 100 ms from /proc during the 64-client issuance runs (the broker process ${compiled ? 'compiled by scripts/build.ts and run by plain node, no tsx loader' : 'loaded through tsx'}): max ${r.memory.perRun.map((v) => `${fmt(v, 0)} MB`).join(' (default) and ')} (tuned).`);
    const mb = (b: number) => fmt(b / 1024 ** 2, 0);
    const rest = compiled ? 'code, stacks, native allocations' : "code, stacks, the tsx loader thread's isolate, native allocations";
    for (const [i, u] of (r.memory.usage ?? []).entries()) {
      out.push(`  - \`process.memoryUsage()\` right after the 64-client runs (${i === 0 ? 'default' : 'tuned'}): rss ${mb(u.rss)} MB = V8 heap ${mb(u.heapTotal)} MB (${mb(u.heapUsed)} MB used) + external ${mb(u.external)} MB (array buffers ${mb(u.arrayBuffers)} MB) + the rest (${rest}).`);
    }
    const sustained = r.memory.sustained ?? [];
    if (sustained.length) {
      out.push(`- Sustained: ${fmt(sustained[0].credentials, 0)} credentials at 64 clients and the tuned setting (where the broker allocates fastest), in chunks of ${fmt(SUSTAINED_CHUNK(r), 0)} with the issued roles dropped after each, RSS sampled throughout; P6 is the largest of these maxima and the 64-client runs' above. The second row, if any, is a broker of its own without the image's old-generation cap, for comparison of memory (started fresh, without the JIT warm-up, so its credentials/s says nothing about the cap's cost: paired runs put that at about 0.05 ms of broker CPU per credential).`);
      out.push('');
      out.push(table(
        ['NODE_OPTIONS', 'credentials', 'credentials/s', 'max RSS MB', 'RSS after MB', 'V8 heap after MB (used)'],
        sustained.map((x) => [`\`${x.nodeOptions || '(none)'}\``, fmt(x.credentials, 0), fmt(x.credentials / x.seconds, 0), fmt(x.maxRssMb, 0), mb(x.after.rss), `${mb(x.after.heapTotal)} (${mb(x.after.heapUsed)})`]),
      ));
      out.push('');
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
