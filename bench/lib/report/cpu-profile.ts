import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { pct, table } from './markdown.js';

/** Where the broker's CPU goes: the V8 CPU profile by package and by function (only when profiled). */
export function renderCpuProfile(r: Results): string[] {
  const out: string[] = [];
  if (r.profile) {
    const p = r.profile;
    out.push('## Where the broker\'s CPU goes');
    out.push('');
    out.push(`V8 CPU profile of the broker process (node:inspector, 200 µs sampling) during ${p.scenario}; ${fmt(p.totalMs, 0)} ms sampled${p.requests ? `, ${fmt(p.totalMs / p.requests, 3)} ms of wall-clock samples per request (idle included)` : ''}. The sampler runs on wall time: a sample taken while the main thread was runnable but off its core (see the event-loop figures in the P1 note) is charged to the call it was in, so native calls such as socket writes read larger here than their CPU cost. Full profile: \`${p.file}\` (open in Chrome DevTools or speedscope).`);
    out.push('');
    out.push(table(['package / layer', 'self ms', 'share'], p.byPackage.map((row) => [row.name, fmt(row.ms, 0), pct(row.share)])));
    out.push('');
    out.push(table(['function', 'self ms', 'share'], p.byFunction.slice(0, 15).map((row) => [`\`${row.name}\``, fmt(row.ms, 0), pct(row.share)])));
    out.push('');
  }
  return out;
}
