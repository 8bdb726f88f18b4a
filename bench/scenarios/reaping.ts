import type { TestPostgres } from '../../test/helpers/postgres.js';
import type { BrokerChild } from '../lib/broker.js';
import { httpLoad, type LoadRun, type TokenPool } from '../lib/load.js';
import { log } from '../lib/log.js';
import { createPopulation, dropIssuedRoles, type PopulationOptions } from '../lib/population.js';
import type { Results } from '../lib/results.js';
import { combine, strip } from '../lib/runs.js';
import { QUICK, SETTINGS } from '../lib/settings.js';
import { summarize } from '../lib/stats.js';

type Reaping = NonNullable<Results['reaping']>;
type Timed = [number, number];

/** One drain of the backlog, with its own idle loads before and after. */
interface Drain {
  createSeconds: number;
  ended: number;
  failed: number;
  runs: number;
  ms: number;
  left: number;
  idle: LoadRun;
  idleAfter: LoadRun;
  /** The issuance load over the whole run, and the requests in flight at some point while the reaper ran. */
  during: LoadRun;
  inWindow: Timed[];
  /** Latencies of the requests that began in the drain's first and last thirds. */
  early: number[];
  late: number[];
}

/**
 * P4: an expired backlog of leases with their roles, drained by the broker's reaper while an
 * open-loop issuance load runs against the same broker; issuance latency idle vs while reaping.
 * The drain is repeated (SETTINGS.reapDrains) and the latencies of all drains pooled: the p99 of
 * one drain's third rests on its ten slowest requests, and moved between 1.1× and 2.1× idle from
 * one run to the next with the same code.
 */
export async function runReaping(pgs: TestPostgres, broker: BrokerChild, tokens: TokenPool, backlogOptions: PopulationOptions): Promise<Reaping> {
  const backlog = SETTINGS.backlog;
  const connections = 4;
  const load = (o: { seconds: number; rate: number; until?: Promise<void> }) =>
    httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, tokens, expect: 201, ...o });

  const setUp = async () => {
    await dropIssuedRoles(pgs, 'all');
    log(`reaping: creating ${backlog} expired leases with their roles (as superuser)`);
    return createPopulation(pgs, backlog, backlogOptions);
  };
  const firstCreate = await setUp();
  // Issuance capacity with the backlog present (role DDL slows with the number of live roles),
  // then an open-loop load at 30 % of it: latency then shows interference, not queueing. Every
  // drain runs at this one rate, so their latencies pool.
  const probe = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount: QUICK ? 20 : 60, tokens, expect: 201 });
  const rate = Math.max(QUICK ? 20 : 2, Math.round(probe.rps * 0.3));
  log(`reaping: capacity with the backlog ≈ ${probe.rps.toFixed(0)}/s; issuance at ${rate}/s`);

  const drains: Drain[] = [];
  for (let i = 0; i < SETTINGS.reapDrains; i++) {
    const createSeconds = i === 0 ? firstCreate : await setUp();
    drains.push({ createSeconds, ...(await drainOnce(pgs, broker, load, rate, `${i + 1}/${SETTINGS.reapDrains}`)) });
  }
  await dropIssuedRoles(pgs, 'all');

  const idle = combine(drains.map((d) => d.idle));
  const idleAfter = combine(drains.map((d) => d.idleAfter));
  const inWindow = drains.flatMap((d) => d.inWindow);
  const ended = sum(drains.map((d) => d.ended));
  const seconds = sum(drains.map((d) => d.ms)) / 1000;
  return {
    backlog, createSeconds: sum(drains.map((d) => d.createSeconds)) / drains.length,
    ended, failed: sum(drains.map((d) => d.failed)), runs: sum(drains.map((d) => d.runs)), seconds, rolesPerSecond: ended / seconds,
    rolesLeft: sum(drains.map((d) => d.left)), capSeconds: SETTINGS.reapCapSeconds, probeRps: probe.rps, rate, connections,
    idle: strip(idle),
    during: { ...strip(combine(drains.map((d) => d.during))), latency: summarize(inWindow.map(([, ms]) => ms)), ok: inWindow.length },
    idleAfter: strip(idleAfter),
    early: summarize(drains.flatMap((d) => d.early)),
    late: summarize(drains.flatMap((d) => d.late)),
    drains: drains.map((d) => {
      const idleP99 = d.idle.latency.p99;
      const idleAfterP99 = d.idleAfter.latency.p99;
      const earlyP99 = summarize(d.early).p99;
      const lateP99 = summarize(d.late).p99;
      return {
        ended: d.ended, seconds: d.ms / 1000, rolesPerSecond: d.ended / (d.ms / 1000), rolesLeft: d.left,
        idleP99, earlyP99, idleAfterP99, lateP99, ratio: Math.max(earlyP99 / idleP99, lateP99 / idleAfterP99),
      };
    }),
  };
}

