import pg from 'pg';
import { Pool as HttpPool } from 'undici';
import { listLeases } from '../../src/leases/repository.js';
import type { Queryable } from '../../src/postgres/pool.js';
import type { LeaseQueryBody } from '../../src/schemas/lease.js';
import type { TestIssuer } from '../../test/helpers/issuer.js';
import type { TestPostgres } from '../../test/helpers/postgres.js';
import type { BrokerChild } from '../lib/broker.js';
import { log } from '../lib/log.js';
import type { LeaseShape, Results } from '../lib/results.js';
import { SETTINGS } from '../lib/settings.js';
import { summarize } from '../lib/stats.js';
import { signTokens } from '../lib/tokens.js';
import { insertLeaseRows } from './lease-rows.js';

/**
 * P5: GET /leases over a large table, one request at a time through HTTP and JWT verification,
 * for several filter shapes each walking its pages through next_cursor; then the plans
 * PostgreSQL chose for the exact SQL listLeases sends.
 */

interface ShapeSpec {
  name: string;
  query: LeaseQueryBody;
  owner?: string;
  pages: number;
}

export async function runLeaseListing(pgs: TestPostgres, broker: BrokerChild, issuer: TestIssuer, adminToken: string): Promise<NonNullable<Results['leases']>> {
  const rows = SETTINGS.rows;
  const subjects = SETTINGS.subjects;
  log(`lease listing: inserting ${rows} lease rows`);
  const loadSeconds = await insertLeaseRows(pgs, issuer.issuer, rows, subjects);
  const [{ total }] = await pgs.query<{ total: number }>('SELECT count(*)::int AS total FROM broker.leases');
  log(`lease listing: ${total} rows in broker.leases (load ${loadSeconds.toFixed(1)} s)`);

  const ownerSubjects = Array.from({ length: 20 }, (_, i) => `p5-subject-${(i * 997) % subjects}`);
  const ownerTokens = new Map<string, string>();
  for (const [i, token] of (await signTokens(issuer, ownerSubjects)).entries()) ownerTokens.set(ownerSubjects[i], token);
  const spanMs = rows * 250;
  const now = Date.now() - 3600_000;
  const pick = <T>(list: T[]) => list[Math.floor(Math.random() * list.length)];
  const subjectAt = () => `p5-subject-${Math.floor(Math.random() * subjects)}`;
  const shapes: Array<() => ShapeSpec> = [
    () => ({ name: 'all leases, newest first', query: { limit: 100 }, pages: 5 }),
    () => ({ name: 'subject', query: { subject: subjectAt(), limit: 20 }, pages: 3 }),
    () => ({ name: 'policy + state=expired', query: { policy: `p5-policy-${Math.floor(Math.random() * 20)}`, state: 'expired', limit: 100 }, pages: 5 }),
    // Selective: about 1 % (active) or 9 % (revoked) of a policy's rows match.
    () => ({ name: 'policy + state=active or revoked', query: { policy: `p5-policy-${Math.floor(Math.random() * 20)}`, state: pick(['active', 'revoked']), limit: 100 }, pages: 5 }),
    () => ({ name: 'state=active', query: { state: 'active', limit: 100 }, pages: 5 }),
    () => ({ name: 'issuer + time window', query: { issuer: issuer.issuer, since: new Date(now - spanMs * 0.6).toISOString(), until: new Date(now - spanMs * 0.3).toISOString(), limit: 100 }, pages: 5 }),
    () => ({ name: 'username', query: { username: `lease_p5_${1 + Math.floor(Math.random() * rows)}` }, pages: 1 }),
    () => ({ name: 'owner (non-admin), own leases', owner: pick(ownerSubjects), query: { limit: 20 }, pages: 3 }),
  ];

  const http1 = new HttpPool(broker.url, { connections: 1, pipelining: 1 });
  const latencies = new Map<string, number[]>();
  const firstCursor = new Map<string, { spec: ShapeSpec; cursor: string | null }>();
  let failures = 0;
  let requests = 0;
  const get = async (spec: ShapeSpec, cursor: string | null): Promise<{ next: string | null; items: number }> => {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(spec.query)) if (v !== undefined) params.set(k, String(v));
    if (cursor) params.set('cursor', cursor);
    const token = spec.owner ? ownerTokens.get(spec.owner)! : adminToken;
    const t = performance.now();
    const res = await http1.request({ method: 'GET', path: `/leases?${params}`, headers: { authorization: `Bearer ${token}` } });
    const text = await res.body.text();
    const ms = performance.now() - t;
    requests++;
    if (res.statusCode !== 200) {
      failures++;
      if (failures < 3) log(`GET /leases?${params}: ${res.statusCode} ${text.slice(0, 200)}`);
      return { next: null, items: 0 };
    }
    const body = JSON.parse(text) as { items: unknown[]; next_cursor: string | null };
    if (!latencies.has(spec.name)) latencies.set(spec.name, []);
    latencies.get(spec.name)!.push(ms);
    return { next: body.next_cursor, items: body.items.length };
  };
  // Warm-up pass, then round-robin over the shapes, each walking its pages through next_cursor.
  for (const make of shapes) {
    const spec = make();
    const first = await get(spec, null);
    firstCursor.set(spec.name, { spec, cursor: first.next });
  }
  latencies.clear();
  let round = 0;
  while (requests < SETTINGS.listRequests + shapes.length) {
    const spec = shapes[round++ % shapes.length]();
    let cursor: string | null = null;
    for (let page = 0; page < spec.pages; page++) {
      const res = await get(spec, cursor);
      cursor = res.next;
      if (!cursor) break;
    }
  }
  await http1.close();

  // The plans, for the first page and a cursor page of each shape, exactly as listLeases builds them.
  const client = new pg.Client({ connectionString: pgs.brokerUrl });
  client.on('error', () => undefined);
  await client.connect();
  const shapeResults: LeaseShape[] = [];
  try {
    for (const [name, { spec, cursor }] of firstCursor) {
      const plans: Array<{ page: string; plan: string; indexUsed: boolean }> = [];
      for (const page of cursor ? ['first', 'cursor'] : ['first']) {
        const q: LeaseQueryBody = page === 'cursor' ? { ...spec.query, cursor: cursor! } : spec.query;
        const captured: { text: string; values: unknown[] }[] = [];
        const fake = { query: async (text: string, values: unknown[]) => (captured.push({ text, values }), { rows: [] }) } as unknown as Queryable;
        const owner = spec.owner ? { issuer: issuer.issuer, subject: spec.owner } : undefined;
        await listLeases(fake, q, owner);
        const { text, values } = captured[0];
        const { rows: planRows } = await client.query<{ 'QUERY PLAN': string }>(`EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) ${text}`, values as unknown[]);
        const plan = planRows.map((r) => r['QUERY PLAN']).join('\n');
        const indexUsed = /Index (Only )?Scan|Bitmap Index Scan/.test(plan) && !/Seq Scan on leases/.test(plan);
        plans.push({ page, plan, indexUsed });
      }
      shapeResults.push({ name, query: spec.query, owner: spec.owner ?? null, latency: summarize(latencies.get(name) ?? []), plans });
    }
  } finally {
    await client.end().catch(() => undefined);
  }
  const all = summarize([...latencies.values()].flat());
  log(`lease listing: ${all.n} requests, p50 ${all.p50.toFixed(2)} ms, p95 ${all.p95.toFixed(2)} ms, failures ${failures}`);
  return { rows: total, loadSeconds, requests: all.n, failures, latency: all, shapes: shapeResults };
}
