import type { Results } from '../results.js';
import { fmt } from '../stats.js';
import { table } from './markdown.js';
import { verdict, type Target } from './targets.js';

/** The report's opening: title, the environment it ran in, and the targets table with their verdicts. */
export function renderOverview(r: Results, ts: Target[]): string[] {
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
  out.push(`- PostgreSQL is the test helper's embedded server (test/helpers/postgres.ts), ${durability(m.postgresSettings)} Statement logging: ${m.logStatement}.`);
  const runtime = m.brokerRuntime === 'compiled' ? 'compiled to JavaScript by scripts/build.ts and run by plain node, without the tsx loader, as production runs dist/pg-broker.mjs' : 'TypeScript loaded through tsx';
  const imageVars = [m.brokerNodeOptions ? `NODE_OPTIONS=${m.brokerNodeOptions}` : '', m.threadpoolSize ? `UV_THREADPOOL_SIZE=${m.threadpoolSize}` : ''].filter(Boolean);
  const nodeOptions = imageVars.length ? ` with ${imageVars.join(' and ')} as the Docker image sets them` : '';
  out.push(`- The broker runs in its own process (bench/broker-process.ts → \`startBroker\` from src/server.ts, ${runtime}${nodeOptions}, configured from the environment like \`pg-broker serve\`), on 127.0.0.1, with LOG_LEVEL=info written to /dev/null, its default pool, the reaper schedule pushed to 1 h (the reaper is driven explicitly for P4) and the rate limits raised out of the way. Both sides connect as the non-superuser \`broker\` role (CREATEROLE), as in production.`);
  out.push(`- The load generator (autocannon, and the floor's pg clients) runs in the bench process on the same 2 cores as the broker and PostgreSQL${m.threadpoolSize ? `, with the same UV_THREADPOOL_SIZE=${m.threadpoolSize} as the broker, so the floor's PBKDF2 runs on a pool of the same size` : ''}.`);
  out.push('');

  out.push('## Targets');
  out.push('');
  out.push(table(['id', 'measure', 'target', 'measured', 'result'], ts.map((t) => [t.id, t.measure, t.target, t.measured, `**${verdict(t)}**${[t.miss, t.note].filter(Boolean).map((x) => ` (${x})`).join('')}`])));
  out.push('');
  if (Object.keys(r.errors).length) {
    out.push('**Scenarios that failed to run:**');
    out.push('');
    for (const [name, err] of Object.entries(r.errors)) out.push(`- ${name}: \`${err.split('\n')[0]}\``);
    out.push('');
  }
  return out;
}

/** What the server's own settings (read from it, not assumed) mean for commit cost. */
export function durability(settings: Record<string, string>): string {
  const off = ['fsync', 'synchronous_commit', 'full_page_writes'].filter((k) => settings[k] === 'off');
  if (off.length === 0) return 'with durable commits (fsync and synchronous_commit on).';
  const names = off.map((k) => `${k}=off`);
  const list = names.length > 1 ? `${names.slice(0, -1).join(', ')} and ${names[names.length - 1]}` : names[0];
  const flushFree = settings.fsync === 'off' || settings.synchronous_commit === 'off';
  return `with **${list}**${flushFree ? ': commits wait for no disk flush here, for the floor and the broker alike, so both numbers are CPU-bound upper bounds a durable server will not reach.' : '.'}`;
}