async function drainOnce(
  pgs: TestPostgres, broker: BrokerChild,
  load: (o: { seconds: number; rate: number; until?: Promise<void> }) => Promise<LoadRun>, rate: number, label: string,
): Promise<Omit<Drain, 'createSeconds'>> {
  log(`reaping ${label}: idle issuance at ${rate}/s for ${SETTINGS.idleSeconds} s, backlog present`);
  const idle = await load({ seconds: SETTINGS.idleSeconds, rate });

  log(`reaping ${label}: draining the backlog under the same issuance load (at most ${SETTINGS.reapCapSeconds} s)`);
  let reapDone!: () => void;
  const done = new Promise<void>((r) => {
    reapDone = r;
  });
  const loadPromise = load({ seconds: SETTINGS.reapCapSeconds + 60, rate, until: done });
  await new Promise((r) => setTimeout(r, 250));
  const reapStart = performance.now();
  let reap: { ended: number; failed: number; runs: number; ms: number };
  try {
    reap = await broker.request<{ ended: number; failed: number; runs: number; ms: number }>('reap', { maxMs: SETTINGS.reapCapSeconds * 1000 });
  } finally {
    reapDone();
  }
  const reapEnd = performance.now();
  const during = await loadPromise;
  // Every request in flight at some point while the reaper ran: it ended after the start and began before the end.
  const inWindow = during.timeline.filter(([at, ms]) => at >= reapStart && at - ms <= reapEnd);
  const [{ left }] = await pgs.query<{ left: number }>(`SELECT count(*)::int AS left FROM pg_roles WHERE rolname LIKE 'lease\\_bench\\_reap\\_%'`);
  // Issuance gets cheaper as the backlog shrinks, so the drain is also compared in thirds: its
  // first third (backlog still ≥ ~2/3) against the baseline with the whole backlog, its last third
  // against the same load once the backlog is gone.
  log(`reaping ${label}: the same issuance load for ${SETTINGS.idleSeconds} s with the backlog gone`);
  const idleAfter = await load({ seconds: SETTINGS.idleSeconds, rate });
  const third = (reapEnd - reapStart) / 3;
  const began = ([at, ms]: Timed) => at - ms;
  const early = inWindow.filter((l) => began(l) < reapStart + third).map(([, ms]) => ms);
  const late = inWindow.filter((l) => began(l) >= reapEnd - third).map(([, ms]) => ms);
  log(`reaping ${label}: ${reap.ended} ended in ${reap.ms.toFixed(0)} ms (${(reap.ended / (reap.ms / 1000)).toFixed(0)}/s), ${left} roles left; issuance p99 idle ${idle.latency.p99.toFixed(1)} ms before, ${idleAfter.latency.p99.toFixed(1)} ms after; first third ${summarize(early).p99.toFixed(1)}, last third ${summarize(late).p99.toFixed(1)}`);
  return { ...reap, left, idle, idleAfter, during, inWindow, early, late };
}

const sum = (xs: number[]) => xs.reduce((s, x) => s + x, 0);
