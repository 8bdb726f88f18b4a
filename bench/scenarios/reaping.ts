import type { TestPostgres } from '../../test/helpers/postgres.js';
import type { BrokerChild } from '../lib/broker.js';
import { httpLoad, type TokenPool } from '../lib/load.js';
import { log } from '../lib/log.js';
import { createPopulation, dropIssuedRoles, type PopulationOptions } from '../lib/population.js';
import type { Results } from '../lib/results.js';
import { strip } from '../lib/runs.js';
import { QUICK, SETTINGS } from '../lib/settings.js';
import { summarize } from '../lib/stats.js';

/**
 * P4: an expired backlog of leases with their roles, drained by the broker's reaper while an
 * open-loop issuance load runs against the same broker; issuance latency idle vs while reaping.
 */
export async function runReaping(pgs: TestPostgres, broker: BrokerChild, tokens: TokenPool, backlogOptions: PopulationOptions): Promise<NonNullable<Results['reaping']>> {
  const backlog = SETTINGS.backlog;
  await dropIssuedRoles(pgs, 'all');
  log(`reaping: creating ${backlog} expired leases with their roles (as superuser)`);
  const createSeconds = await createPopulation(pgs, backlog, backlogOptions);
  // Issuance capacity with the backlog present (role DDL slows with the number of live roles),
  // then an open-loop load at 30 % of it: latency then shows interference, not queueing.
  const connections = 4;
  const probe = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, amount: QUICK ? 20 : 60, tokens, expect: 201 });
  const rate = Math.max(QUICK ? 20 : 2, Math.round(probe.rps * 0.3));
  log(`reaping: capacity with the backlog ≈ ${probe.rps.toFixed(0)}/s; idle issuance at ${rate}/s for ${SETTINGS.idleSeconds} s`);
  const idle = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, seconds: SETTINGS.idleSeconds, tokens, rate, expect: 201 });

  log(`reaping: draining the backlog under the same issuance load (at most ${SETTINGS.reapCapSeconds} s)`);
  let reapDone!: () => void;
  const done = new Promise<void>((r) => {
    reapDone = r;
  });
  const loadPromise = httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, seconds: SETTINGS.reapCapSeconds + 60, tokens, rate, expect: 201, until: done });
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
  log(`reaping: the same issuance load for ${SETTINGS.idleSeconds} s with the backlog gone`);
  const afterIdle = await httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections, seconds: SETTINGS.idleSeconds, tokens, rate, expect: 201 });
  const third = (reapEnd - reapStart) / 3;
  const began = ([at, ms]: [number, number]) => at - ms;
  const early = summarize(inWindow.filter((l) => began(l) < reapStart + third).map(([, ms]) => ms));
  const late = summarize(inWindow.filter((l) => began(l) >= reapEnd - third).map(([, ms]) => ms));
  const duringSummary = summarize(inWindow.map(([, ms]) => ms));
  const rolesPerSecond = reap.ended / (reap.ms / 1000);
  log(`reaping: ${reap.ended} ended in ${reap.ms.toFixed(0)} ms (${rolesPerSecond.toFixed(0)}/s), ${left} roles left; issuance p99 idle ${idle.latency.p99.toFixed(1)} ms before, ${afterIdle.latency.p99.toFixed(1)} ms after; during ${duringSummary.p99.toFixed(1)} ms (first third ${early.p99.toFixed(1)}, last third ${late.p99.toFixed(1)})`);
  await dropIssuedRoles(pgs, 'all');
  return {
    backlog, createSeconds, ended: reap.ended, failed: reap.failed, runs: reap.runs, seconds: reap.ms / 1000, rolesPerSecond, rolesLeft: left,
    capSeconds: SETTINGS.reapCapSeconds, probeRps: probe.rps, rate, connections, idle: strip(idle), during: { ...strip(during), latency: duringSummary, ok: inWindow.length },
    idleAfter: strip(afterIdle), early, late,
  };
}
