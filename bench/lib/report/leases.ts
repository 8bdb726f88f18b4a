import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';

/** GET /leases over a large table (P5): latency per query shape and the query plans. */
export function renderLeases(r: Results): string[] {
  const out: string[] = [];
  out.push('## GET /leases over a large table (P5)');
  out.push('');
  if (r.leases) {
    const ls = r.leases;
    out.push(`${ls.rows.toLocaleString('en-US')} rows in broker.leases (bulk \`INSERT … SELECT generate_series\`, indexes rebuilt from the migration's own definitions, then VACUUM ANALYZE; ${fmt(ls.loadSeconds, 1)} s). One keep-alive connection, one request at a time, each shape walking up to its page count through \`next_cursor\`; an admin token except for the owner shape. ${ls.requests} timed requests, ${ls.failures} failures. Latency is client-side, through HTTP and JWT verification.`);
    out.push('');
    out.push(table(['shape', 'query', 'n', 'p50 ms', 'p95 ms', 'p99 ms', 'index used (first page / cursor page)'],
      [
        ...ls.shapes.map((s) => [s.name, `\`${new URLSearchParams(Object.entries(s.query).map(([k, v]) => [k, String(v)])).toString()}\`${s.owner ? ` as ${s.owner}` : ''}`, String(s.latency.n), fmt(s.latency.p50, 2), fmt(s.latency.p95, 2), fmt(s.latency.p99, 2), s.plans.map((p) => (p.indexUsed ? 'yes' : '**no**')).join(' / ')]),
        ['**all**', '', String(ls.latency.n), `**${fmt(ls.latency.p50, 2)}**`, `**${fmt(ls.latency.p95, 2)}**`, fmt(ls.latency.p99, 2), ''],
      ]));
    out.push('');
    out.push('<details><summary>Query plans (EXPLAIN ANALYZE of the exact SQL listLeases sends, as the broker role)</summary>');
    out.push('');
    for (const s of ls.shapes) {
      for (const p of s.plans) {
        out.push(`**${s.name}, ${p.page} page**`);
        out.push('');
        out.push('```');
        out.push(p.plan);
        out.push('```');
        out.push('');
      }
    }
    out.push('</details>');
  } else out.push('Not measured (see failed scenarios).');
  out.push('');
  return out;
}
