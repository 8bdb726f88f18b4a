import assert from 'node:assert/strict';
import { test } from 'node:test';
import { pg15Targets, renderPg15 } from '../../bench/lib/report/pg15.js';
import type { IssuanceLevel, Results } from '../../bench/lib/results.js';
import { fmtAgainst } from '../../bench/lib/stats.js';

const run = (rps: number) => ({ ok: 300, errors: 0, seconds: 300 / rps, rps, latency: { p50: 10, p99: 20 } }) as unknown as IssuanceLevel['floor'];
const cpu = { broker: 1, pg: 2, client: 0.5, idle: 0.05 };
const level = (floorRps: number, brokerRps: number): IssuanceLevel =>
  ({ connections: 16, floor: run(floorRps), broker: run(brokerRps), floorCpu: cpu, brokerCpu: cpu, ratio: brokerRps / floorRps, maxRssMb: 100 });
const results = (pg15: Results['pg15']) => ({ issuance: [{ iterations: 4096, levels: [] }, { iterations: 1, levels: [] }], pg15 }) as unknown as Results;

test('P1, P3 and P1b on PostgreSQL 15 are read from its default and tuned runs', () => {
  const r = results({ postgres: 'PostgreSQL 15.18 (Debian 15.18-0+deb12u1) on x86_64-pc-linux-gnu', runs: [
    { iterations: 4096, level: level(500, 460) },
    { iterations: 1, level: level(3000, 2300) },
  ] });
  const s = pg15Targets(r)!;
  assert.equal(s.p1, 460 / 500);
  assert.equal(s.p3, 2300 / 460);
  assert.equal(s.p1b, 2300 / 3000);
  assert.equal(s.floorGain, 6);
  const text = renderPg15(r).join('\n');
  assert.match(text, /^### The same on PostgreSQL 15: P1, P3 and P1b$/m);
  assert.match(text, /\(PostgreSQL 15\.18 \(Debian 15\.18-0\+deb12u1\)\)/);
  assert.match(text, /^\| 4096 \| 500 \| 460 \| \*\*0\.92\*\* \|/m);
  assert.match(text, /P1 0\.92× \(target ≥ 0\.9×: pass\), P3 5\.0× \(target ≥ 5×: pass; the floor itself gains 6\.0×\), P1b 0\.77× \(target ≥ 0\.5×: pass\)/);
  // The same figures a little lower miss.
  const low = results({ postgres: 'PostgreSQL 15.18', runs: [{ iterations: 4096, level: level(500, 440) }, { iterations: 1, level: level(3000, 2100) }] });
  assert.match(renderPg15(low).join('\n'), /P1 0\.88× \(target ≥ 0\.9×: miss\), P3 4\.8× \(target ≥ 5×: miss;/);
});

test('a run without PostgreSQL 15 says why, and has no PostgreSQL 15 figures', () => {
  const r = results({ unavailable: 'postgresql-15 is not installed (no /usr/lib/postgresql/15/bin/initdb)' });
  assert.equal(pg15Targets(r), undefined);
  assert.deepEqual(renderPg15(r), ['### The same on PostgreSQL 15: P1, P3 and P1b', '', 'Not measured in this run: postgresql-15 is not installed (no /usr/lib/postgresql/15/bin/initdb).', '']);
  // Older results have no pg15 entry at all: no section.
  assert.deepEqual(renderPg15(results(undefined)), []);
});

test('a ratio just under its line is not rounded onto it', () => {
  const r = results({ postgres: 'PostgreSQL 15.18', runs: [
    { iterations: 4096, level: level(500, 449) },
    { iterations: 1, level: level(3000, 2400) },
  ] });
  const text = renderPg15(r).join('\n');
  // 449/500 = 0.898: two digits would print "0.90" beside "miss".
  assert.match(text, /P1 0\.898× \(target ≥ 0\.9×: miss\)/);
  // Away from the line, two digits as before.
  assert.match(text, /P1b 0\.80× \(target ≥ 0\.5×: pass\)/);
});

test('fmtAgainst adds digits only where rounding would reach the line', () => {
  assert.equal(fmtAgainst(0.8971, 0.9), '0.897');
  assert.equal(fmtAgainst(0.89999, 0.9), '0.89999');
  assert.equal(fmtAgainst(0.9, 0.9), '0.90');
  assert.equal(fmtAgainst(0.9031, 0.9), '0.903');
  assert.equal(fmtAgainst(0.87, 0.9), '0.87');
});
