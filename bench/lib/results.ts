import type { DdlProbe } from './population.js';
import type { LoadRun } from './load.js';
import type { PerfSummary } from './perf.js';
import type { ProfileSummary } from './profile.js';
import type { Summary } from './stats.js';

/**
 * The shape of a bench run's results: what bench/run.ts measures, writes to REPORT.json and
 * renders into REPORT.md.
 */

export type Run = Omit<LoadRun, 'timeline'>;

/** CPU milliseconds per successful operation, by process. */
export interface CpuPerOp {
  broker: number;
  pg: number;
  client: number;
  /** Share (0–1) of all cores' time left idle while the operations ran; absent in older results. */
  idle?: number;
  /** The broker's event loop (main thread), ms per operation on a CPU and waiting for one; absent in older results. */
  loopRun?: number;
  loopWait?: number;
}

/** Issuance at 16 clients, default iterations, with the broker's libuv pool at `size` threads and its database pool at `dbPoolSize`. */
export interface ThreadpoolRun {
  size: string;
  /** BROKER_DB_POOL_SIZE; absent in older results, which ran the default of 10. */
  dbPoolSize?: number;
  /** The broker's NODE_OPTIONS when not the image's (absent: the image's). */
  nodeOptions?: string;
  /** Broker process CPU ms per credential and its max RSS, over the rounds (absent in older results). */
  brokerCpuMs?: number;
  maxRssMb?: number;
  /** Means over the rounds. */
  floorRps: number;
  brokerRps: number;
  /** broker/floor, one per round. */
  ratios: number[];
}

/** The perf (on-CPU) profile of a broker at P1's point, or why none was taken. */
export type PerfProfile = { unavailable: string } | (PerfSummary & { scenario: string; requests: number; brokerMsPerRequest: number });

/** A fresh broker's warm-up before it is measured: its CPU per request, chunk by chunk. */
export interface JitWarmup {
  requests: number;
  connections: number;
  chunk: number;
  brokerMsPerRequest: number[];
}

/** P1, P3 and P1b's measurement (16 clients) on Debian's PostgreSQL 15, or why it was not taken. */
export type Pg15Issuance =
  | { unavailable: string }
  | { postgres: string; runs: Array<{ iterations: number; level: IssuanceLevel; warmup?: JitWarmup }> };

export interface MemoryUsage {
  rss: number;
  heapTotal: number;
  heapUsed: number;
  external: number;
  arrayBuffers: number;
}

/** A long run at 64 clients, RSS sampled throughout; `after` read when it ended. */
export interface SustainedMemory {
  nodeOptions: string;
  credentials: number;
  errors: number;
  seconds: number;
  maxRssMb: number;
  after: MemoryUsage;
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

/** 'compiled': JavaScript bundled by scripts/build.ts on plain node, as production runs it; 'tsx': TypeScript through the tsx loader. */
export type Runtime = 'compiled' | 'tsx';

export interface StartupSeries {
  runsMs: number[];
  medianMs: number;
  idleRssMb: number;
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
    /** How bench/broker-process.ts ran; absent in results from before the build step, which ran it through tsx. */
    brokerRuntime?: Runtime;
    /** NODE_OPTIONS the broker process ran with (the Docker image's). */
    brokerNodeOptions?: string;
    /** UV_THREADPOOL_SIZE of the broker and of the bench process (the Docker image's); absent: libuv's default of 4. */
    threadpoolSize?: string;
  };
  issuance: Array<{ iterations: number; levels: IssuanceLevel[]; warmup?: JitWarmup }>;
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
    /** The same load after the drain, with the backlog gone (absent in reports before it existed). */
    idleAfter?: Run;
    /** Requests that began in the drain's first and last thirds. */
    early?: Summary;
    late?: Summary;
    /**
     * Each drain on its own (absent in reports from a single drain). The fields above pool them:
     * counts and times add up, latencies pool, p99 is taken over all drains' requests.
     */
    drains?: Array<{ ended: number; seconds: number; rolesPerSecond: number; rolesLeft: number; idleP99: number; earlyP99: number; idleAfterP99: number; lateP99: number; ratio: number }>;
  };
  /** One burst, every request at once, from distinct identities and from a single one (the bench's runFanout). */
  fanout?: Array<{ size: number; rounds: number; iterations: number; distinct: Run; same: Run; burstSeconds: { distinct: number[]; same: number[] } }>;
  population?: Array<{ live: number; createSeconds: number; iterations: number; connections: number; floor: Run; broker: Run; floorCpu: CpuPerOp; brokerCpu: CpuPerOp; ratio: number }>;
  ddl?: DdlProbe[];
  leases?: { rows: number; loadSeconds: number; requests: number; failures: number; latency: Summary; shapes: LeaseShape[] };
  jwt?: Array<{ alg: string; connections: number; run: Run; cpu: CpuPerOp }>;
  threadpool?: ThreadpoolRun[];
  /** maxRssMbAt64: P6, over the 64-client issuance runs and the first sustained run (the image's settings). */
  memory?: { maxRssMbAt64: number; perRun: number[]; usage?: MemoryUsage[]; sustained?: SustainedMemory[] };
  /**
   * `entry`: what the target figures time; absent in older results, which timed bin/pg-broker.js
   * through tsx and measured the compiled CLI only as `bundled`. Newer results put tsx in `tsx`.
   */
  startup?: { entry?: Runtime; runsMs: number[]; medianMs: number; idleRssMb?: number; bundled?: StartupSeries; tsx?: StartupSeries };
  profile?: ProfileSummary & { scenario: string; file: string; requests: number };
  perfProfile?: PerfProfile;
  pg15?: Pg15Issuance;
  errors: Record<string, string>;
}
