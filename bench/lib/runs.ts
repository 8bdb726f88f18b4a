import type { LoadRun } from './load.js';
import { summarize } from './stats.js';

/** Drops the per-request timeline before a run goes into the results. */
export function strip(run: LoadRun): Omit<LoadRun, 'timeline'> {
  const { timeline: _timeline, ...rest } = run;
  return rest;
}

/** Several bursts as one run: successes and time add up, latencies pool. */
export function combine(runs: LoadRun[]): LoadRun {
  const timeline = runs.flatMap((r) => r.timeline);
  const seconds = runs.reduce((t, r) => t + r.seconds, 0);
  const statusCounts: Record<string, number> = {};
  for (const r of runs) for (const [k, v] of Object.entries(r.statusCounts)) statusCounts[k] = (statusCounts[k] ?? 0) + v;
  return {
    ok: timeline.length,
    errors: runs.reduce((t, r) => t + r.errors, 0),
    statusCounts,
    seconds,
    rps: timeline.length / seconds,
    latency: summarize(timeline.map((l) => l[1])),
    timeline,
    firstError: runs.find((r) => r.firstError)?.firstError,
  };
}
