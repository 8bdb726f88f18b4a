import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';

/** Bursts from one identity against the same bursts from distinct ones. */
export function renderFanout(r: Results): string[] {
  const runs = r.fanout ?? [];
  if (runs.length === 0) return [];
  const size = runs[0].size;
  const out: string[] = ['## Bursts from one identity', ''];
  out.push(`The bursts the issue names come from one identity: every pod of a Deployment carries its service account's \`sub\`, and every job of one GitHub workflow run on a branch the same \`repo:…:ref:…\`. The issuance tables above use a distinct \`sub\` per request. Issuances of one identity queue on its advisory lock (the quota check and the lease INSERT of one must see the other's), held from the INSERT until COMMIT, so through CREATE ROLE, whose PBKDF2 PostgreSQL runs again; each request waiting for it holds one of the pool's connections meanwhile. Here ${size} requests are sent at once, one connection each, first with ${size} distinct subjects, then with a single one, in turn (${runs[0].rounds} rounds each after one warm-up burst, issued roles dropped before each burst), on the brokers of the issuance tables.`);
  out.push('');
  out.push(table(['BROKER_SCRAM_ITERATIONS', 'subjects', 'req/s', 'each burst s', 'p50 ms', 'p99 ms', 'errors', 'one ÷ distinct'], runs.flatMap((f) => [
    [String(f.iterations), `${f.size} distinct`, fmt(f.distinct.rps, 0), f.burstSeconds.distinct.map((s) => fmt(s, 2)).join(', '), fmt(f.distinct.latency.p50, 1), fmt(f.distinct.latency.p99, 1), String(f.distinct.errors), ''],
    [String(f.iterations), 'one', fmt(f.same.rps, 0), f.burstSeconds.same.map((s) => fmt(s, 2)).join(', '), fmt(f.same.latency.p50, 1), fmt(f.same.latency.p99, 1), String(f.same.errors), `**${fmt(f.same.rps / f.distinct.rps, 2)}×**`],
  ])));
  out.push('');
  const low = runs.reduce((a, b) => (a.iterations <= b.iterations ? a : b));
  const high = runs.reduce((a, b) => (a.iterations >= b.iterations ? a : b));
  if (low !== high) {
    out.push(`One identity's burst ran at ${fmt(high.same.rps / high.distinct.rps, 2)}× the distinct ones' rate at ${high.iterations} iterations and at ${fmt(low.same.rps / low.distinct.rps, 2)}× at ${low.iterations} (${fmt(high.same.rps, 0)} → ${fmt(low.same.rps, 0)} /s from one identity). The lock covers CREATE ROLE, including the PBKDF2 PostgreSQL runs on the verifier, so the iteration count sets part of what one identity waits for. Taking the lock after CREATE ROLE instead, with VALID UNTIL computed in SQL from the transaction's \`now()\` as the INSERT computes \`expires_at\`, would leave it only the INSERT and COMMIT without adding a round trip; it is not done (see "What would move the misses").`);
    out.push('');
  }
  return out;
}
