import type { CpuPerOp, IssuanceLevel, Results } from '../results.js';
import { fmt } from '../stats.js';
import { pg15Targets } from './pg15.js';
import { reapingP99Ratio } from './reaping.js';
import type { Target } from './targets.js';

/** Misses: each missed target, by how much, and a data-driven explanation of what is in the way. */
export function renderMisses(r: Results, ts: Target[]): string[] {
  const out: string[] = [];
  out.push('## Misses: by how much, and what is in the way');
  out.push('');
  const missed = ts.filter((t) => t.pass === false);
  if (missed.length === 0) out.push('No target missed in this run.');
  for (const t of missed) out.push(`- **${t.id}** ${t.miss ?? ''}: ${explain(t, r)}`);
  // A pass closer to its threshold than runs vary could be a miss in the next run: what is in
  // its way is worth the same explanation.
  for (const t of ts.filter((x) => x.pass === true && x.note)) out.push(`- **${t.id}** passed, ${t.note}: ${explain(t, r)}`);
  out.push('');
  return out;
}

/** A data-driven explanation of a miss, from the CPU breakdown and the profile. */
function explain(t: Target, r: Results): string {
  const cpus = r.meta.cpus;
  const lvl = (i: number, c: number) => r.issuance[i]?.levels.find((l) => l.connections === c);
  switch (t.id) {
    case 'P1':
    case 'P1b': {
      const l = lvl(t.id === 'P1' ? 0 : 1, 16);
      const hi = lvl(t.id === 'P1' ? 0 : 1, 64);
      if (!l) return 'not measured';
      const b = l.brokerCpu;
      const f = l.floorCpu;
      const extra = b.broker + b.pg + b.client - (f.pg + f.client);
      const known = (v: number | undefined): v is number => v !== undefined && Number.isFinite(v);
      const idleText = known(b.idle) && known(f.idle)
        ? ` Both sides keep the cores busy (${fmt(b.idle * 100, 0)} % idle during the broker's bursts, ${fmt(f.idle * 100, 0)} % during the floor's), so throughput follows CPU per credential.`
        : '';
      const loopText = known(b.loopRun) && known(b.loopWait)
        ? ` Of the broker process's ${fmt(b.broker, 2)} ms, its event loop ran ${fmt(b.loopRun, 2)} ms (the rest is mostly the verifier's PBKDF2 on libuv's pool), and it waited ${fmt(b.loopWait, 2)} ms per credential for a core behind PostgreSQL's backends (/proc schedstat of its main thread), which shows in latency, not throughput.`
        : '';
      // P1's point is where the perf profile was taken; P1b's (tuned) is the V8 profile's.
      const profile = (t.id === 'P1' && perfProfileText(r)) || busyProfile(r);
      const on15 = pg15Targets(r);
      return `the load generator, the broker and PostgreSQL share ${cpus} cores.${idleText} Per issuance the floor costs ${fmt(f.pg, 2)} ms of PostgreSQL CPU + ${fmt(f.client, 2)} ms in its client (ceiling ≈ ${fmt(ceiling(f, cpus), 0)}/s); the broker path costs ${fmt(b.broker, 2)} ms in the broker process + ${fmt(b.pg, 2)} ms in PostgreSQL + ${fmt(b.client, 2)} ms in autocannon (ceiling ≈ ${fmt(ceiling(b, cpus), 0)}/s): ${fmt(extra, 2)} ms more CPU per credential, of which ${fmt(b.broker - f.client, 2)} ms is the broker's own work beyond the floor client's (HTTP parsing and the response, JWT verification, Fastify routing and serialisation, the policy check, metrics and log lines, around the same pg and PBKDF2 work), ${fmt(b.pg - f.pg, 2)} ms PostgreSQL's${b.pg > f.pg ? ' (it varies between runs; in a paired run of the floor\'s SQL alone at 16 clients and 4096 iterations, the broker\'s session settings statement_timeout and lock_timeout cost PostgreSQL 0.06 ms per credential: it arms and clears a timer for every statement. The policy SELECT that used to ride in the first round trip, 0.10 ms there, is gone: issuance keeps the policies between requests)' : ''}, and ${fmt(b.client, 2)} ms the HTTP load generator's, which the floor does not need. The two ceilings give ${fmt(ceiling(b, cpus) / ceiling(f, cpus), 2)}× against the measured ${fmt(l.ratio, 2)}×${hi ? `; with 64 clients the ratio is ${fmt(hi.ratio, 2)}×` : ''}.${loopText}${profile ? ` ${profile}` : ''} On a machine where the broker and the load generator have their own cores, only the PostgreSQL column competes with the floor.${on15 ? ` On PostgreSQL 15 in this run ("The same on PostgreSQL 15" above) it reads ${fmt(t.id === 'P1' ? on15.p1 : on15.p1b, 2)}×.` : ''}`;
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
      return `the floor itself gains ${fmt(floorGain, 1)}× (${fmt(d.floor.rps, 0)} → ${fmt(tu.floor.rps, 0)} /s), so no broker change can reach 5× here. Dropping PBKDF2 from 4096 iterations to 1 saves ${fmt(d.floorCpu.pg - tu.floorCpu.pg, 2)} ms of PostgreSQL CPU and ${fmt(d.floorCpu.client - tu.floorCpu.client, 2)} ms of client CPU per credential (PostgreSQL: ${fmt(d.floorCpu.pg, 2)} → ${fmt(tu.floorCpu.pg, 2)} ms): on this CPU (SHA extensions) 4096 iterations cost well under the ~7 ms PITFALLS measured, so they are a smaller share of the whole. What stays is the rest of a role's creation in PostgreSQL${ddl ? ` (${fmt(ddl.create, 2)} ms per CREATE ROLE transaction with no background roles)` : ''}, the lease and audit inserts, and the broker's own ${fmt(tu.brokerCpu.broker, 2)} ms and autocannon's ${fmt(tu.brokerCpu.client, 2)} ms per credential on the same ${cpus} cores. The 230/s → 3,250/s (14×) in PITFALLS was measured with pgbench on PostgreSQL 15, with a slower PBKDF2.${pg15Text(r, d)}`;
    }
    case 'P4': {
      const rp = r.reaping;
      if (!rp) return 'not measured';
      const main = Math.max(...(r.ddl ?? []).map((d) => d.server));
      const big = r.ddl?.filter((d) => d.server === main).pop();
      const perRole = rp.rolesPerSecond > 0 ? 1000 / rp.rolesPerSecond : Number.NaN;
      const latency = rp.early && rp.late && rp.idleAfter && reapingP99Ratio(rp) > 1.5
        ? ` Issuance latency: p50 ${fmt(rp.idle.latency.p50, 1)} ms idle with the backlog, ${fmt(rp.early.p50, 1)} ms in the drain's first third; ${fmt(rp.idleAfter.latency.p50, 1)} ms idle without it, ${fmt(rp.late.p50, 1)} ms in the last third. The teardown's work runs in PostgreSQL on the same ${cpus} cores as issuance, and the last third also still carries up to a third of the backlog, which by itself made issuance dearer (the two idle baselines differ ${fmt(rp.idle.latency.p99 / rp.idleAfter.latency.p99, 1)}× at p99), so that comparison overstates the reaper's share. A reaper that paused between batches would interfere less and drop fewer roles per second, the other half of this target.`
        : '';
      return `the reaper ended ${rp.ended} of ${rp.backlog * (rp.drains?.length ?? 1)} leases${rp.drains && rp.drains.length > 1 ? ` over ${rp.drains.length} drains of ${rp.backlog}` : ''} in ${fmt(rp.seconds, 1)} s (${fmt(perRole, 1)} ms per role). Its SQL is batched (one claim, which takes whole creator groups from the longest-due leases, so a batch of a large backlog holds a few creators' roles rather than all 64's; per creator per batch, through the creator's function, one multi-statement ALTER ROLE … NOLOGIN and one DROP ROLE, with a look-up of sessions and owned objects as the broker in between, and a GRANT + pg_terminate_backend only for roles that still have a session); the time is inside PostgreSQL, whose per-role checks still grow with the live roles each creator holds and with the members of the group and marker roles${big ? ` (with ${big.live.toLocaleString('en-US')} live roles: ${fmt(big.teardown, 2)} ms per role through teardownRoles vs ${fmt(big.dropAsSuperuser, 3)} ms for a superuser's bare DROP ROLE)` : ''}. After its claim and after each teardown statement in a batch of expired leases the reaper pauses twice as long as that took, leaving PostgreSQL to issuance about two thirds of the time, so its rate follows the machine's speed.${latency}`;
    }
    case 'P5':
      return r.leases ? `see the per-shape table: the slowest shape is ${[...r.leases.shapes].sort((a, b) => b.latency.p95 - a.latency.p95)[0]?.name}.` : 'not measured';
    case 'P6': {
      const u = r.memory?.usage?.[r.memory.usage.length - 1];
      const st = r.startup;
      const mb = (b: number) => fmt(b / 1024 ** 2, 0);
      if (r.meta.brokerRuntime === 'compiled') {
        return `${u ? `of ${mb(u.rss)} MB RSS right after the 64-client run, the V8 heap is ${mb(u.heapTotal)} MB (${mb(u.heapUsed)} MB live) and external memory ${mb(u.external)} MB; the rest is code, stacks and native allocations. ` : ''}The broker already runs compiled JavaScript on plain node${st?.tsx && st.idleRssMb ? ` (idle ${fmt(st.idleRssMb, 0)} MB, vs ${fmt(st.tsx.idleRssMb, 0)} MB through tsx in this run)` : ''}, with a 4 MB young generation and, in the image, a capped old generation (the sustained table shows what the cap holds back); what is left to try is a lower cap, which trades RSS for more frequent full collections, or fewer modules loaded at start. The request path itself holds little (64 in-flight requests, a 10-connection pool).`;
      }
      return `${u ? `of ${mb(u.rss)} MB RSS right after the 64-client run, the V8 heap is ${mb(u.heapTotal)} MB (${mb(u.heapUsed)} MB live) and external memory ${mb(u.external)} MB; the rest is code, stacks, native allocations and the tsx loader — bin/pg-broker.js registers tsx, whose ESM hooks run in a second V8 isolate on a worker thread. ` : ''}${st?.bundled && st.idleRssMb ? `Idle, before any load, the broker started through tsx already takes ${fmt(st.idleRssMb, 0)} MB; the same code bundled to plain JavaScript (esbuild, measured in this run) takes ${fmt(st.bundled.idleRssMb, 0)} MB, i.e. ${fmt(st.idleRssMb - st.bundled.idleRssMb, 0)} MB less. ` : ''}Shipping compiled JavaScript, and if still needed a smaller young generation (--max-semi-space-size), is the way under 150 MB; the request path itself holds little (64 in-flight requests, a 10-connection pool).`;
    }
    case 'P7': {
      const st = r.startup;
      if (st?.entry === 'compiled') {
        return `measured on the compiled CLI, which no longer loads TypeScript through tsx${st.tsx ? ` (${fmt(st.tsx.medianMs / 1000, 2)} s median through tsx in this run)` : ''}. What remains is Node start-up, loading the dependencies, ajv/fast-json-stringify compiling the route schemas and the migration check; \`node --cpu-prof dist/pg-broker.mjs serve\` shows their shares.`;
      }
      return `start-up is dominated by loading the TypeScript sources through tsx: a V8 CPU profile of \`node --cpu-prof bin/pg-broker.js serve\` puts ~45 % of it in node:internal module loading (every import resolved and transformed through tsx's hooks on a loader thread), then ajv/fast-json-stringify compiling route schemas; the migration check and the first SELECT 1 take a few ms. ${st?.bundled ? `Measured in this run, the same CLI bundled to plain JavaScript with esbuild reaches /readyz in ${fmt(st.bundled.medianMs / 1000, 2)} s (median) vs ${fmt(st.medianMs / 1000, 2)} s through tsx. ` : ''}Shipping compiled JavaScript is the fix.`;
    }
    default:
      return '';
  }
}

