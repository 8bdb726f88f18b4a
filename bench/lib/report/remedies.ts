import { CREATOR_COUNT } from '../../../src/postgres/creators.js';
import type { Results } from '../results.js';
import { fmt } from '../stats.js';

/** What would move the misses: changes outside the bench's files, with the numbers behind them. */
export function renderRemedies(r: Results): string[] {
  const out: string[] = [];
  out.push('## What would move the misses (outside this bench\'s files)');
  out.push('');
  let n = 0;
  const item = (text: string) => out.push(`${++n}. ${text}`);
  const main = Math.max(...(r.ddl ?? [{ server: 0 }]).map((d) => d.server));
  const big = r.ddl?.filter((d) => d.server === main).pop();
  if (big) {
    item(`**A superuser-run reaper, for very large live populations.** With ${big.live.toLocaleString('en-US')} live issued roles a CREATE ROLE transaction costs ${fmt(big.create, 1)} ms and a teardown ${fmt(big.teardown, 1)} ms per role, against ${fmt(big.dropAsSuperuser, 3)} ms for a superuser's DROP ROLE. What remains with ${CREATOR_COUNT} creators, acting through their functions rather than SET ROLE, is each creator's walk of its own share of the live roles and PostgreSQL's bookkeeping on the group and marker roles every issued role joins.`);
  }
  // Results from before the build step, where the compiled CLI was only a comparison.
  const shipCompiled = r.startup?.entry !== 'compiled' && r.startup?.bundled;
  if (shipCompiled) item(`**Ship compiled JavaScript** instead of loading TypeScript through tsx at run time: measured here, start to ready ${fmt(r.startup!.medianMs / 1000, 2)} s → ${fmt(shipCompiled.medianMs / 1000, 2)} s and idle RSS ${fmt(r.startup!.idleRssMb, 0)} MB → ${fmt(shipCompiled.idleRssMb, 0)} MB (P6, P7).`);
  const semi = youngGeneration(r);
  if (semi) item(semi);
  const fan = (r.fanout ?? []).reduce<NonNullable<Results['fanout']>[number] | undefined>((a, b) => (a && a.iterations >= b.iterations ? a : b), undefined);
  if (fan) {
    item(`**The identity lock after CREATE ROLE (bursts from one identity, not a target).** One identity's burst of ${fan.size} ran at ${fmt(fan.same.rps / fan.distinct.rps, 2)}× the rate of ${fan.size} distinct ones at ${fan.iterations} iterations ("Bursts from one identity"): the lock is held through CREATE ROLE. Sent first, in the round trip that opens the transaction, with its VALID UNTIL formatted in SQL from \`now()\` (the transaction's start, which the INSERT's \`expires_at\` uses too), CREATE ROLE would leave the lock only the INSERT and COMMIT, still in three round trips. Not done: a policy change seen by the INSERT, or a refusal re-decided on fresh policies, would then have to undo a role already created in the transaction (a savepoint), and PostgreSQL 15's path, which runs CREATE ROLE as the broker without a creator function, would need a DO block to build the statement.`);
  }
  item(`**Cores of its own for the broker (P1).** No single part of the broker's request path is large enough to close the gap alone (the P1 note and the perf profile). The last small candidate is done: an issuance now writes one JSON log line, the request line carrying the lease fields, instead of two; in a paired run (6 rounds of 600 credentials at 16 clients, 4096 iterations) the broker's CPU per credential read 1.16 ms with two lines and 1.20 ms with one, i.e. the saving is below this machine's run-to-run noise. Where the broker and the load generator have cores of their own, they take nothing from PostgreSQL's, and the throughput ratio is set by the PostgreSQL column alone.`);
  out.push('');
  return out;
}

/** The young-generation row of the runtime settings against the image's own, as a remedy, if both ran. */
function youngGeneration(r: Results): string | null {
  const runs = r.threadpool ?? [];
  const semi = runs.find((t) => t.nodeOptions);
  const image = runs.find((t) => !t.nodeOptions && t.size === semi?.size && (t.dbPoolSize ?? 10) === semi?.dbPoolSize);
  if (!semi || !image || semi.brokerCpuMs === undefined || image.brokerCpuMs === undefined) return null;
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  return `**A larger young generation, for memory (P1 against P6).** In "Runtime settings" above, \`${semi.nodeOptions}\` ran at ${fmt(mean(semi.ratios), 2)}× the floor with ${fmt(semi.brokerCpuMs, 2)} ms of broker CPU per credential and ${fmt(semi.maxRssMb ?? NaN, 0)} MB max RSS, against ${fmt(mean(image.ratios), 2)}×, ${fmt(image.brokerCpuMs, 2)} ms and ${fmt(image.maxRssMb ?? NaN, 0)} MB with the image's NODE_OPTIONS (one broker each, so within this machine's ±3 % noise per pair). In paired runs outside the bench (6 rounds each way, brokers swapped between runs) the larger young generation saved 0.062–0.074 ms of broker CPU per credential, and after tens of thousands of credentials at 64 clients its RSS sat at 137 MB against about 115 MB. The image keeps the smaller one; the README says when to change it.`;
}
