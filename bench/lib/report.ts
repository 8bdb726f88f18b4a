import type { LoadRun } from './load.js';
import type { ProfileSummary } from './profile.js';
import { fmt, type Summary } from './stats.js';

export type Run = Omit<LoadRun, 'timeline'>;

/** CPU milliseconds per successful operation, by process. */
export interface CpuPerOp {
  broker: number;
  pg: number;
  client: number;
}

export interface IssuanceLevel {
  connections: number;
  floor: Run;
  broker: Run;
  floorCpu: CpuPerOp;
  brokerCpu: CpuPerOp;
  ratio: number;
  maxRssMb: number;
}

export interface LeaseShape {
  name: string;
  query: Record<string, unknown>;
  owner: string | null;
  latency: Summary;
  plans: Array<{ page: string; plan: string; indexUsed: boolean }>;
}

export interface Results {
  meta: {
    date: string;
    command: string;
    quick: boolean;
    node: string;
    postgres: string;
    cpus: number;
    cpuModel: string;
    memoryGb: number;
    kernel: string;
    packages: Record<string, string>;
    postgresSettings: Record<string, string>;
    logStatement: string;
    settings: Record<string, unknown>;
    durationSeconds: number;
  };
  issuance: Array<{ iterations: number; levels: IssuanceLevel[] }>;
  reaping?: {
    backlog: number;
    createSeconds: number;
    ended: number;
    failed: number;
    runs: number;
    seconds: number;
    rolesPerSecond: number;
    rolesLeft: number;
    capSeconds: number;
    probeRps: number;
    rate: number;
    connections: number;
    idle: Run;
    during: Run;
  };
  population?: Array<{ live: number; createSeconds: number; iterations: number; connections: number; floor: Run; broker: Run; floorCpu: CpuPerOp; brokerCpu: CpuPerOp; ratio: number }>;
  ddl?: Array<{ server: number; live: number; createAsToday: number; createViaGranter: number; createViaGranterNoBrokerGrant?: number; alterNologin: number; dropAsBroker: number; dropAsBrokerNoBrokerGrant?: number; dropAsSuperuser: number }>;
  leases?: { rows: number; loadSeconds: number; requests: number; failures: number; latency: Summary; shapes: LeaseShape[] };
  jwt?: Array<{ alg: string; connections: number; run: Run; cpu: CpuPerOp }>;
  memory?: { maxRssMbAt64: number; perRun: number[]; usage?: Array<{ rss: number; heapTotal: number; heapUsed: number; external: number; arrayBuffers: number }> };
  startup?: { runsMs: number[]; medianMs: number; idleRssMb?: number; bundled?: { runsMs: number[]; medianMs: number; idleRssMb: number } };
  profile?: ProfileSummary & { scenario: string; file: string; requests: number };
  errors: Record<string, string>;
}

export interface Target {
  id: string;
  measure: string;
  target: string;
  measured: string;
  value: number;
  pass: boolean | null;
  miss?: string;
}

function level(r: Results, iterations: 'default' | 'tuned', connections: number): IssuanceLevel | undefined {
  const set = iterations === 'default' ? r.issuance[0] : r.issuance[1];
  return set?.levels.find((l) => l.connections === connections);
}

const pct = (x: number) => `${(x * 100).toFixed(0)} %`;

