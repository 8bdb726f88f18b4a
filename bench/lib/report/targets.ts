import type { IssuanceLevel, Results } from '../results.js';
import { fmt, fmtAgainst } from '../stats.js';
import { pct } from './markdown.js';
import { startupCommand } from './memory-and-startup.js';
import { reapingP99Ratio } from './reaping.js';

/** The performance targets P1–P7: what each measures, its threshold, and this run's verdict. */

export interface Target {
  id: string;
  measure: string;
  target: string;
  measured: string;
  value: number;
  pass: boolean | null;
  miss?: string;
  /** Said next to the verdict, e.g. that it is closer to the threshold than runs vary. */
  note?: string;
}

// A ratio to the floor moved by up to ±5 % between otherwise identical runs here (the issuance
// section says so): a verdict nearer the threshold than that is not settled by one run.
const RATIO_SPREAD = 0.05;
const nearThreshold = (value: number, threshold: number) =>
  Math.abs(value / threshold - 1) < RATIO_SPREAD ? `within the ±${pct(RATIO_SPREAD)} this ratio varies between runs` : undefined;

function level(r: Results, iterations: 'default' | 'tuned', connections: number): IssuanceLevel | undefined {
  const set = iterations === 'default' ? r.issuance[0] : r.issuance[1];
  return set?.levels.find((l) => l.connections === connections);
}

