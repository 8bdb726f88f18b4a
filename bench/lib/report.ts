import type { Results } from './results.js';
import { renderBaseline } from './report/baseline.js';
import { renderCpuProfile } from './report/cpu-profile.js';
import { renderFanout } from './report/fanout.js';
import { renderIssuance } from './report/issuance.js';
import { renderJwt } from './report/jwt.js';
import { renderLeases } from './report/leases.js';
import { renderMemoryAndStartup } from './report/memory-and-startup.js';
import { renderMisses } from './report/misses.js';
import { renderOverview } from './report/overview.js';
import { renderPopulation } from './report/population.js';
import { renderReaping } from './report/reaping.js';
import { renderRemedies } from './report/remedies.js';
import { targets } from './report/targets.js';

/**
 * bench/REPORT.md from a run's results: the sections in order, each rendered by its module under
 * bench/lib/report/. The result types and the targets are re-exported from here for callers.
 */

export type { CpuPerOp, IssuanceLevel, LeaseShape, Results, Run } from './results.js';
export { targets, type Target } from './report/targets.js';

export function writeReport(r: Results, baseline?: Results, baselineName?: string): string {
  const ts = targets(r);
  const out: string[] = [
    ...renderOverview(r, ts),
    ...renderIssuance(r),
    ...renderFanout(r),
    ...renderPopulation(r),
    ...renderReaping(r),
    ...renderLeases(r),
    ...renderJwt(r),
    ...renderMemoryAndStartup(r),
    ...renderCpuProfile(r),
    ...renderMisses(r, ts),
    ...renderRemedies(r),
    ...renderBaseline(r, ts, baseline, baselineName),
  ];
  return out.join('\n') + '\n';
}