export function targets(r: Results): Target[] {
  const out: Target[] = [];
  const d16 = level(r, 'default', 16);
  const t16 = level(r, 'tuned', 16);
  const d1 = level(r, 'default', 1);
  const push = (t: Omit<Target, 'pass'> & { ok: boolean | null }) => out.push({ ...t, pass: t.ok });

  const p1 = d16 ? d16.ratio : Number.NaN;
  push({
    id: 'P1', measure: `issuance throughput at 16 clients vs floor (${r.issuance[0]?.iterations ?? '?'} iterations)`, target: '≥ 0.9×',
    measured: d16 ? `${fmt(p1, 2)}× (${fmt(d16.broker.rps, 0)} vs ${fmt(d16.floor.rps, 0)} /s)` : 'not measured', value: p1,
    ok: d16 ? p1 >= 0.9 : null, miss: d16 && p1 < 0.9 ? `${pct(0.9 - p1)} of floor short` : undefined,
  });
  const p2 = d1 ? d1.broker.latency.p50 - d1.floor.latency.p50 : Number.NaN;
  push({
    id: 'P2', measure: 'median latency overhead over the floor at 1 client (default iterations)', target: '≤ 2 ms',
    measured: d1 ? `${fmt(p2, 2)} ms (${fmt(d1.broker.latency.p50, 2)} vs ${fmt(d1.floor.latency.p50, 2)} ms)` : 'not measured', value: p2,
    ok: d1 ? p2 <= 2 : null, miss: d1 && p2 > 2 ? `${fmt(p2 - 2, 2)} ms over` : undefined,
  });
  const p3 = d16 && t16 ? t16.broker.rps / d16.broker.rps : Number.NaN;
  push({
    id: 'P3', measure: `issuance throughput, tuned (${r.issuance[1]?.iterations ?? '?'}) vs default (${r.issuance[0]?.iterations ?? '?'}) iterations, 16 clients`, target: '≥ 5×',
    measured: d16 && t16 ? `${fmt(p3, 1)}× (${fmt(t16.broker.rps, 0)} vs ${fmt(d16.broker.rps, 0)} /s)` : 'not measured', value: p3,
    ok: d16 && t16 ? p3 >= 5 : null, miss: d16 && t16 && p3 < 5 ? `${fmt(5 - p3, 1)}× short` : undefined,
  });
  const p1b = t16 ? t16.ratio : Number.NaN;
  push({
    id: 'P1b', measure: 'issuance throughput at 16 clients vs floor, both tuned', target: '≥ 0.5×',
    measured: t16 ? `${fmt(p1b, 2)}× (${fmt(t16.broker.rps, 0)} vs ${fmt(t16.floor.rps, 0)} /s)` : 'not measured', value: p1b,
    ok: t16 ? p1b >= 0.5 : null, miss: t16 && p1b < 0.5 ? `${pct(0.5 - p1b)} of floor short` : undefined,
  });
  const rp = r.reaping;
  const p99Ratio = rp ? rp.during.latency.p99 / rp.idle.latency.p99 : Number.NaN;
  const p4ok = rp ? rp.rolesPerSecond >= 200 && p99Ratio <= 1.5 && rp.rolesLeft === 0 : null;
  push({
    id: 'P4', measure: `reaping a ${rp?.backlog ?? '10k'} backlog: roles dropped/s; issuance p99 while reaping vs idle`, target: '≥ 200 roles/s, p99 ≤ 1.5× idle',
    measured: rp ? `${fmt(rp.rolesPerSecond, 0)} roles/s; p99 ${fmt(rp.during.latency.p99, 1)} vs ${fmt(rp.idle.latency.p99, 1)} ms idle = ${fmt(p99Ratio, 2)}×` : 'not measured',
    value: rp ? rp.rolesPerSecond : Number.NaN, ok: p4ok,
    miss: rp && !p4ok ? [rp.rolesPerSecond < 200 ? `${fmt(200 - rp.rolesPerSecond, 0)} roles/s short` : '', p99Ratio > 1.5 ? `p99 ${fmt(p99Ratio, 2)}× idle (${fmt(p99Ratio - 1.5, 2)}× over)` : '', rp.rolesLeft ? `${rp.rolesLeft} roles left` : ''].filter(Boolean).join('; ') : undefined,
  });
  const ls = r.leases;
  const allIndexed = ls ? ls.shapes.every((s) => s.plans.every((p) => p.indexUsed)) : false;
  push({
    id: 'P5', measure: `GET /leases p95 at ${ls ? ls.rows.toLocaleString('en-US') : '1M'} rows (filters + cursor)`, target: '≤ 10 ms, index used',
    measured: ls ? `p95 ${fmt(ls.latency.p95, 2)} ms (p50 ${fmt(ls.latency.p50, 2)} ms); index used in ${ls.shapes.reduce((n, s) => n + s.plans.filter((p) => p.indexUsed).length, 0)}/${ls.shapes.reduce((n, s) => n + s.plans.length, 0)} plans` : 'not measured',
    value: ls ? ls.latency.p95 : Number.NaN, ok: ls ? ls.latency.p95 <= 10 && allIndexed && ls.failures === 0 : null,
    miss: ls && ls.latency.p95 > 10 ? `${fmt(ls.latency.p95 - 10, 2)} ms over` : ls && !allIndexed ? 'a plan does not use an index' : undefined,
  });
  const mem = r.memory;
  push({
    id: 'P6', measure: 'broker RSS at 64 concurrent issuers (max sampled)', target: '≤ 150 MB',
    measured: mem ? `${fmt(mem.maxRssMbAt64, 0)} MB` : 'not measured', value: mem ? mem.maxRssMbAt64 : Number.NaN,
    ok: mem ? mem.maxRssMbAt64 <= 150 : null, miss: mem && mem.maxRssMbAt64 > 150 ? `${fmt(mem.maxRssMbAt64 - 150, 0)} MB over` : undefined,
  });
  const st = r.startup;
  push({
    id: 'P7', measure: 'start to ready against a running PostgreSQL (`node bin/pg-broker.js serve` → /readyz 200, median)', target: '≤ 1.5 s',
    measured: st ? `${fmt(st.medianMs / 1000, 2)} s (runs: ${st.runsMs.map((m) => fmt(m / 1000, 2)).join(', ')} s)` : 'not measured',
    value: st ? st.medianMs / 1000 : Number.NaN, ok: st ? st.medianMs <= 1500 : null, miss: st && st.medianMs > 1500 ? `${fmt((st.medianMs - 1500) / 1000, 2)} s over` : undefined,
  });
  return out;
}

