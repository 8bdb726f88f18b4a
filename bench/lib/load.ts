import autocannon from 'autocannon';
import { randomUUID } from 'node:crypto';
import pg from 'pg';
import { insertLeaseWithinQuota, lockIdentitySql } from '../../src/leases/repository.js';
import { pickCreator } from '../../src/postgres/creators.js';
import { BEGIN } from '../../src/postgres/pool.js';
import { roleNameFor } from '../../src/postgres/role-name.js';
import { createRoleSql } from '../../src/postgres/roles.js';
import { generatePassword, scramVerifierAsync } from '../../src/postgres/scram.js';
import { summarize, type Summary } from './stats.js';

/** One timed load run, broker or floor. Latencies are in milliseconds (float). */
export interface LoadRun {
  ok: number;
  errors: number;
  statusCounts: Record<string, number>;
  seconds: number;
  rps: number;
  latency: Summary;
  /** [completion time (ms, performance.now), latency ms] of each success, for windowed views. */
  timeline: Array<[number, number]>;
  firstError?: string;
}

export function finish(start: number, lat: Array<[number, number]>, errors: number, statusCounts: Record<string, number>, firstError?: string): LoadRun {
  // Up to the last answer: autocannon notices it is done only on its next sampling tick.
  const last = lat.length ? lat.reduce((m, l) => Math.max(m, l[0]), 0) : performance.now();
  const seconds = (last - start) / 1000;
  return {
    ok: lat.length,
    errors,
    statusCounts,
    seconds,
    rps: lat.length / seconds,
    latency: summarize(lat.map((l) => l[1])),
    timeline: lat,
    firstError,
  };
}

/** Cycles through pre-signed tokens, so concurrent requests never share an identity. */
export class TokenPool {
  private i = 0;
  constructor(readonly tokens: string[]) {
    if (tokens.length === 0) throw new Error('empty token pool');
  }
  next(): string {
    const t = this.tokens[this.i];
    this.i = (this.i + 1) % this.tokens.length;
    return t;
  }
}

export interface HttpLoadOptions {
  url: string;
  path: string;
  method?: string;
  body?: string;
  connections: number;
  /** Bounded by time... */
  seconds?: number;
  /** ...or by request count (takes precedence). */
  amount?: number;
  tokens: TokenPool;
  /** Requests per second over all connections (open loop); default: as fast as answers come. */
  rate?: number;
  /** Status that counts as success. */
  expect: number;
  /** Resolve early when this promise settles (the run is stopped). */
  until?: Promise<unknown>;
}

/** autocannon against the broker; each request carries the next token of the pool. */
export async function httpLoad(o: HttpLoadOptions): Promise<LoadRun> {
  const lat: Array<[number, number]> = [];
  const statusCounts: Record<string, number> = {};
  let errors = 0;
  const start = performance.now();
  const instance = autocannon({
    url: o.url,
    connections: o.connections,
    ...(o.amount ? { amount: o.amount } : { duration: o.seconds ?? 1 }),
    timeout: 30,
    // autocannon notices the end of a run only on its sampling tick (1 s by default); a short tick
    // keeps an idle tail out of the CPU and idle accounting taken around the run.
    sampleInt: 10,
    ...(o.rate ? { overallRate: o.rate } : {}),
    requests: [
      {
        method: o.method ?? 'POST',
        path: o.path,
        ...(o.body !== undefined ? { body: o.body } : {}),
        setupRequest: (req) => {
          req.headers = {
            ...(req.headers ?? {}),
            ...(o.body !== undefined ? { 'content-type': 'application/json' } : {}),
            authorization: `Bearer ${o.tokens.next()}`,
          };
          return req;
        },
      },
    ],
  });
  // autocannon's own histogram keeps whole milliseconds; the raw response times are floats.
  instance.on('response', (_client: unknown, status: number, _bytes: number, responseTime: number) => {
    statusCounts[status] = (statusCounts[status] ?? 0) + 1;
    if (status === o.expect) lat.push([performance.now(), responseTime]);
    else errors++;
  });
  instance.on('reqError', () => {
    errors++;
  });
  if (o.until) o.until.then(() => instance.stop(), () => instance.stop());
  const result = await instance;
  errors += result.timeouts ?? 0;
  return finish(start, lat, errors, statusCounts);
}

/**
 * The floor's connections, opened once and kept across bursts as the broker keeps its pool's.
 * Fresh connections per burst cost the floor a cold backend each time (empty catalogue caches,
 * the INSERT planned again), spread over a handful of credentials per connection: at 16 clients
 * that made the floor 7 % slower at 4096 iterations and 13–19 % at 1 than with warm connections.
 */
export class FloorConnections {
  private readonly open: pg.Client[] = [];
  constructor(private readonly databaseUrl: string) {}

  /** `n` connected clients, opening whatever is missing. */
  async take(n: number): Promise<pg.Client[]> {
    while (this.open.length < n) {
      const more = await Promise.all(Array.from({ length: n - this.open.length }, async () => {
        const client = new pg.Client({ connectionString: this.databaseUrl, application_name: 'bench floor' });
        client.on('error', () => undefined);
        await client.connect();
        return client;
      }));
      this.open.push(...more);
    }
    return this.open.slice(0, n);
  }

