import type { LoadRun } from './load.js';
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
