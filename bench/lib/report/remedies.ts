import type { Results } from '../results.js';
import { fmt } from '../stats.js';

/** What would move the misses: changes outside the bench's files, with the numbers behind them. */
export function renderRemedies(r: Results): string[] {
  const out: string[] = [];
  out.push('## What would move the misses (outside this bench\'s files)');
  out.push('');
  const main = Math.max(...(r.ddl ?? [{ server: 0 }]).map((d) => d.server));
  const big = r.ddl?.filter((d) => d.server === main).pop();
  if (big) {
    out.push(`1. **More creator roles, or a superuser-run reaper, for very large live populations.** With ${big.live.toLocaleString('en-US')} live issued roles a CREATE ROLE transaction costs ${fmt(big.create, 1)} ms and a teardown ${fmt(big.teardown, 1)} ms per role, against ${fmt(big.dropAsSuperuser, 3)} ms for a superuser's DROP ROLE. Beyond 16 creators the walk stops being the main cost (measured with 64 and 256: no gain at 1,000–10,000 live roles); what remains is PostgreSQL's bookkeeping on the group and marker roles every issued role joins.`);
  }
  // Results from before the build step, where the compiled CLI was only a comparison.
  const shipCompiled = r.startup?.entry !== 'compiled' && r.startup?.bundled;
  if (shipCompiled) out.push(`${big ? '2' : '1'}. **Ship compiled JavaScript** instead of loading TypeScript through tsx at run time: measured here, start to ready ${fmt(r.startup!.medianMs / 1000, 2)} s → ${fmt(shipCompiled.medianMs / 1000, 2)} s and idle RSS ${fmt(r.startup!.idleRssMb, 0)} MB → ${fmt(shipCompiled.idleRssMb, 0)} MB (P6, P7).`);
  out.push(`${big ? (shipCompiled ? '3' : '2') : shipCompiled ? '2' : '1'}. **Fewer log writes per request.** Every issuance writes two JSON lines (the request line and "credential issued"), each a separate write through sonic-boom (\`writeString\` in the profile); folding the lease fields into the request line, or a buffered destination, trims the broker's CPU per credential, which is what P1/P1b measure on a CPU-bound 2-core machine. Measured by hand here, turning both lines off (LOG_LEVEL=warn) saved 0.03–0.07 ms of broker CPU per credential at 1 iteration, 1–2 % of the broker path's CPU: folding them would move P1 by about 1 %. The rest of the gap is the broker's request handling and the load generator sharing 2 cores with PostgreSQL (the P1 note); where the broker runs on cores of its own, it takes nothing from PostgreSQL's.`);
  out.push('');
  return out;
}