function table(head: string[], rows: string[][]): string {
  return [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

function verdict(t: Target): string {
  return t.pass === null ? 'NOT MEASURED' : t.pass ? 'PASS' : 'MISS';
}

function cpuCell(c: CpuPerOp): string {
  return `${fmt(c.broker, 2)} / ${fmt(c.pg, 2)} / ${fmt(c.client, 2)}`;
}

/** The throughput ceiling CPU time allows: cores × 1000 ms ÷ CPU ms per operation. */
function ceiling(c: CpuPerOp, cpus: number): number {
  const total = (Number.isFinite(c.broker) ? c.broker : 0) + c.pg + c.client;
  return (cpus * 1000) / total;
}

export function writeReport(r: Results, baseline?: Results, baselineName?: string): string {
  const ts = targets(r);
  const out: string[] = [];
  const m = r.meta;
  out.push('# Benchmark report: pg-credential-broker');
  out.push('');
  out.push(`Written by \`bench/run.ts\`${m.quick ? ' in **quick mode (BENCH_QUICK=1): tiny durations and counts, numbers are not meaningful**' : ''}. Absolute numbers drift from run to run on a shared machine; the ratios to the floor, measured in the same run one right after the other, are what hold.`);
  out.push('');
  out.push('## Environment');
  out.push('');
  out.push(table(['item', 'value'], [
    ['date', m.date],
    ['command', `\`${m.command}\``],
    ['duration', `${fmt(m.durationSeconds, 0)} s`],
    ['Node.js', m.node],
    ['PostgreSQL', m.postgres],
    ['CPUs', `${m.cpus} × ${m.cpuModel}`],
    ['memory', `${fmt(m.memoryGb, 1)} GB`],
    ['kernel', m.kernel],
    ...Object.entries(m.packages).map(([k, v]) => [k, v]),
    ...Object.entries(m.postgresSettings).map(([k, v]) => [`pg: ${k}`, v]),
  ]));
  out.push('');
  out.push(`- PostgreSQL is the test helper's embedded server (test/helpers/postgres.ts), with **fsync=off, synchronous_commit=off and full_page_writes=off**: commits cost no disk flush here, for the floor and the broker alike, so both numbers are CPU-bound upper bounds a durable server will not reach. Statement logging: ${m.logStatement}.`);
  out.push('- The broker runs in its own process (bench/broker-process.ts → `startBroker` from src/server.ts, configured from the environment like `pg-broker serve`), on 127.0.0.1, with LOG_LEVEL=info written to /dev/null, its default pool, the reaper schedule pushed to 1 h (the reaper is driven explicitly for P4) and the rate limits raised out of the way. Both sides connect as the non-superuser `broker` role (CREATEROLE), as in production.');
  out.push('- The load generator (autocannon, and the floor\'s pg clients) runs in the bench process on the same 2 cores as the broker and PostgreSQL.');
  out.push('');

  out.push('## Targets');
  out.push('');
  out.push(table(['id', 'measure', 'target', 'measured', 'result'], ts.map((t) => [t.id, t.measure, t.target, t.measured, `**${verdict(t)}**${t.miss ? ` (${t.miss})` : ''}`])));
  out.push('');
  if (Object.keys(r.errors).length) {
    out.push('**Scenarios that failed to run:**');
    out.push('');
    for (const [name, err] of Object.entries(r.errors)) out.push(`- ${name}: \`${err.split('\n')[0]}\``);
    out.push('');
  }

  out.push('## Issuance: POST /credentials vs the floor');
  out.push('');
  out.push('**What each side includes.** Both generate a 256-bit password and compute its SCRAM-SHA-256 verifier per credential with the same iteration count (`scramVerifierAsync`: PBKDF2 on libuv\'s thread pool, inline at ≤ 256 iterations; not precomputed), then run the same SQL as the non-superuser `broker` role in one transaction: `pg_advisory_xact_lock(hashtextextended(issuer‖subject‖policy))`, the lease INSERT with its audit event in a CTE (`insertLeaseWithinQuota`), and `CREATE ROLE … LOGIN PASSWORD \'<verifier>\' VALID UNTIL … CONNECTION LIMIT … IN ROLE <grant>, <marker> ROLE broker; COMMENT ON ROLE …` (`createRoleSql`), then COMMIT. PostgreSQL re-runs the verifier\'s PBKDF2 once in CREATE ROLE on both sides.');
  out.push('');
  out.push('- **Floor**: one plain `pg` connection per concurrent client, no pool, in three round trips — `BEGIN; SELECT pg_advisory_xact_lock(…)` as one simple query, the parameterised INSERT, then `CREATE ROLE …; COMMENT …; COMMIT` as one simple query. Latency is measured from the verifier computation to COMMIT.');
  out.push('- **Broker**: autocannon sends `POST /credentials` over HTTP/1.1 keep-alive connections; every request carries the next token from a pool of pre-signed RS256 JWTs with distinct `sub` claims (so no two in-flight requests share an identity and the policy\'s `max_active_leases` of 100,000 never trips). On top of the floor the broker does: HTTP parsing and Fastify routing/validation/serialisation, JWT verification (signature + claims, key from the cached JWKS), the policy lookup (one more round trip, before the transaction) and evaluation, the pool checkout, metrics and three JSON log lines; its transaction goes in the same three round trips as the floor\'s (`withBatchedTransaction`). Latency is autocannon\'s per-request response time (float ms from its `response` event).');
  const s0 = m.settings as { burst?: number; repeats?: number; warmup?: number };
  out.push(`- **Bursts from a controlled role population.** On PostgreSQL 16+ each role statement the (non-superuser) broker runs costs time proportional to the number of live issued roles (see "Live issued roles" below), so a duration-bound run would mostly measure how many roles earlier runs left behind. Every measurement is therefore a burst of ${s0.burst} credentials — the size of the "200 pods restart at once" case — starting with no issued roles; each level runs ${s0.repeats} such bursts per side, alternating floor and broker (floor first) so drift on the shared machine does not land on one side, issued roles dropped (as superuser) before each burst${s0.warmup ? `, after a ${s0.warmup}-credential warm-up per side` : ''}. Throughput = credentials ÷ summed burst time.`);
  out.push('- CPU columns are milliseconds of CPU per issuance (from /proc): broker process / all PostgreSQL processes / bench process (autocannon or the floor\'s pg clients). With 2 cores, 2000 ÷ their sum is the throughput ceiling.');
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
  }

  out.push('## Live issued roles: why every role statement slows down on PostgreSQL 16+');
  out.push('');
  if (r.population) {
    out.push('Since PostgreSQL 16 a CREATEROLE role that is not superuser automatically holds ADMIN OPTION on every role it creates, and PostgreSQL checks a grant (`IN ROLE`, `ROLE broker`), an `ALTER ROLE` or a `DROP ROLE` by listing *all* roles the acting role is a member of (`roles_is_member_of`), a list it must rebuild after every change to pg_authid/pg_auth_members. The broker\'s list contains every live issued role, so each of these statements costs time proportional to the number of live leases — for the floor and the broker alike. On PostgreSQL 15 (CREATEROLE bypasses those checks) the same statements stay flat.');
    out.push('');
    const ps = m.settings as { populationBurst?: number };
    out.push(`Here a background population of live issued roles (created as superuser, each granted to the broker WITH ADMIN OPTION like a broker-created role) is in place before one burst of ${ps.populationBurst} credentials per side, ${r.population[0]?.connections} clients, BROKER_SCRAM_ITERATIONS=${r.population[0]?.iterations}:`);
    out.push('');
    out.push(table(['live issued roles', 'floor req/s', 'floor PostgreSQL CPU ms/op', 'broker req/s', 'broker p50 ms', 'broker p99 ms', 'broker PostgreSQL CPU ms/op', 'ratio broker/floor'],
      r.population.map((p) => [p.live.toLocaleString('en-US'), fmt(p.floor.rps, 0), fmt(p.floorCpu.pg, 2), fmt(p.broker.rps, 0), fmt(p.broker.latency.p50, 2), fmt(p.broker.latency.p99, 2), fmt(p.brokerCpu.pg, 2), fmt(p.ratio, 2)])));
  } else out.push('Not measured (see failed scenarios).');
  out.push('');
  if (r.ddl) {
    out.push('Per-statement cost at such populations (milliseconds per statement, one session, no other load), today\'s statements beside two candidate fixes for issuance:');
    out.push('');
    out.push('- **(a)** the same CREATE ROLE … ROLE broker, but the two IN ROLE grants made after `SET LOCAL ROLE` to a NOLOGIN "granter" role that holds ADMIN OPTION on the group and marker roles and never creates roles, so PostgreSQL checks *its* short membership list for them instead of the broker\'s;');
    out.push('- **(b)** (a) without `ROLE broker`, measured after switching the background population to the state such a deployment would be in: on 16+ the broker keeps only the implicit ADMIN grant PostgreSQL gives a role\'s creator (no INHERIT, no SET — enough for ALTER/DROP ROLE), on 15 no membership at all. Teardown would then need pg_signal_backend to terminate sessions and a membership granted at teardown time for DROP/REASSIGN OWNED.');
    out.push('- The reaper\'s ALTER ROLE … NOLOGIN and DROP ROLE run as the broker, whose ADMIN rights they need; as superuser DROP ROLE skips the walk.');
    out.push('');
    out.push(table(['PostgreSQL', 'live issued roles', 'CREATE ROLE today ms', '(a) ms', '(b) ms', 'ALTER ROLE NOLOGIN (broker) ms', 'DROP ROLE (broker) ms', 'DROP ROLE (broker), state (b) ms', 'DROP ROLE (superuser) ms'],
      r.ddl.map((d) => [String(d.server), d.live.toLocaleString('en-US'), fmt(d.createAsToday, 2), fmt(d.createViaGranter, 2), fmt(d.createViaGranterNoBrokerGrant, 2), fmt(d.alterNologin, 2), fmt(d.dropAsBroker, 2), fmt(d.dropAsBrokerNoBrokerGrant, 2), fmt(d.dropAsSuperuser, 3)])));
    out.push('');
  }

  out.push('## Reaping (P4)');
  out.push('');
  if (r.reaping) {
    const rp = r.reaping;
    out.push(`${rp.backlog.toLocaleString('en-US')} active leases with their roles were created directly in SQL (${fmt(rp.createSeconds, 1)} s; as superuser, each role granted to the broker WITH ADMIN OPTION exactly as a broker-created one — created by the broker itself this would take quadratic time, see above), then expired all at once (\`UPDATE … SET expires_at = now() - 1 minute\`). \`Reaper.reap()\` (the production code path, leadership included, in the broker process, default BROKER_SCRAM_ITERATIONS) was then called until a run found nothing due or ${rp.capSeconds} s had passed, while an open-loop issuance load of ${rp.rate} req/s over ${rp.connections} connections ran against the same broker (30 % of the ${fmt(rp.probeRps, 0)} req/s a short closed-loop probe reached with the backlog present). "Idle" is the same load for ${fmt(rp.idle.seconds, 0)} s before, backlog present but not being reaped. Latencies are raw response times (no coordinated-omission correction).`);
    out.push('');
    out.push(table(['measure', 'value'], [
      ['leases ended / failed', `${rp.ended} / ${rp.failed} in ${rp.runs} reap() runs`],
      ['time to drain', `${fmt(rp.seconds, 2)} s`],
      ['roles dropped per second', `**${fmt(rp.rolesPerSecond, 0)}**`],
      ['backlog roles left afterwards', `${rp.rolesLeft}${rp.rolesLeft ? ` (stopped at the ${rp.capSeconds} s cap; draining the rest at this rate would take ≈ ${fmt(rp.rolesLeft / rp.rolesPerSecond, 0)} s more)` : ''}`],
      ['issuance idle: p50 / p99 (n)', `${fmt(rp.idle.latency.p50, 2)} / ${fmt(rp.idle.latency.p99, 2)} ms (${rp.idle.latency.n})`],
      ['issuance while reaping: p50 / p99 (n)', `${fmt(rp.during.latency.p50, 2)} / ${fmt(rp.during.latency.p99, 2)} ms (${rp.during.latency.n})`],
      ['p99 while reaping ÷ idle', `**${fmt(rp.during.latency.p99 / rp.idle.latency.p99, 2)}×**`],
      ['issuance errors idle / while reaping', `${rp.idle.errors} / ${rp.during.errors}`],
    ]));
  } else out.push('Not measured (see failed scenarios).');
  out.push('');

  out.push('## GET /leases over a large table (P5)');
  out.push('');
  if (r.leases) {
    const ls = r.leases;
    out.push(`${ls.rows.toLocaleString('en-US')} rows in broker.leases (bulk \`INSERT … SELECT generate_series\`, indexes rebuilt from the migration's own definitions, then VACUUM ANALYZE; ${fmt(ls.loadSeconds, 1)} s). One keep-alive connection, one request at a time, each shape walking up to its page count through \`next_cursor\`; an admin token except for the owner shape. ${ls.requests} timed requests, ${ls.failures} failures. Latency is client-side, through HTTP and JWT verification.`);
    out.push('');
    out.push(table(['shape', 'query', 'n', 'p50 ms', 'p95 ms', 'p99 ms', 'index used (first page / cursor page)'],
      [
        ...ls.shapes.map((s) => [s.name, `\`${new URLSearchParams(Object.entries(s.query).map(([k, v]) => [k, String(v)])).toString()}\`${s.owner ? ` as ${s.owner}` : ''}`, String(s.latency.n), fmt(s.latency.p50, 2), fmt(s.latency.p95, 2), fmt(s.latency.p99, 2), s.plans.map((p) => (p.indexUsed ? 'yes' : '**no**')).join(' / ')]),
        ['**all**', '', String(ls.latency.n), `**${fmt(ls.latency.p50, 2)}**`, `**${fmt(ls.latency.p95, 2)}**`, fmt(ls.latency.p99, 2), ''],
      ]));
    out.push('');
    out.push('<details><summary>Query plans (EXPLAIN ANALYZE of the exact SQL listLeases sends, as the broker role)</summary>');
    out.push('');
    for (const s of ls.shapes) {
      for (const p of s.plans) {
        out.push(`**${s.name}, ${p.page} page**`);
        out.push('');
        out.push('```');
        out.push(p.plan);
        out.push('```');
        out.push('');
      }
    }
    out.push('</details>');
  } else out.push('Not measured (see failed scenarios).');
  out.push('');

  out.push('## JWT verification: RS256 vs ES256 through the full request path');
  out.push('');
  if (r.jwt) {
    out.push('`POST /policies/evaluate` (verifies the token, reads the issuer\'s enabled policies, evaluates them) with distinct pre-signed tokens, 16 connections. CPU is the broker process\'s milliseconds per request.');
    out.push('');
    out.push(table(['alg', 'req/s', 'p50 ms', 'p99 ms', 'errors', 'broker CPU ms/req', 'PostgreSQL CPU ms/req'], r.jwt.map((j) => [j.alg, fmt(j.run.rps, 0), fmt(j.run.latency.p50, 2), fmt(j.run.latency.p99, 2), String(j.run.errors), fmt(j.cpu.broker, 3), fmt(j.cpu.pg, 3)])));
  } else out.push('Not measured (see failed scenarios).');
  out.push('');

  out.push('## Memory (P6) and start-up (P7)');
  out.push('');
  if (r.memory) {
    out.push(`- Broker RSS sampled every 100 ms from /proc during the 64-client issuance runs: max ${r.memory.perRun.map((v) => `${fmt(v, 0)} MB`).join(' (default) and ')} (tuned).`);
    const mb = (b: number) => fmt(b / 1024 ** 2, 0);
    for (const [i, u] of (r.memory.usage ?? []).entries()) {
      out.push(`  - \`process.memoryUsage()\` right after the 64-client runs (${i === 0 ? 'default' : 'tuned'}): rss ${mb(u.rss)} MB = V8 heap ${mb(u.heapTotal)} MB (${mb(u.heapUsed)} MB used) + external ${mb(u.external)} MB (array buffers ${mb(u.arrayBuffers)} MB) + the rest (code, stacks, the tsx loader thread's isolate, native allocations).`);
    }
  }
  if (r.startup) {
    out.push(`- Start to ready: \`node bin/pg-broker.js serve\` spawned with the broker's environment against the running, already-migrated PostgreSQL, timed until \`GET /readyz\` first answers 200 (polled every 5 ms): ${r.startup.runsMs.map((v) => `${fmt(v, 0)} ms`).join(', ')}; median ${fmt(r.startup.medianMs, 0)} ms${r.startup.idleRssMb ? `, idle RSS ${fmt(r.startup.idleRssMb, 0)} MB` : ''}. This includes Node start-up and tsx loading the TypeScript sources (bin/pg-broker.js registers tsx), the migration check, building the app and the first SELECT 1.`);
    if (r.startup.bundled) out.push(`- For comparison (not a target): the same CLI bundled to plain JavaScript by esbuild, started the same way: ${r.startup.bundled.runsMs.map((v) => `${fmt(v, 0)} ms`).join(', ')}; median ${fmt(r.startup.bundled.medianMs, 0)} ms, idle RSS ${fmt(r.startup.bundled.idleRssMb, 0)} MB.`);
  }
  out.push('');

  if (r.profile) {
    const p = r.profile;
    out.push('## Where the broker\'s CPU goes');
    out.push('');
    out.push(`V8 CPU profile of the broker process (node:inspector, 200 µs sampling) during ${p.scenario}; ${fmt(p.totalMs, 0)} ms sampled${p.requests ? `, ${fmt(p.totalMs / p.requests, 3)} ms of wall-clock samples per request (idle included)` : ''}. Full profile: \`${p.file}\` (open in Chrome DevTools or speedscope).`);
    out.push('');
    out.push(table(['package / layer', 'self ms', 'share'], p.byPackage.map((row) => [row.name, fmt(row.ms, 0), pct(row.share)])));
    out.push('');
    out.push(table(['function', 'self ms', 'share'], p.byFunction.slice(0, 15).map((row) => [`\`${row.name}\``, fmt(row.ms, 0), pct(row.share)])));
    out.push('');
  }

  out.push('## Misses: by how much, and what is in the way');
  out.push('');
  const missed = ts.filter((t) => t.pass === false);
  if (missed.length === 0) out.push('No target missed in this run.');
  for (const t of missed) out.push(`- **${t.id}** ${t.miss ?? ''}: ${explain(t, r)}`);
  out.push('');

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

  if (baseline) {
    out.push(`## Before and after the optimisations (before: \`${baselineName}\`, ${baseline.meta.date})`);
    out.push('');
    const bt = targets(baseline);
    out.push(table(['id', 'before', 'after'], ts.map((t) => [t.id, `${bt.find((b) => b.id === t.id)?.measured ?? '—'} ${(() => { const b = bt.find((x) => x.id === t.id); return b ? `(${verdict(b)})` : ''; })()}`, `${t.measured} (${verdict(t)})`])));
    out.push('');
    const rows: string[][] = [];
    for (const [i, set] of r.issuance.entries()) {
      const before = baseline.issuance[i];
      for (const l of set.levels) {
        const b = before?.levels.find((x) => x.connections === l.connections);
        rows.push([String(set.iterations), String(l.connections), b ? `${fmt(b.broker.rps, 0)} /s, p50 ${fmt(b.broker.latency.p50, 2)} ms, ${fmt(b.ratio, 2)}×, ${fmt(b.brokerCpu.broker, 2)} ms CPU` : '—', `${fmt(l.broker.rps, 0)} /s, p50 ${fmt(l.broker.latency.p50, 2)} ms, ${fmt(l.ratio, 2)}×, ${fmt(l.brokerCpu.broker, 2)} ms CPU`]);
      }
    }
    out.push(table(['iterations', 'clients', 'broker before (rate, p50, ratio to floor, broker CPU/op)', 'broker after'], rows));
    out.push('');
  }
  return out.join('\n') + '\n';
}

/** The broker profile as shares of its busy (non-idle) time. */
function busyProfile(r: Results): string {
  const p = r.profile;
  if (!p) return '';
  const busy = p.byPackage.filter((x) => x.name !== '(idle)');
  const busyMs = p.totalMs - (p.byPackage.find((x) => x.name === '(idle)')?.ms ?? 0);
  if (busyMs <= 0) return '';
  const share = (ms: number) => `${((ms / busyMs) * 100).toFixed(0)} %`;
  const fns = p.byFunction.filter((x) => x.name !== '(idle)').slice(0, 5);
  const fnName = (name: string) => name.replace(/ \S+:\d+$/, '');
  return `Of the broker's busy time in the profile (tuned, 16 clients, ${fmt(busyMs / Math.max(1, p.requests), 2)} ms per request): ${busy.slice(0, 6).map((x) => `${x.name} ${share(x.ms)}`).join(', ')}; top functions ${fns.map((x) => `\`${fnName(x.name)}\` ${share(x.ms)}`).join(', ')} — \`writev\`/\`writeBuffer\` are socket writes (one per round trip to PostgreSQL and per HTTP response), \`writeString\` the log lines.`;
}

