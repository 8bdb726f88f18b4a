import assert from 'node:assert/strict';
import { test } from 'node:test';
import { spawnSync } from 'node:child_process';
import { perfProblem, summarizePerf } from '../../bench/lib/perf.js';

// Blocks as `perf script -F pid,tid,ip,sym` prints them: "pid/tid", then frames, innermost first.
const sample = (pid: number, tid: number, ...frames: string[]) => `${pid}/${tid} \n${frames.map((f, i) => `\t    ${(0x1000 + i).toString(16)} ${f}`).join('\n')}\n`;
const BROKER = /pgcb-bench-build-[^/]+\/broker\//;

test('perf samples are charged to the thread and the innermost telling frame', () => {
  const script = [
    // Node's stream code and a kernel write are charged to pg, which called them.
    sample(7, 7, 'tcp_sendmsg', 'JS:*writeGeneric node:internal/stream_base_commons:148:22', 'JS:*_send /app/node_modules/pg/lib/connection.js:171:8', 'uv_run'),
    sample(7, 7, 'Builtins_LoadIC', 'JS:*issueCredential file:///tmp/pgcb-bench-build-x1/broker/broker-process.mjs:1457:31'),
    // @fastify/jwt is JWT work, not Fastify's.
    sample(7, 7, 'JS:*verify /app/node_modules/@fastify/jwt/index.js:594:23', 'JS:*handle /app/node_modules/fastify/lib/route.js:1:1'),
    sample(7, 7, 'JS:*route /app/node_modules/find-my-way/index.js:1:1'),
    sample(7, 7, 'v8::internal::ScavengerCollector::CollectGarbage', 'JS:*parse /app/node_modules/pg-protocol/dist/parser.js:26:10'),
    // node::Parser is the HTTP parser, not V8's.
    sample(7, 7, 'llhttp__internal_execute', 'node::(anonymous namespace)::Parser::OnStreamRead', 'uv__read'),
    sample(7, 7, 'ep_poll', 'epoll_wait', 'uv__io_poll'),
    sample(7, 8, 'sha256_block_data_order', 'node::crypto::PBKDF2Traits::DeriveBits'),
    sample(7, 9, 'v8::internal::compiler::GraphReducer::ReduceTop', 'v8::internal::OptimizedCompilationJob::ExecuteJob'),
    sample(7, 9, 'v8::internal::ConcurrentMarking::RunMajor'),
  ].join('\n');
  const summary = summarizePerf(script, BROKER);
  assert.equal(summary.samples, 10);
  const got = Object.fromEntries(summary.categories.map((c) => [`${c.thread}: ${c.name}`, c.samples]));
  assert.deepEqual(got, {
    'main: pg client': 1,
    'main: broker code (src/)': 1,
    'main: JWT (@fastify/jwt, fast-jwt)': 1,
    'main: Fastify (routing, hooks, validation, serialisation)': 1,
    // GC inside pg's parser is GC: the innermost telling frame wins.
    'main: GC on the main thread': 1,
    'main: HTTP parsing (llhttp)': 1,
    'main: event loop: libuv, socket syscalls, kernel': 1,
    'helper: verifier PBKDF2 (libuv pool)': 1,
    'helper: JIT compiler threads': 1,
    'helper: GC helper threads': 1,
  });
  assert.ok(Math.abs(summary.categories.reduce((a, c) => a + c.share, 0) - 1) < 1e-12);
});

test('an empty recording summarises to nothing rather than dividing by zero', () => {
  assert.deepEqual(summarizePerf('', BROKER), { samples: 0, categories: [] });
});

test('without perf on the PATH the bench says so instead of failing', () => {
  assert.match(perfProblem({ PATH: '/nonexistent' }) ?? '', /^perf is not installed/);
  // Where perf is installed and may sample (this machine), the same check lets it run.
  const sampling = spawnSync('perf', ['stat', '-e', 'cpu-clock', '--', 'true']).status === 0;
  assert.equal(perfProblem() === null, sampling);
});
