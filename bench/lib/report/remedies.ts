import type { Results } from '../results.js';
import { fmt } from '../stats.js';

/** What would move the misses: changes outside the bench's files, with the numbers behind them. */
export function renderRemedies(r: Results): string[] {
  const out: string[] = [];
  out.push('## What would move the misses (outside this bench\'s files)');
  out.push('');
  const main = Math.max(...(r.ddl ?? [{ server: 0 }]).map((d) => d.server));
  const big = r.ddl?.filter((d) => d.server === main).pop();
  if (big && big.createViaGranterNoBrokerGrant !== undefined) {
    out.push(`1. **Issue roles without walking the broker's membership list (PostgreSQL 16+).** With ${big.live.toLocaleString('en-US')} live issued roles a CREATE ROLE as written today costs ${fmt(big.createAsToday, 1)} ms; variant (b) above — IN ROLE grants made as a granter role, no \`ROLE broker\` — costs ${fmt(big.createViaGranterNoBrokerGrant, 1)} ms. It needs a granter role per deployment (the broker can create it and pass it ADMIN on each policy's group role, as it holds ADMIN itself), pg_signal_backend for terminating sessions, and a membership granted at teardown time for DROP/REASSIGN OWNED: src/postgres/roles.ts, src/leases/teardown.ts, the migration and the deployment notes together.`);
    out.push(`2. **Reaping stays proportional to the live roles** even then: DROP ROLE as the broker needs its ADMIN rights, and checking them walks the list (${fmt(big.dropAsBroker, 2)} ms per DROP ROLE at ${big.live.toLocaleString('en-US')} live roles, ${fmt(big.dropAsBrokerNoBrokerGrant, 2)} ms in state (b), ${fmt(big.dropAsSuperuser, 3)} ms as superuser). Skipping \`ALTER ROLE … NOLOGIN\` for leases whose VALID UNTIL has already passed (their logins fail anyway) removes the cheaper of the two walked statements per expired lease (ALTER ROLE re-walks the cached list, DROP ROLE also invalidates it, see the table).`);
  }
  if (r.startup?.bundled) out.push(`${big ? '3' : '1'}. **Ship compiled JavaScript** instead of loading TypeScript through tsx at run time: measured here, start to ready ${fmt(r.startup.medianMs / 1000, 2)} s → ${fmt(r.startup.bundled.medianMs / 1000, 2)} s and idle RSS ${fmt(r.startup.idleRssMb, 0)} MB → ${fmt(r.startup.bundled.idleRssMb, 0)} MB (P6, P7).`);
  out.push(`${big ? (r.startup?.bundled ? '4' : '3') : '2'}. **Fewer log writes per request.** Every issuance writes three JSON lines (Fastify's two request lines and "credential issued"), each a separate write through sonic-boom (\`writeString\` in the profile); one line per request, or a buffered destination, trims the broker's CPU per credential, which is what P1/P1b measure on a CPU-bound 2-core machine.`);
  out.push('');
  return out;
}