/** A data-driven explanation of a miss, from the CPU breakdown and the profile. */
function explain(t: Target, r: Results): string {
  const cpus = r.meta.cpus;
  const lvl = (i: number, c: number) => r.issuance[i]?.levels.find((l) => l.connections === c);
  switch (t.id) {
    case 'P1':
    case 'P1b': {
      const l = lvl(t.id === 'P1' ? 0 : 1, 16);
      if (!l) return 'not measured';
      const extra = l.brokerCpu.broker + l.brokerCpu.pg + l.brokerCpu.client - (l.floorCpu.pg + l.floorCpu.client);
      return `the run is CPU-bound on ${cpus} cores shared by the load generator, the broker and PostgreSQL. Per issuance the floor costs ${fmt(l.floorCpu.pg, 2)} ms of PostgreSQL CPU + ${fmt(l.floorCpu.client, 2)} ms in its client (ceiling ≈ ${fmt(ceiling(l.floorCpu, cpus), 0)}/s); the broker path costs ${fmt(l.brokerCpu.broker, 2)} ms in the broker process + ${fmt(l.brokerCpu.pg, 2)} ms in PostgreSQL + ${fmt(l.brokerCpu.client, 2)} ms in autocannon (ceiling ≈ ${fmt(ceiling(l.brokerCpu, cpus), 0)}/s), i.e. ${fmt(extra, 2)} ms more CPU per credential. ${busyProfile(r)} On a machine where the broker has its own cores, only the PostgreSQL column competes with the floor.`;
    }
    case 'P2': {
      const l = lvl(0, 1);
      return l ? `broker p50 ${fmt(l.broker.latency.p50, 2)} ms vs floor ${fmt(l.floor.latency.p50, 2)} ms; broker CPU per request ${fmt(l.brokerCpu.broker, 2)} ms (HTTP, JWT, policy lookup, pool, extra round trips).` : 'not measured';
    }
    case 'P3': {
      const d = lvl(0, 16);
      const tu = lvl(1, 16);
      if (!d || !tu) return 'not measured';
      const floorGain = tu.floor.rps / d.floor.rps;
      const ddl = r.ddl?.[0];
      return `the floor itself only gains ${fmt(floorGain, 1)}× (${fmt(d.floor.rps, 0)} → ${fmt(tu.floor.rps, 0)} /s), so no broker change can reach 5× here. Dropping PBKDF2 from 4096 iterations to 1 saves about ${fmt(d.floorCpu.pg - tu.floorCpu.pg, 2)} ms of PostgreSQL CPU and ${fmt(d.floorCpu.client - tu.floorCpu.client, 2)} ms of client CPU per credential (PostgreSQL: ${fmt(d.floorCpu.pg, 2)} → ${fmt(tu.floorCpu.pg, 2)} ms), but on PostgreSQL 16+ what remains is dominated by CREATE ROLE's ADMIN membership walk, which grows with the number of live issued roles even within one ${(r.meta.settings as { burst?: number }).burst}-credential burst${ddl ? ` (${fmt(ddl.createAsToday, 2)} ms per CREATE ROLE with no background roles; see the "Live issued roles" tables)` : ''}. The 230/s → 3,250/s (14×) in PITFALLS was measured with pgbench on PostgreSQL 15, where CREATEROLE bypasses that walk. The broker's own ${fmt(tu.brokerCpu.broker, 2)} ms and autocannon's ${fmt(tu.brokerCpu.client, 2)} ms per credential also stay on the same ${cpus} cores.`;
    }
    case 'P4': {
      const rp = r.reaping;
      if (!rp) return 'not measured';
      const main = Math.max(...(r.ddl ?? []).map((d) => d.server));
      const big = r.ddl?.filter((d) => d.server === main).pop();
      const old = r.ddl?.filter((d) => d.server < 16).pop();
      const perRole = rp.rolesPerSecond > 0 ? 1000 / rp.rolesPerSecond : Number.NaN;
      return `the reaper ended ${rp.ended} of ${rp.backlog} leases in ${fmt(rp.seconds, 1)} s (${fmt(perRole, 1)} ms per role). Its SQL is batched already (one claim, one multi-statement ALTER ROLE … NOLOGIN, one pg_terminate_backend and one DROP ROLE per batch of claimed leases); the time is inside PostgreSQL: each ALTER ROLE and DROP ROLE by the non-superuser broker re-walks its membership list, which holds every live issued role (${rp.backlog.toLocaleString('en-US')} + the load's), so the cost per role is proportional to the backlog itself and draining it is quadratic${big ? ` — with ${big.live.toLocaleString('en-US')} live roles: ${fmt(big.alterNologin, 2)} ms per ALTER ROLE NOLOGIN and ${fmt(big.dropAsBroker, 2)} ms per DROP ROLE as the broker vs ${fmt(big.dropAsSuperuser, 3)} ms as superuser` : ''}${old ? ` (PostgreSQL ${old.server} with ${old.live.toLocaleString('en-US')} live roles, same statements: ${fmt(old.alterNologin, 3)} and ${fmt(old.dropAsBroker, 3)} ms)` : ''}. The same walk makes issuance with the backlog present slow (${fmt(rp.probeRps, 1)} req/s closed-loop), which is why the idle p99 is already ${fmt(rp.idle.latency.p99, 0)} ms. Things that would help, outside this bench's files: skip NOLOGIN for leases whose VALID UNTIL has passed (their logins already fail), the cheaper of the two walked statements per role; only a shorter membership list (fewer live roles per creating role, or a superuser-run reaper) changes the slope.`;
    }
    case 'P5':
      return r.leases ? `see the per-shape table: the slowest shape is ${[...r.leases.shapes].sort((a, b) => b.latency.p95 - a.latency.p95)[0]?.name}.` : 'not measured';
    case 'P6': {
      const u = r.memory?.usage?.[r.memory.usage.length - 1];
      const st = r.startup;
      const mb = (b: number) => fmt(b / 1024 ** 2, 0);
      return `${u ? `of ${mb(u.rss)} MB RSS right after the 64-client run, the V8 heap is ${mb(u.heapTotal)} MB (${mb(u.heapUsed)} MB live) and external memory ${mb(u.external)} MB; the rest is code, stacks, native allocations and the tsx loader — bin/pg-broker.js registers tsx, whose ESM hooks run in a second V8 isolate on a worker thread. ` : ''}${st?.bundled && st.idleRssMb ? `Idle, before any load, the broker started through tsx already takes ${fmt(st.idleRssMb, 0)} MB; the same code bundled to plain JavaScript (esbuild, measured in this run) takes ${fmt(st.bundled.idleRssMb, 0)} MB, i.e. ${fmt(st.idleRssMb - st.bundled.idleRssMb, 0)} MB less. ` : ''}Shipping compiled JavaScript (package.json / bin / Dockerfile, outside this bench's files), and if still needed a smaller young generation (--max-semi-space-size), is the way under 150 MB; the request path itself holds little (64 in-flight requests, a 10-connection pool).`;
    }
    case 'P7': {
      const st = r.startup;
      return `start-up is dominated by loading the TypeScript sources through tsx: a V8 CPU profile of \`node --cpu-prof bin/pg-broker.js serve\` puts ~45 % of it in node:internal module loading (every import resolved and transformed through tsx's hooks on a loader thread), then ajv/fast-json-stringify compiling route schemas; the migration check and the first SELECT 1 take a few ms. ${st?.bundled ? `Measured in this run, the same CLI bundled to plain JavaScript with esbuild reaches /readyz in ${fmt(st.bundled.medianMs / 1000, 2)} s (median) vs ${fmt(st.medianMs / 1000, 2)} s through tsx. ` : ''}Shipping compiled JavaScript (package.json / bin, outside this bench's files) is the fix.`;
    }
    default:
      return '';
  }
}
