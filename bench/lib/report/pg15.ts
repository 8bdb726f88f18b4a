import type { IssuanceLevel, Results } from '../results.js';
import { fmt, fmtAgainst } from '../stats.js';
import { cpuCell, notMeasured, table } from './markdown.js';

/** P1, P3 and P1b read at 16 clients on PostgreSQL 15, when that run took place. */
export function pg15Targets(r: Results): { p1: number; p3: number; p1b: number; floorGain: number; d: IssuanceLevel; t: IssuanceLevel } | undefined {
  const p = r.pg15;
  if (!p || 'unavailable' in p) return undefined;
  const d = p.runs.find((x) => x.iterations === r.issuance[0]?.iterations)?.level ?? p.runs[0]?.level;
  const t = p.runs.find((x) => x !== p.runs[0])?.level;
  if (!d || !t) return undefined;
  return { p1: d.ratio, p3: t.broker.rps / d.broker.rps, p1b: t.ratio, floorGain: t.floor.rps / d.floor.rps, d, t };
}

const verdict = (ok: boolean) => (ok ? 'pass' : 'miss');

/** The same 16-client comparison on Debian's PostgreSQL 15, beside the embedded server's. */
export function renderPg15(r: Results): string[] {
  const p = r.pg15;
  if (!p) return [];
  const heading = '### The same on PostgreSQL 15: P1, P3 and P1b';
  if ('unavailable' in p) return notMeasured(heading, p.unavailable);
  const out = [heading, ''];
  const s = pg15Targets(r);
  out.push(`PITFALLS' floor figures (230/s at 4096 iterations and 3,250/s at 1, 16 clients: 14×) come from pgbench on PostgreSQL 15. This is the 16-client measurement above, repeated on Debian's server (${p.postgres.replace(/ on x86_64.*$/, '')}), started by the same test helper with the same flags, as a server of its own (the embedded one sits idle meanwhile): a fresh broker per iteration count, warmed up as above, then floor and broker bursts in turn. On 15, CREATE ROLE's PBKDF2 costs more and CREATEROLE skips the membership checks of 16+ (the broker creates roles as itself, with no creator roles), so the verifier setting is a larger share of each credential.`);
  out.push('');
  out.push(table(
    ['BROKER_SCRAM_ITERATIONS', 'floor req/s', 'broker req/s', 'ratio broker/floor', 'broker p50 ms', 'broker p99 ms', 'CPU ms/op floor (broker/pg/client)', 'CPU ms/op broker (broker/pg/client)'],
    p.runs.map(({ iterations, level: l }) => [
      String(iterations), fmt(l.floor.rps, 0), fmt(l.broker.rps, 0), `**${fmt(l.ratio, 2)}**`, fmt(l.broker.latency.p50, 2), fmt(l.broker.latency.p99, 2),
      cpuCell(l.floorCpu), cpuCell(l.brokerCpu),
    ]),
  ));
  out.push('');
  if (s) {
    out.push(`On PostgreSQL 15: P1 ${fmtAgainst(s.p1, 0.9)}× (target ≥ 0.9×: ${verdict(s.p1 >= 0.9)}), P3 ${fmt(s.p3, 1)}× (target ≥ 5×: ${verdict(s.p3 >= 5)}; the floor itself gains ${fmt(s.floorGain, 1)}×), P1b ${fmtAgainst(s.p1b, 0.5)}× (target ≥ 0.5×: ${verdict(s.p1b >= 0.5)}). The targets table above is read on the embedded server.`);
    out.push('');
  }
  return out;
}
