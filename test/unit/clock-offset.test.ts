import assert from 'node:assert/strict';
import { test } from 'node:test';
import pino from 'pino';
import { Gauge, Registry } from 'prom-client';
import { ClockOffsetWatch } from '../../src/postgres/clock-offset.js';

function watch() {
  const lines: Array<Record<string, any>> = [];
  const log = pino({ level: 'debug' }, { write: (l: string) => void lines.push(JSON.parse(l)) });
  const gauge = new Gauge({ name: 'offset', help: 'offset', registers: [new Registry()] });
  return { w: new ClockOffsetWatch(log, gauge), lines, gauge };
}

test('the offset is measured from the round trip\'s midpoint and published in seconds', async () => {
  const { w, gauge } = watch();
  w.observe(10_600, 10_000, 10_200);
  assert.equal((await gauge.get()).values[0].value, 0.5);
});

test('warns once when the clocks drift apart beyond what the round trip leaves unknown, and says when they agree again', () => {
  const { w, lines } = watch();
  w.observe(1_000 + 600_000, 1_000, 1_010);
  w.observe(2_000 + 600_000, 2_000, 2_010);
  const warned = lines.filter((l) => l.level === 40);
  assert.equal(warned.length, 1, 'one warning, not one per reading');
  assert.equal(warned[0].offset_ms, 599_995);
  w.observe(3_000 - 120_000, 3_000, 3_000);
  assert.equal(lines.filter((l) => l.level === 40).length, 1, 'still off (now behind): no new warning');
  w.observe(4_000 + 5, 4_000, 4_010);
  assert.equal(lines.filter((l) => l.level === 30 && /agree again/.test(l.msg)).length, 1);
});

test('a slow round trip is not taken for a skewed clock', () => {
  const { w, lines } = watch();
  // 5 s in the pool's queue: the server's reading could be anywhere in it.
  w.observe(4_900, 0, 5_000);
  assert.equal(lines.filter((l) => l.level === 40).length, 0);
});
