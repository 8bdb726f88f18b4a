import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { notMeasured, pct, table } from './markdown.js';

/** Where the broker's CPU goes: the V8 CPU profile by package and by function (only when profiled). */
export function renderCpuProfile(r: Results): string[] {
  const out: string[] = [];
  if (r.profile) {
    const p = r.profile;
    out.push('## Where the broker\'s CPU goes');
    out.push('');
    out.push(`V8 CPU profile of the broker process (node:inspector, 200 µs sampling) during ${p.scenario}; ${fmt(p.totalMs, 0)} ms sampled${p.requests ? `, ${fmt(p.totalMs / p.requests, 3)} ms of wall-clock samples per request (idle included)` : ''}. The sampler runs on wall time: a sample taken while the main thread was runnable but off its core (see the event-loop figures in the P1 note) is charged to the call it was in, so native calls such as socket writes read larger here than their CPU cost. Full profile: \`${p.file}\`, written by each run and not committed (open it in Chrome DevTools or speedscope).`);
    out.push('');
    out.push(table(['package / layer', 'self ms', 'share'], p.byPackage.map((row) => [row.name, fmt(row.ms, 0), pct(row.share)])));
    out.push('');
    out.push(table(['function', 'self ms', 'share'], p.byFunction.slice(0, 15).map((row) => [`\`${row.name}\``, fmt(row.ms, 0), pct(row.share)])));
    out.push('');
  }
  out.push(...renderPerfProfile(r));
  return out;
}

/** The on-CPU breakdown from perf, by thread and by what the innermost telling frame belongs to. */
function renderPerfProfile(r: Results): string[] {
  const p = r.perfProfile;
  if (!p) return [];
  const heading = '### On the CPU only (Linux perf)';
  if ('unavailable' in p) return notMeasured(heading, p.unavailable);
  const out = [heading, ''];
  out.push(`\`perf record -e cpu-clock -g\` on a broker of its own (started with \`--perf-basic-prof\` so perf can name JavaScript frames) during ${p.scenario}: P1's point. cpu-clock samples a thread only while it is on a core, so unlike the V8 profile above this is CPU time, of every thread of the broker process and of the kernel on its behalf. ${p.samples} samples; the broker process used ${fmt(p.brokerMsPerRequest, 3)} ms of CPU per request over the same bursts (schedstat). A main-thread sample counts for the innermost frame that tells where it is: the package of the innermost JavaScript frame (Node's own stream and timer code is charged to its caller), else GC or the JIT compiler, else the HTTP parser, else the event loop's own native and kernel work.`);
  out.push('');
  const rows = (thread: 'main' | 'helper') => p.categories.filter((c) => c.thread === thread);
  const sum = (thread: 'main' | 'helper') => rows(thread).reduce((a, c) => a + c.share, 0);
  const body: string[][] = [];
  for (const [thread, label] of [['main', 'main thread (event loop)'], ['helper', 'other threads']] as const) {
    body.push([`**${label}**`, `**${pct(sum(thread))}**`, `**${fmt(sum(thread) * p.brokerMsPerRequest, 3)}**`]);
    for (const c of rows(thread)) body.push([`  ${c.name}`, pct(c.share), fmt(c.share * p.brokerMsPerRequest, 3)]);
  }
  out.push(table(['where', 'share of broker CPU', 'ms per request'], body));
  out.push('');
  return out;
}
