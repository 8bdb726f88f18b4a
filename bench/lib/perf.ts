/**
 * An on-CPU profile of the broker from Linux perf (`perf record -e cpu-clock -g`): unlike V8's
 * sampler, cpu-clock only fires while a thread is on a core, and it sees every thread (libuv's
 * pool, V8's GC and compiler helpers) and the kernel. The broker runs with --perf-basic-prof so
 * perf can name JIT-compiled JavaScript.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';

export interface PerfCategory {
  /** 'main' is the event loop's thread; 'helper' every other thread of the process. */
  thread: 'main' | 'helper';
  name: string;
  samples: number;
  share: number;
}

export interface PerfSummary {
  samples: number;
  categories: PerfCategory[];
}

/** perf's own version line, or why it cannot profile here (not installed, not permitted). */
export function perfProblem(env: NodeJS.ProcessEnv = process.env): string | null {
  const version = spawnSync('perf', ['--version'], { encoding: 'utf8', env });
  if (version.error || version.status !== 0) return `perf is not installed (${version.error?.message ?? version.stderr.trim()})`;
  const probe = spawnSync('perf', ['stat', '-e', 'cpu-clock', '--', 'true'], { encoding: 'utf8', env });
  if (probe.status !== 0) return `perf may not sample here: ${probe.stderr.trim().split('\n')[0]}`;
  return null;
}

export class PerfRecording {
  private constructor(private readonly child: ChildProcess, private readonly stderr: string[]) {}

  static async start(pid: number, file: string, hz = 999): Promise<PerfRecording> {
    const stderr: string[] = [];
    const child = spawn('perf', ['record', '-e', 'cpu-clock', '-F', String(hz), '-g', '-o', file, '-p', String(pid)], { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr!.on('data', (c: Buffer) => stderr.push(c.toString()));
    // perf prints nothing when it has attached; give it a moment, and fail early if it exited.
    await new Promise((resolve) => setTimeout(resolve, 300));
    if (child.exitCode !== null) throw new Error(`perf record exited with ${child.exitCode}: ${stderr.join('').trim()}`);
    return new PerfRecording(child, stderr);
  }

  async stop(): Promise<void> {
    const exited = once(this.child, 'exit');
    this.child.kill('SIGINT');
    const [code] = (await exited) as [number | null];
    if (code !== 0 && code !== null) throw new Error(`perf record exited with ${code}: ${this.stderr.join('').trim()}`);
  }
}

/** `perf script` of a recording: one block per sample, the header line then frames leaf first. */
export function perfScript(file: string): string {
  const out = spawnSync('perf', ['script', '-i', file, '-F', 'pid,tid,ip,sym'], { encoding: 'utf8', maxBuffer: 1 << 30 });
  if (out.status !== 0) throw new Error(`perf script failed: ${out.stderr.trim()}`);
  return out.stdout;
}

const PACKAGE_GROUPS: Array<[string, RegExp]> = [
  ['pg client', /^(pg|pg-protocol|pg-pool|pg-types|postgres-date|postgres-array|postgres-bytea|postgres-interval|pg-connection-string|pgpass|split2)$/],
  ['JWT (@fastify/jwt, fast-jwt)', /^(@fastify\/jwt|fast-jwt|mnemonist|lru-cache|asn1\.js|obliterator|jwk-to-pem|steed)$/],
  ['logging (pino)', /^(pino|sonic-boom|@pinojs\/.*|quick-format-unescaped|fast-redact|atomic-sleep|on-exit-leak-free|thread-stream|pino-std-serializers|fast-safe-stringify)$/],
  ['metrics (prom-client)', /^(prom-client|tdigest|bintrees)$/],
  ['Fastify (routing, hooks, validation, serialisation)', /^(fastify|@fastify\/.*|find-my-way|avvio|light-my-request|fast-json-stringify|fastfall|ajv|ajv-formats|@sinclair\/typebox|toad-cache|fast-querystring|secure-json-parse|process-warning|abstract-logging|rfdc|fast-uri|fast-decode-uri-component|ret|safe-regex2|json-schema-ref-resolver|reusify|fastq|@fastify\/error)$/],
];

const GC = /Scavenge|MarkCompact|Marking|Sweeper|Heap::|GCTracer|Evacuat|MinorMS|ConcurrentMark/;
// V8's own parser only: node::Parser is the HTTP parser.
const JIT = /v8::internal::(compiler::|Compiler::|maglev::|Maglev|OptimizedCompilationJob|Parser::|PreParser::|interpreter::BytecodeGenerator)/;
const PBKDF2 = /pbkdf2|PBKDF2|sha256|SHA256|hmac|HMAC|node::crypto/;

function packageOf(path: string): string | null {
  const at = path.lastIndexOf('/node_modules/');
  if (at < 0) return null;
  const rest = path.slice(at + '/node_modules/'.length).split('/');
  return rest[0].startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0];
}

/** Where one sample of the main thread goes, by its innermost frame that says something. */
function mainCategory(frames: string[], brokerPath: RegExp): string {
  for (const frame of frames) {
    if (frame.startsWith('JS:')) {
      const path = /\s(\S+?):\d+:\d+$/.exec(frame)?.[1] ?? '';
      // Node's own streams and timers: charge the sample to whoever called them.
      if (path.startsWith('node:') || path === '') continue;
      const pkg = packageOf(path);
      if (pkg) return PACKAGE_GROUPS.find(([, re]) => re.test(pkg))?.[0] ?? `other packages (${pkg})`;
      if (brokerPath.test(path)) return 'broker code (src/)';
      return 'other JavaScript';
    }
    if (GC.test(frame)) return 'GC on the main thread';
    if (JIT.test(frame)) return 'JIT compiler on the main thread';
  }
  if (frames.some((f) => f.includes('llhttp'))) return 'HTTP parsing (llhttp)';
  if (frames.some((f) => f.includes('JS:'))) return 'Node internals (streams, timers, microtasks)';
  return 'event loop: libuv, socket syscalls, kernel';
}

function helperCategory(frames: string[]): string {
  const all = frames.join('\n');
  if (PBKDF2.test(all)) return 'verifier PBKDF2 (libuv pool)';
  if (JIT.test(all)) return 'JIT compiler threads';
  if (GC.test(all)) return 'GC helper threads';
  return 'other threads (scheduling, wake-ups)';
}

/** Shares of the process's on-CPU samples by thread and category, largest first. */
export function summarizePerf(script: string, brokerPath: RegExp): PerfSummary {
  const counts = new Map<string, { thread: 'main' | 'helper'; name: string; samples: number }>();
  let samples = 0;
  for (const block of script.split(/\n\s*\n/)) {
    const lines = block.split('\n').filter((l) => l.trim());
    if (lines.length === 0) continue;
    const ids = /^\s*(\d+)\/(\d+)/.exec(lines[0]);
    if (!ids) continue;
    // Frame lines are "<hex address> <symbol>"; the symbol may contain spaces.
    const frames = lines.slice(1).map((l) => l.trim().replace(/^[0-9a-f]+\s+/, ''));
    const thread = ids[1] === ids[2] ? 'main' : 'helper';
    const name = thread === 'main' ? mainCategory(frames, brokerPath) : helperCategory(frames);
    const key = `${thread}\u0000${name}`;
    const entry = counts.get(key) ?? { thread, name, samples: 0 };
    entry.samples++;
    counts.set(key, entry);
    samples++;
  }
  const categories = [...counts.values()].map((c) => ({ ...c, share: samples ? c.samples / samples : 0 })).sort((a, b) => b.samples - a.samples);
  return { samples, categories };
}