  async close(): Promise<void> {
    await Promise.all(this.open.splice(0).map((c) => c.end().catch(() => undefined)));
  }
}

export interface FloorSpec {
  databaseUrl: string;
  connections: FloorConnections;
  iterations: number;
  issuer: string;
  policy: string;
  grantRole: string;
  database: string;
  managedRole: string;
  /** The broker's creator roles (PostgreSQL 16+, see src/postgres/creators.ts); [] on 15. */
  creators: string[];
  ttlSeconds: number;
  maxTtlSeconds: number;
  subjects: () => string;
}

/**
 * One credential the way PostgreSQL needs it, through a plain pg connection, with the broker's
 * own SQL (lockIdentitySql's advisory lock, insertLeaseWithinQuota's lease + audit INSERT, and
 * createRoleSql's CREATE ROLE + COMMENT) and the same client-side verifier computation
 * (scramVerifierAsync, PBKDF2 on libuv's pool, started before the first round trip and awaited for
 * CREATE ROLE, as the broker does) per credential. Three round trips, as the broker sends them: the
 * least without pipelining (pg's pipeline mode could send the INSERT behind the lock, but CREATE
 * ROLE has to wait for the INSERT's quota answer; in a trial here that saved the floor about 3 %).
 */
const policyVersions = new WeakMap<pg.Client, string>();
const NO_TOKEN = '00000000-0000-0000-0000-000000000000';

export async function floorIssue(client: pg.Client, spec: FloorSpec): Promise<void> {
  const subject = spec.subjects();
  const password = generatePassword();
  // As the broker does: the verifier's PBKDF2 runs on libuv's pool during the first two round trips.
  const verifier = scramVerifierAsync(password, spec.iterations);
  verifier.catch(() => undefined);
  const username = roleNameFor(subject);
  const leaseId = randomUUID();
  await client.query(`${BEGIN}; ${lockIdentitySql(spec.issuer, subject)}`);
  const insert = () => insertLeaseWithinQuota(
    client,
    {
      id: leaseId, username, policy: spec.policy, grant_role: spec.grantRole, database: spec.database,
      issuer: spec.issuer, subject, claims: { sub: subject }, ttl_seconds: spec.ttlSeconds, max_ttl: spec.maxTtlSeconds,
      client_ip: '127.0.0.1', user_agent: 'bench-floor', request_id: randomUUID(),
    },
    100_000,
    {
      type: 'credential.issued', issuer: spec.issuer, subject, request_id: leaseId, client_ip: '127.0.0.1',
      lease_id: leaseId, policy: spec.policy, username, detail: { ttl: spec.ttlSeconds, grant_role: spec.grantRole },
    },
    policyVersions.get(client) ?? NO_TOKEN,
  );
  // The broker's INSERT checks the token of the policies it kept; the floor keeps the token per
  // connection as the broker keeps it per process, learning it from a refusal.
  let { inserted, policyVersion, expiresAt } = await insert();
  for (let tries = 1; policyVersion !== (policyVersions.get(client) ?? NO_TOKEN); tries++) {
    if (tries > 3) throw new Error('floor: the policies keep changing');
    policyVersions.set(client, policyVersion ?? NO_TOKEN);
    ({ inserted, policyVersion, expiresAt } = await insert());
  }
  if (!inserted) throw new Error('floor: quota exceeded');
  // VALID UNTIL from the INSERT's answer, PostgreSQL's clock, as the broker takes it.
  await client.query(
    createRoleSql({
      username, verifier: await verifier, validUntil: expiresAt!, connectionLimit: -1, grantRole: spec.grantRole,
      managedRole: spec.managedRole, creator: pickCreator(spec.creators), assumeRole: false, comment: `lease ${leaseId} sub ${subject}`,
    }) + ';\nCOMMIT',
  );
}

/**
 * `connections` plain pg clients (kept open between calls, see FloorConnections) issuing floor
 * credentials back to back, `amount` in all (or for `seconds`). `around.start` runs once they are
 * connected and `around.end` when they are done, so CPU marks taken there leave out any logins.
 */
export async function floorLoad(spec: FloorSpec, connections: number, bound: { amount?: number; seconds?: number }, around: { start?(): void; end?(): void } = {}): Promise<LoadRun> {
  const clients = await spec.connections.take(connections);
  const lat: Array<[number, number]> = [];
  let errors = 0;
  let firstError: string | undefined;
  let broken = false;
  around.start?.();
  const start = performance.now();
  const deadline = start + (bound.amount ? 600 : bound.seconds ?? 1) * 1000;
  let left = bound.amount ?? Number.POSITIVE_INFINITY;
  try {
    await Promise.all(
      clients.map(async (client) => {
        while (performance.now() < deadline && left-- > 0) {
          const t = performance.now();
          try {
            await floorIssue(client, spec);
            const done = performance.now();
            lat.push([done, done - t]);
          } catch (err) {
            errors++;
            firstError ??= (err as Error).message;
            await client.query('ROLLBACK').catch(() => {
              broken = true;
            });
          }
        }
      }),
    );
    around.end?.();
    return finish(start, lat, errors, { ok: lat.length, error: errors }, firstError);
  } finally {
    // A connection that cannot even roll back is of no use to the next burst.
    if (broken) await spec.connections.close();
  }
}
