import type { Results } from '../results.js';
import { fmt, fmtAgainst } from '../stats.js';
import { table } from './markdown.js';

/** Reaping (P4): draining an expired backlog while issuance runs. */
export function renderReaping(r: Results): string[] {
  const out: string[] = [];
  out.push('## Reaping (P4)');
  out.push('');
  if (r.reaping) {
    const rp = r.reaping;
    const drains = rp.drains?.length ?? 1;
    out.push(`${rp.backlog.toLocaleString('en-US')} active leases with their roles were created directly in SQL (${fmt(rp.createSeconds, 1)} s; as superuser, each role granted WITH ADMIN OPTION to one of the creator roles, round robin, as a broker-issued one is: the setup does not depend on the speed of the path it measures), then expired all at once (\`UPDATE … SET expires_at = now() - 1 minute\`). \`Reaper.reap()\` (the production code path, leadership included, in the broker process, default BROKER_SCRAM_ITERATIONS) was then called until a run found nothing due or ${rp.capSeconds} s had passed, while an open-loop issuance load of ${rp.rate} req/s over ${rp.connections} connections ran against the same broker (30 % of the ${fmt(rp.probeRps, 0)} req/s a short closed-loop probe reached with the backlog present). "Idle" is the same load for ${fmt(rp.idle.seconds / drains, 0)} s before, backlog present but not being reaped${rp.idleAfter ? `, and again for ${fmt(rp.idleAfter.seconds / drains, 0)} s after the drain, with the backlog gone. Issuance gets cheaper as the backlog shrinks (live roles make every role statement dearer), so neither baseline fits the whole drain: the verdict takes the worse of the drain's first third (requests that began in it) against the baseline before, and its last third against the baseline after` : ''}. Latencies are raw response times (no coordinated-omission correction).${rp.drains && rp.drains.length > 1 ? ` All of this ran ${rp.drains.length} times over, each drain on a fresh backlog with its own idle loads before and after, at the one rate; the table pools them (counts and times add up; each percentile is taken over all drains' requests), so each third's p99 rests on about ${fmt(rp.early ? rp.early.n / 100 : Number.NaN, 0)} requests slower than it rather than a third as many. Before pooling, one drain's ratio moved between 1.1× and 2.1× from one bench run to the next (two dozen runs on 2026-11-29, of the same code and two close variants).` : ''}`);
    out.push('');
    out.push(table(['measure', 'value'], [
      ['leases ended / failed', `${rp.ended} / ${rp.failed} in ${rp.runs} reap() runs`],
      [rp.drains && rp.drains.length > 1 ? `time to drain (${rp.drains.length} drains)` : 'time to drain', `${fmt(rp.seconds, 2)} s`],
      ['roles dropped per second', `**${fmt(rp.rolesPerSecond, 0)}**`],
      ['backlog roles left afterwards', `${rp.rolesLeft}${rp.rolesLeft ? ` (stopped at the ${rp.capSeconds} s cap; draining the rest at this rate would take ≈ ${fmt(rp.rolesLeft / rp.rolesPerSecond, 0)} s more)` : ''}`],
      ['issuance idle: p50 / p99 (n)', `${fmt(rp.idle.latency.p50, 2)} / ${fmt(rp.idle.latency.p99, 2)} ms (${rp.idle.latency.n})`],
      ['issuance while reaping: p50 / p99 (n)', `${fmt(rp.during.latency.p50, 2)} / ${fmt(rp.during.latency.p99, 2)} ms (${rp.during.latency.n})`],
      ...(rp.idleAfter && rp.early && rp.late ? [
        ['issuance idle after the drain: p50 / p99 (n)', `${fmt(rp.idleAfter.latency.p50, 2)} / ${fmt(rp.idleAfter.latency.p99, 2)} ms (${rp.idleAfter.latency.n})`],
        ['drain\'s first third: p50 / p99 (n); p99 ÷ idle before', `${fmt(rp.early.p50, 2)} / ${fmt(rp.early.p99, 2)} ms (${rp.early.n}); ${fmt(rp.early.p99 / rp.idle.latency.p99, 2)}×`],
        ['drain\'s last third: p50 / p99 (n); p99 ÷ idle after', `${fmt(rp.late.p50, 2)} / ${fmt(rp.late.p99, 2)} ms (${rp.late.n}); ${fmt(rp.late.p99 / rp.idleAfter.latency.p99, 2)}×`],
        ['whole drain p99 ÷ idle before / after', `${fmt(rp.during.latency.p99 / rp.idle.latency.p99, 2)}× / ${fmt(rp.during.latency.p99 / rp.idleAfter.latency.p99, 2)}×`],
      ] : []),
      ['p99 while reaping ÷ idle (the verdict\'s)', `**${fmtAgainst(reapingP99Ratio(rp), 1.5)}×**`],
      ['issuance errors idle / while reaping', `${rp.idle.errors} / ${rp.during.errors}${rp.idleAfter ? ` (after: ${rp.idleAfter.errors})` : ''}`],
    ]));
    if (rp.drains && rp.drains.length > 1) {
      out.push('');
      out.push('Each drain on its own:');
      out.push('');
      out.push(table(['drain', 'roles/s', 'time s', 'p99 idle before ms', 'p99 first third ms', 'p99 idle after ms', 'p99 last third ms', 'worse ratio'],
        rp.drains.map((d, i) => [String(i + 1), fmt(d.rolesPerSecond, 0), fmt(d.seconds, 2), fmt(d.idleP99, 1), fmt(d.earlyP99, 1), fmt(d.idleAfterP99, 1), fmt(d.lateP99, 1), `${fmt(d.ratio, 2)}×`])));
    }
  } else out.push('Not measured (see failed scenarios).');
  out.push('');
  return out;
}

/**
 * P4's latency half: the worse of the drain's first third against the idle load with the whole
 * backlog, and its last third against the idle load with the backlog gone.
 */
export function reapingP99Ratio(rp: NonNullable<Results['reaping']>): number {
  if (!rp.early || !rp.late || !rp.idleAfter) return rp.during.latency.p99 / rp.idle.latency.p99;
  return Math.max(rp.early.p99 / rp.idle.latency.p99, rp.late.p99 / rp.idleAfter.latency.p99);
}
