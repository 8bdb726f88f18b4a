import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { cpuCell, table } from './markdown.js';
import { renderPg15 } from './pg15.js';

/** Issuance: POST /credentials vs the floor, one table per BROKER_SCRAM_ITERATIONS setting. */
export function renderIssuance(r: Results): string[] {
  const out: string[] = [];
  const m = r.meta;
  out.push('## Issuance: POST /credentials vs the floor');
  out.push('');
  out.push('**What each side includes.** Both generate a 256-bit password and compute its SCRAM-SHA-256 verifier per credential with the same iteration count (`scramVerifierAsync`: PBKDF2 on libuv\'s thread pool, inline at ≤ 256 iterations; not precomputed), then run the same SQL as the non-superuser `broker` role in one transaction: `pg_advisory_xact_lock(hashtextextended(issuer‖subject))` (`lockIdentitySql`), the lease INSERT with its audit event in a CTE, checking the policies\' change token (`insertLeaseWithinQuota`), and `SELECT broker.<random creator role>($pgcb$CREATE ROLE … LOGIN PASSWORD \'<verifier>\' VALID UNTIL … CONNECTION LIMIT … IN ROLE <grant>, <marker>; COMMENT ON ROLE …$pgcb$)` (`createRoleSql`: the creator\'s SECURITY DEFINER function runs the statements as that creator, see src/postgres/creator-functions.ts), then COMMIT. PostgreSQL re-runs the verifier\'s PBKDF2 once in CREATE ROLE on both sides.');
  out.push('');
  out.push('- **Floor**: one plain `pg` connection per concurrent client, no pool, opened once and kept across bursts as the broker keeps its pooled ones (a fresh backend per burst starts with cold caches and plans the INSERT again; that had cost the floor 7–19 % here), in three round trips — `BEGIN ISOLATION LEVEL READ COMMITTED; SELECT pg_advisory_xact_lock(…)` as one simple query, the parameterised INSERT, then `CREATE ROLE …; COMMENT …; COMMIT` as one simple query. As in the broker, the verifier\'s PBKDF2 starts before the first round trip and is awaited for CREATE ROLE. Latency is measured from the start of the verifier computation to COMMIT. At 64 clients the floor runs 64 backends, the broker its pool of 10.');
  out.push('- **Broker**: autocannon sends `POST /credentials` over HTTP/1.1 keep-alive connections; every request carries the next token from a pool of pre-signed RS256 JWTs with distinct `sub` claims (so no two in-flight requests share an identity and the policy\'s `max_active_leases` of 100,000 never trips). On top of the floor the broker does: HTTP parsing and Fastify routing/validation/serialisation, JWT verification (signature + claims, key from the cached JWKS), the policy evaluation (on the issuer\'s policies as it last read them: the change-token check that keeps that safe is in the INSERT both sides run, and the policies are read again, riding in the first round trip, only after they changed), the pool checkout, metrics and one JSON log line; its transaction goes in the same three round trips as the floor\'s (`withBatchedTransaction`). Latency is autocannon\'s per-request response time (float ms from its `response` event).');
  const s0 = m.settings as { burst?: number; repeats?: number; targetRepeats?: number; warmup?: number };
  out.push(`- **Bursts from a controlled role population.** On PostgreSQL 16+ each role statement a non-superuser runs still costs more as live issued roles pile up (see "Live issued roles" below), so a duration-bound run would partly measure how many roles earlier runs left behind. Every measurement is therefore a burst of ${s0.burst} credentials — the size of the "200 pods restart at once" case — starting with no issued roles; each level runs ${s0.repeats} such bursts per side${s0.targetRepeats && s0.targetRepeats !== s0.repeats ? ` (${s0.targetRepeats} at 16 clients, where P1, P1b and P3 are read: one pair of 3-burst runs varied by up to ±5 % here)` : ''}, alternating floor and broker (floor first) so drift on the shared machine does not land on one side, issued roles dropped (as superuser) before each burst${s0.warmup ? `, after a ${s0.warmup}-credential warm-up per side` : ''}. Throughput = credentials ÷ summed burst time.`);
  const s1 = m.settings as { jitWarmup?: number };
  if (s1.jitWarmup) out.push(`- **Warm, as a broker that has been serving for a while.** Each freshly started broker first issues ${s1.jitWarmup} credentials at 16 clients (the floor as many before it, in this process), in chunks with the roles dropped after each: V8 keeps optimising a fresh broker's code for thousands of requests, on compiler threads that take their CPU from the same 2 cores (in a V8 code log of one broker here, TurboFan compilations ran at 35–60 per second in its first 8 s under load and at 1–2 per second after 20 s). The broker's CPU per request over the warm-up's chunks is given under each table.`);
  out.push('- CPU columns are milliseconds of CPU per issuance, from the scheduler\'s own accounting (/proc/<pid>/task/*/schedstat, summed over threads; the tick-sampled utime/stime of /proc/<pid>/stat lagged busy processes by whole bursts here): broker process / all PostgreSQL processes / bench process (autocannon or the floor\'s pg clients). The floor\'s figures leave out its logins (marks taken once its connections are open). With 2 cores, 2000 ÷ their sum is the throughput ceiling. "idle" is the share of both cores\' time that no process used during that side\'s bursts (/proc/stat idle + iowait), i.e. how far the side was from keeping the machine busy.');
  out.push('');
  for (const set of r.issuance) {
    out.push(`### BROKER_SCRAM_ITERATIONS=${set.iterations}${set.iterations === 4096 ? ' (default)' : ' (tuned)'}`);
    out.push('');
    out.push(table(
      ['clients', 'floor req/s', 'floor p50 ms', 'floor p99 ms', 'broker req/s', 'broker p50 ms', 'broker p99 ms', 'ratio broker/floor', 'broker errors', 'CPU ms/op floor (broker/pg/client)', 'CPU ms/op broker (broker/pg/client)', 'broker max RSS MB'],
      set.levels.map((l) => [
        String(l.connections), fmt(l.floor.rps, 0), fmt(l.floor.latency.p50, 2), fmt(l.floor.latency.p99, 2),
        fmt(l.broker.rps, 0), fmt(l.broker.latency.p50, 2), fmt(l.broker.latency.p99, 2), `**${fmt(l.ratio, 2)}**`,
        String(l.broker.errors + l.floor.errors), cpuCell(l.floorCpu), cpuCell(l.brokerCpu), fmt(l.maxRssMb, 0),
      ]),
    ));
    out.push('');
    if (set.warmup) {
      out.push(`JIT warm-up before these runs (${set.warmup.requests} credentials at ${set.warmup.connections} clients, in chunks of ${set.warmup.chunk}): broker CPU per request ${set.warmup.brokerMsPerRequest.map((ms) => fmt(ms, 2)).join(' → ')} ms.`);
      out.push('');
    }
  }
  out.push(...renderThreadpool(r));
  out.push(...renderPg15(r));
  return out;
}

