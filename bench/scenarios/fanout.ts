import type { BrokerChild } from '../lib/broker.js';
import { httpLoad, TokenPool, type LoadRun } from '../lib/load.js';
import { log } from '../lib/log.js';
import { dropIssuedRoles } from '../lib/population.js';
import type { Results } from '../lib/results.js';
import { combine, strip } from '../lib/runs.js';
import { QUICK, SETTINGS } from '../lib/settings.js';
import { signTokens } from '../lib/tokens.js';
import type { BenchContext } from './context.js';

type Fanout = NonNullable<Results['fanout']>[number];

/**
 * The bursts the issue describes come from one identity: every pod of a Deployment carries its
 * service account's `sub`, every job of a GitHub workflow run on a branch the same
 * `repo:…:ref:…`. Issuances of one identity queue on its advisory lock (the quota check and the
 * lease INSERT must see each other), and each waiting request holds a pool connection meanwhile.
 * So the same burst — every request sent at once, one connection each — is timed from distinct
 * identities and from a single one, in turn.
 */
export async function runFanout(ctx: BenchContext, broker: BrokerChild, iterations: number): Promise<Fanout> {
  const size = QUICK ? 40 : 200;
  const rounds = QUICK ? 1 : SETTINGS.repeats;
  const one = new TokenPool(await signTokens(ctx.issuer, ['bench:fanout:one']));
  const burst = async (tokens: TokenPool) => {
    await dropIssuedRoles(ctx.pgs, 'runs');
    return httpLoad({ url: broker.url, path: '/credentials', body: '{}', connections: size, amount: size, tokens, expect: 201 });
  };
  const distinct: LoadRun[] = [];
  const same: LoadRun[] = [];
  // Warm-up: the first burst of this many connections pays for their setup on both sides.
  await burst(ctx.tokens);
  for (let r = 0; r < rounds; r++) {
    distinct.push(await burst(ctx.tokens));
    same.push(await burst(one));
  }
  await dropIssuedRoles(ctx.pgs, 'runs');
  const d = combine(distinct);
  const s = combine(same);
  log(`fan-out of ${size}: distinct identities ${d.rps.toFixed(0)}/s p99 ${d.latency.p99.toFixed(1)} ms; one identity ${s.rps.toFixed(0)}/s p99 ${s.latency.p99.toFixed(1)} ms (errors ${d.errors} / ${s.errors})`);
  return {
    size, rounds, iterations,
    distinct: strip(d), same: strip(s),
    burstSeconds: { distinct: distinct.map((x) => x.seconds), same: same.map((x) => x.seconds) },
  };
}