/** P3 on PostgreSQL 15, from the same run, beside the embedded server's figures. */
function pg15Text(r: Results, here: IssuanceLevel): string {
  const s = pg15Targets(r);
  if (!s) return '';
  return ` On that server in this run ("The same on PostgreSQL 15" above), 4096 iterations cost ${fmt(s.d.floorCpu.pg, 2)} ms of PostgreSQL CPU per credential against ${fmt(here.floorCpu.pg, 2)} ms here, the floor gains ${fmt(s.floorGain, 1)}× and the broker ${fmt(s.p3, 1)}× (${s.p3 >= 5 ? 'which meets' : 'short of'} the 5× target).`;
}

/** The perf (on-CPU) profile in one sentence: where the broker process's CPU per request goes. */
function perfProfileText(r: Results): string {
  const p = r.perfProfile;
  if (!p || 'unavailable' in p || p.samples === 0) return '';
  const ms = (share: number) => fmt(share * p.brokerMsPerRequest, 3);
  const part = (thread: 'main' | 'helper') => p.categories.filter((c) => c.thread === thread && c.share >= 0.005);
  const sum = (thread: 'main' | 'helper') => p.categories.filter((c) => c.thread === thread).reduce((a, c) => a + c.share, 0);
  return `On the CPU only (perf, a warmed-up broker at this point; "On the CPU only" below), the broker process used ${fmt(p.brokerMsPerRequest, 2)} ms per request: its event loop ${ms(sum('main'))} ms — ${part('main').map((c) => `${c.name} ${ms(c.share)}`).join(', ')} — and its other threads ${ms(sum('helper'))} ms — ${part('helper').map((c) => `${c.name} ${ms(c.share)}`).join(', ')}. The pg client's share and the PBKDF2 are work the floor's client does too; no single part of the rest is large enough to close the gap alone.`;
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
  const perRequest = busyMs / Math.max(1, p.requests);
  // The profile's scenario is tuned issuance at 16 clients: the same run's event-loop CPU time.
  const loopRun = r.issuance[1]?.levels.find((l) => l.connections === 16)?.brokerCpu.loopRun;
  const wallNote = loopRun !== undefined && Number.isFinite(loopRun) && loopRun < perRequest
    ? ` V8's sampler counts wall time: against those ${fmt(perRequest, 2)} ms, the main thread was on a core for ${fmt(loopRun, 2)} ms per request in the tuned 16-client bursts (schedstat), so part of each share is time it was runnable but off the core, charged to the call it was in (a socket write wakes the receiving process, which may then take the core).`
    : '';
  return `Of the broker's busy time in the profile (tuned, 16 clients, ${fmt(perRequest, 2)} ms per request): ${busy.slice(0, 6).map((x) => `${x.name} ${share(x.ms)}`).join(', ')}; top functions ${fns.map((x) => `\`${fnName(x.name)}\` ${share(x.ms)}`).join(', ')} — \`writev\`/\`writeBuffer\` are socket writes (one per round trip to PostgreSQL and per HTTP response), \`writeString\` the log lines.${wallNote}`;
}

/** The throughput ceiling CPU time allows: cores × 1000 ms ÷ CPU ms per operation. */
function ceiling(c: CpuPerOp, cpus: number): number {
  const total = (Number.isFinite(c.broker) ? c.broker : 0) + c.pg + c.client;
  return (cpus * 1000) / total;
}