/** The broker's runtime settings, one change at a time: libuv's pool size, the database pool size, V8's young generation. */
function renderThreadpool(r: Results): string[] {
  const runs = r.threadpool;
  if (!runs?.length) return [];
  const image = r.meta.brokerNodeOptions;
  const semi = runs.find((t) => t.nodeOptions);
  const out = [`### Runtime settings: ${semi ? 'libuv pool size, database pool size and young generation' : 'libuv pool size and database pool size'}`, ''];
  out.push('The broker computes each verifier\'s PBKDF2 on libuv\'s pool (UV_THREADPOOL_SIZE, 4 by default; the Docker image sets its own), and runs each issuance\'s transaction on one of BROKER_DB_POOL_SIZE connections (10 by default). Brokers at the default iteration count, with one setting changed at a time, one after the other (run side by side in one run, the two default-pool arms read 0.73–0.82 against 0.87–0.90 for the others, and 0.78–0.93 on their own over four later runs; a broker idle for 30 s closes its pooled connections, so its next burst pays for new logins and cold backends, which explains part of that; ten extra idle connections, by contrast, left the floor\'s throughput and PostgreSQL CPU unchanged): each started, warmed up as above, measured against the floor at 16 clients as above twice, and closed; the floor keeps the image\'s libuv pool size throughout. Ratios are per round.' +
    (semi ? ` The last row runs the broker with V8's default young generation (\`${semi.nodeOptions}\`) instead of the image's NODE_OPTIONS (\`${image ?? ''}\`): fewer young-generation collections for more memory, the trade the image makes the other way (see the README).` : ''));
  out.push('');
  const withCpu = runs.some((t) => t.brokerCpuMs !== undefined);
  out.push(table(
    ['UV_THREADPOOL_SIZE (broker)', 'BROKER_DB_POOL_SIZE', ...(semi ? ['NODE_OPTIONS (broker)'] : []), 'floor req/s', 'broker req/s', 'ratio broker/floor', ...(withCpu ? ['broker CPU ms/op', 'broker max RSS MB'] : [])],
    runs.map((t) => [
      t.size, String(t.dbPoolSize ?? 10), ...(semi ? [t.nodeOptions ? `\`${t.nodeOptions}\`` : 'the image\'s'] : []),
      fmt(t.floorRps, 0), fmt(t.brokerRps, 0), t.ratios.map((x) => fmt(x, 2)).join(', '),
      ...(withCpu ? [t.brokerCpuMs === undefined ? '' : fmt(t.brokerCpuMs, 2), t.maxRssMb === undefined ? '' : fmt(t.maxRssMb, 0)] : []),
    ]),
  ));
  out.push('');
  return out;
}