export function targets(r: Results): Target[] {
  const out: Target[] = [];
  const d16 = level(r, 'default', 16);
  const t16 = level(r, 'tuned', 16);
  const d1 = level(r, 'default', 1);
  const push = (t: Omit<Target, 'pass'> & { ok: boolean | null }) => out.push({ ...t, pass: t.ok });

  const p1 = d16 ? d16.ratio : Number.NaN;
  push({
    id: 'P1', measure: `issuance throughput at 16 clients vs floor (${r.issuance[0]?.iterations ?? '?'} iterations)`, target: '≥ 0.9×',
    measured: d16 ? `${fmtAgainst(p1, 0.9)}× (${fmt(d16.broker.rps, 0)} vs ${fmt(d16.floor.rps, 0)} /s)` : 'not measured', value: p1,
    ok: d16 ? p1 >= 0.9 : null, miss: d16 && p1 < 0.9 ? `${pct(0.9 - p1)} of floor short` : undefined,
    note: d16 ? nearThreshold(p1, 0.9) : undefined,
  });
  const p2 = d1 ? d1.broker.latency.p50 - d1.floor.latency.p50 : Number.NaN;
  push({
    id: 'P2', measure: 'median latency overhead over the floor at 1 client (default iterations)', target: '≤ 2 ms',
    measured: d1 ? `${fmt(p2, 2)} ms (${fmt(d1.broker.latency.p50, 2)} vs ${fmt(d1.floor.latency.p50, 2)} ms)` : 'not measured', value: p2,
    ok: d1 ? p2 <= 2 : null, miss: d1 && p2 > 2 ? `${fmt(p2 - 2, 2)} ms over` : undefined,
  });
  const p3 = d16 && t16 ? t16.broker.rps / d16.broker.rps : Number.NaN;
  push({
    id: 'P3', measure: `issuance throughput, tuned (${r.issuance[1]?.iterations ?? '?'}) vs default (${r.issuance[0]?.iterations ?? '?'}) iterations, 16 clients`, target: '≥ 5×',
    measured: d16 && t16 ? `${fmt(p3, 1)}× (${fmt(t16.broker.rps, 0)} vs ${fmt(d16.broker.rps, 0)} /s, two brokers measured minutes apart; the floors of the same windows: ${fmt(t16.floor.rps / d16.floor.rps, 1)}×)` : 'not measured', value: p3,
    ok: d16 && t16 ? p3 >= 5 : null, miss: d16 && t16 && p3 < 5 ? `${fmt(5 - p3, 1)}× short` : undefined,
  });
  const p1b = t16 ? t16.ratio : Number.NaN;
  push({
    id: 'P1b', measure: 'issuance throughput at 16 clients vs floor, both tuned', target: '≥ 0.5×',
    measured: t16 ? `${fmtAgainst(p1b, 0.5)}× (${fmt(t16.broker.rps, 0)} vs ${fmt(t16.floor.rps, 0)} /s)` : 'not measured', value: p1b,
    ok: t16 ? p1b >= 0.5 : null, miss: t16 && p1b < 0.5 ? `${pct(0.5 - p1b)} of floor short` : undefined,
    note: t16 ? nearThreshold(p1b, 0.5) : undefined,
  });
  const rp = r.reaping;
  const p99Ratio = rp ? reapingP99Ratio(rp) : Number.NaN;
  const p4ok = rp ? rp.rolesPerSecond >= 200 && p99Ratio <= 1.5 && rp.rolesLeft === 0 : null;
  push({
    id: 'P4', measure: `reaping a ${rp?.backlog ?? '10k'} backlog: roles dropped/s; issuance p99 while reaping vs idle`, target: '≥ 200 roles/s, p99 ≤ 1.5× idle',
    measured: rp ? `${fmt(rp.rolesPerSecond, 0)} roles/s; ${rp.early && rp.late && rp.idleAfter ? `p99 ${fmt(rp.early.p99, 1)} vs ${fmt(rp.idle.latency.p99, 1)} ms idle in the drain's first third, ${fmt(rp.late.p99, 1)} vs ${fmt(rp.idleAfter.latency.p99, 1)} ms in its last: worse ${fmtAgainst(p99Ratio, 1.5)}×` : `p99 ${fmt(rp.during.latency.p99, 1)} vs ${fmt(rp.idle.latency.p99, 1)} ms idle = ${fmtAgainst(p99Ratio, 1.5)}×`}` : 'not measured',
    value: rp ? rp.rolesPerSecond : Number.NaN, ok: p4ok,
    miss: rp && !p4ok ? [rp.rolesPerSecond < 200 ? `${fmt(200 - rp.rolesPerSecond, 0)} roles/s short` : '', p99Ratio > 1.5 ? `p99 ${fmtAgainst(p99Ratio, 1.5)}× idle (${fmtAgainst(p99Ratio - 1.5, 0)}× over)` : '', rp.rolesLeft ? `${rp.rolesLeft} roles left` : ''].filter(Boolean).join('; ') : undefined,
  });
  const ls = r.leases;
  const allIndexed = ls ? ls.shapes.every((s) => s.plans.every((p) => p.indexUsed)) : false;
  push({
    id: 'P5', measure: `GET /leases p95 at ${ls ? ls.rows.toLocaleString('en-US') : '1M'} rows (filters + cursor)`, target: '≤ 10 ms, index used',
    measured: ls ? `p95 ${fmt(ls.latency.p95, 2)} ms (p50 ${fmt(ls.latency.p50, 2)} ms; slowest shape ${slowest(ls.shapes)}); index used in ${ls.shapes.reduce((n, s) => n + s.plans.filter((p) => p.indexUsed).length, 0)}/${ls.shapes.reduce((n, s) => n + s.plans.length, 0)} plans` : 'not measured',
    value: ls ? ls.latency.p95 : Number.NaN, ok: ls ? ls.latency.p95 <= 10 && allIndexed && ls.failures === 0 : null,
    miss: ls && ls.latency.p95 > 10 ? `${fmt(ls.latency.p95 - 10, 2)} ms over` : ls && !allIndexed ? 'a plan does not use an index' : undefined,
  });
  const mem = r.memory;
  push({
    id: 'P6', measure: `broker RSS at 64 concurrent issuers (peak: 100 ms samples and the kernel's VmHWM${mem?.sustained?.length ? ', including a sustained run' : ''})`, target: '≤ 150 MB',
    measured: mem ? `${fmt(mem.maxRssMbAt64, 0)} MB` : 'not measured', value: mem ? mem.maxRssMbAt64 : Number.NaN,
    ok: mem ? mem.maxRssMbAt64 <= 150 : null, miss: mem && mem.maxRssMbAt64 > 150 ? `${fmt(mem.maxRssMbAt64 - 150, 0)} MB over` : undefined,
  });
  const st = r.startup;
  push({
    id: 'P7', measure: `start to ready against a running PostgreSQL (${startupCommand(r)} → /readyz 200, median)`, target: '≤ 1.5 s',
    measured: st ? `${fmt(st.medianMs / 1000, 2)} s (runs: ${st.runsMs.map((m) => fmt(m / 1000, 2)).join(', ')} s)` : 'not measured',
    value: st ? st.medianMs / 1000 : Number.NaN, ok: st ? st.medianMs <= 1500 : null, miss: st && st.medianMs > 1500 ? `${fmt((st.medianMs - 1500) / 1000, 2)} s over` : undefined,
  });
  return out;
}

export function verdict(t: Target): string {
  return t.pass === null ? 'NOT MEASURED' : t.pass ? 'PASS' : 'MISS';
}

function slowest(shapes: NonNullable<Results['leases']>['shapes']): string {
  const worst = [...shapes].sort((a, b) => b.latency.p95 - a.latency.p95)[0];
  return worst ? `"${worst.name}" p95 ${fmt(worst.latency.p95, 2)} ms` : 'none';
}
