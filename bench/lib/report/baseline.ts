import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';
import { targets, verdict, type Target } from './targets.js';

/** Before and after the optimisations: targets and broker issuance against a baseline run (only when one is given). */
export function renderBaseline(r: Results, ts: Target[], baseline?: Results, baselineName?: string): string[] {
  const out: string[] = [];
  if (baseline) {
    out.push(`## Before and after the optimisations (before: \`${baselineName}\`, ${baseline.meta.date})`);
    out.push('');
    const bt = targets(baseline);
    out.push(table(['id', 'before', 'after'], ts.map((t) => [t.id, `${bt.find((b) => b.id === t.id)?.measured ?? '—'} ${(() => { const b = bt.find((x) => x.id === t.id); return b ? `(${verdict(b)})` : ''; })()}`, `${t.measured} (${verdict(t)})`])));
    out.push('');
    const rows: string[][] = [];
    for (const [i, set] of r.issuance.entries()) {
      const before = baseline.issuance[i];
      for (const l of set.levels) {
        const b = before?.levels.find((x) => x.connections === l.connections);
        rows.push([String(set.iterations), String(l.connections), b ? `${fmt(b.broker.rps, 0)} /s, p50 ${fmt(b.broker.latency.p50, 2)} ms, ${fmt(b.ratio, 2)}×, ${fmt(b.brokerCpu.broker, 2)} ms CPU` : '—', `${fmt(l.broker.rps, 0)} /s, p50 ${fmt(l.broker.latency.p50, 2)} ms, ${fmt(l.ratio, 2)}×, ${fmt(l.brokerCpu.broker, 2)} ms CPU`]);
      }
    }
    out.push(table(['iterations', 'clients', 'broker before (rate, p50, ratio to floor, broker CPU/op)', 'broker after'], rows));
    out.push('');
  }
  return out;
}
