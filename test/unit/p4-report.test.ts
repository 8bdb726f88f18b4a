import assert from 'node:assert/strict';
import { test } from 'node:test';
import { renderReaping } from '../../bench/lib/report/reaping.js';
import { targets } from '../../bench/lib/report/targets.js';
import type { Results } from '../../bench/lib/results.js';

// P4's p99 ratio has a line too (≤ 1.5× idle): a ratio just over it must not print as "1.50×"
// beside a miss, nor as "0.00× over", which is what fmtAgainst is for on P1 and P1b.
const summary = (p99: number) => ({ n: 1000, p50: p99 / 2, p95: p99 * 0.9, p99, max: p99 * 1.2 });
const load = (p99: number) => ({ ok: 1000, errors: 0, seconds: 20, rps: 50, latency: summary(p99) });
const results = (lateP99: number) => ({
  issuance: [{ iterations: 4096, levels: [] }, { iterations: 1, levels: [] }],
  reaping: {
    backlog: 10_000, createSeconds: 30, ended: 10_000, failed: 0, runs: 60, seconds: 25, rolesPerSecond: 400, rolesLeft: 0,
    capSeconds: 240, probeRps: 150, rate: 45, connections: 4,
    idle: load(10), during: load(12), idleAfter: load(10), early: summary(12), late: summary(lateP99),
  },
}) as unknown as Results;

test('P4: a p99 ratio just over 1.5× reads as over it', () => {
  const p4 = targets(results(15.03)).find((t) => t.id === 'P4')!;
  assert.equal(p4.pass, false);
  assert.match(p4.measured, /worse 1\.503×/, p4.measured);
  assert.match(p4.miss!, /p99 1\.503× idle \(0\.003× over\)/, p4.miss);
  assert.match(renderReaping(results(15.03)).join('\n'), /\*\*1\.503×\*\*/);
  // Away from the line, two digits as before.
  const far = targets(results(17)).find((t) => t.id === 'P4')!;
  assert.match(far.measured, /worse 1\.70×/, far.measured);
  assert.match(far.miss!, /p99 1\.70× idle \(0\.20× over\)/, far.miss);
});
