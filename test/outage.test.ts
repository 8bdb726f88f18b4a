// PostgreSQL restarted mid-load: `pg-broker serve` as a child process under a steady, bounded
// load while PostgreSQL stops, stays down for 2 s and starts again. The invariant (DESIGN.md):
// losing PostgreSQL never crashes the process and never yields a 500; requests get 503
// problem+json with Retry-After until the database is back, then the service resumes by itself.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { AUDIENCE, connectAs, waitFor } from './helpers/broker.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import {
  childBrokerEnv, expectAlive, http, loggedSecrets, sleep, spawnBroker, waitReady, type BrokerProcess, type HttpResult,
} from './helpers/process.js';

const DOWN_MS = 2000;
// OUTAGE_ROUNDS restarts PostgreSQL that many times in a row (`npm run test:soak` runs several).
const ROUNDS = Number(process.env.OUTAGE_ROUNDS ?? 1);
const WORKERS = 4;
const MANAGED_ROLE = 'credential_broker_managed';

let pgs: TestPostgres;
let issuer: TestIssuer;
let broker: BrokerProcess | undefined;

interface Sample {
  at: number;
  what: string;
  status: number;
  ms: number;
  contentType: string | null;
  retryAfter: string | null;
  code?: string;
  error?: string;
}

before(async () => {
  pgs = await startPostgres();
  issuer = await startIssuer();
  broker = await spawnBroker(childBrokerEnv(pgs, issuer, {
    LOG_LEVEL: 'info',
  }));
  const put = await http(`${broker.url}/policies/outage`, {
    method: 'PUT', token: await issuer.sign({ aud: AUDIENCE, sub: 'admin:outage' }),
    body: { issuer: issuer.issuer, database: pgs.database, grant_role: 'app_readers', claims: { sub: 'outage:*' }, default_ttl: 2, max_ttl: 30, max_active_leases: 1000 },
  });
  assert.equal(put.status, 201, JSON.stringify(put.body));
});

after(async () => {
  await broker?.kill();
  await issuer?.close();
  await pgs?.stop();
});

describe('PostgreSQL restarted mid-load', () => {
  test('503 problem+json with Retry-After during the outage, never a 500 or a crash, and it resumes by itself', async () => {
    const b = broker!;
    const t0 = Date.now();
    const samples: Sample[] = [];
    const credentials: any[] = [];
    const record = (what: string, res: HttpResult, started: number) => {
      samples.push({
        at: started - t0, what, status: res.status, ms: Date.now() - started,
        contentType: res.headers?.get('content-type') ?? null, retryAfter: res.headers?.get('retry-after') ?? null,
        code: res.body?.code, error: res.error,
      });
    };
    const phase = { stop: false, hardStop: t0 + ROUNDS * 30_000 };

    // Steady, bounded load: each worker issues, sometimes lists or revokes, with a short pause.
    const worker = async (w: number) => {
      const sub = `outage:w${w}`;
      const tok = await issuer.sign({ aud: AUDIENCE, sub, exp: Math.floor(Date.now() / 1000) + 600 });
      // Stopped by the test; the time and the count are only bounds.
      for (let sent = 0; !phase.stop && Date.now() < phase.hardStop && sent < 20_000; sent++) {
        let started = Date.now();
        const res = await http(`${b.url}/credentials`, { method: 'POST', token: tok, body: { ttl: 2 + (w % 3) }, timeoutMs: 10_000 });
        record('POST /credentials', res, started);
        if (res.status === 201) {
          credentials.push({ ...res.body, at: started - t0 });
          // Worker 0 revokes everything it gets, so teardowns are in flight when the server stops.
          if (w === 0 || Math.random() < 0.2) {
            started = Date.now();
            record('DELETE /leases/{id}', await http(`${b.url}/leases/${res.body.lease_id}`, { method: 'DELETE', token: tok, timeoutMs: 15_000 }), started);
          } else if (Math.random() < 0.2) {
            started = Date.now();
            record('GET /leases', await http(`${b.url}/leases?limit=5`, { token: tok, timeoutMs: 10_000 }), started);
          }
        }
        await sleep(20);
      }
    };
    // Readiness probe, as a load balancer would poll it.
    const probe = async () => {
      while (!phase.stop && Date.now() < phase.hardStop) {
        const started = Date.now();
        record('GET /readyz', await http(`${b.url}/readyz`, { timeoutMs: 10_000 }), started);
        await sleep(100);
      }
    };
    const load = Promise.all([...Array.from({ length: WORKERS }, (_, w) => worker(w)), probe()]);

    const outages: Array<{ down: number; up: number }> = [];
    for (let round = 0; round < ROUNDS; round++) {
      await sleep(1500);
      const down = Date.now() - t0;
      await pgs.restart({ downMs: DOWN_MS });
      outages.push({ down, up: Date.now() - t0 });
      // Keep the load on until the service has answered 201 for a while after the restart.
      const resumeDeadline = Date.now() + 15_000;
      while (!samples.some((s) => s.what === 'POST /credentials' && s.status === 201 && s.at > outages[round].up + 1000) && Date.now() < resumeDeadline) await sleep(100);
    }
    const upAt = outages.at(-1)!.up;
    phase.stop = true;
    await load;
    await expectAlive(b, 'after the outage');

    const byStatus = (what: string) => {
      const counts: Record<string, number> = {};
      for (const s of samples) if (s.what === what) counts[s.status] = (counts[s.status] ?? 0) + 1;
      return counts;
    };
    const summary = ['POST /credentials', 'DELETE /leases/{id}', 'GET /leases', 'GET /readyz'].map((w) => `${w} ${JSON.stringify(byStatus(w))}`).join('; ');

    // Never a 500 (or any 5xx but 503), and no request without an answer.
    const bad = samples.filter((s) => s.status === 0 || (s.status >= 500 && s.status !== 503));
    assert.deepEqual(bad, [], `answers that are neither success nor 503 (${summary})`);
    // Every 503 is problem+json with Retry-After (the readiness probe's plain JSON body too carries Retry-After).
    const unavailable = samples.filter((s) => s.status === 503);
    for (const s of unavailable) {
      assert.ok(s.retryAfter && /^\d+$/.test(s.retryAfter), `503 without Retry-After: ${JSON.stringify(s)}`);
      if (s.what !== 'GET /readyz') {
        assert.match(s.contentType ?? '', /^application\/problem\+json/, JSON.stringify(s));
        assert.equal(s.code, 'DATABASE_UNAVAILABLE', JSON.stringify(s));
      }
    }
    // The outage was seen: by the clients and by the readiness probe.
    for (const { down, up } of outages) {
      assert.ok(unavailable.some((s) => s.what === 'POST /credentials' && s.at >= down && s.at <= up), `no 503 for POST /credentials during the outage at ${down} ms (${summary})`);
      assert.ok(samples.some((s) => s.what === 'GET /readyz' && s.status === 503 && s.at >= down && s.at <= up), `/readyz never answered 503 while PostgreSQL was down at ${down} ms (${summary})`);
      // It resumed by itself after each restart.
      assert.ok(samples.some((s) => s.what === 'POST /credentials' && s.status === 201 && s.at > up), `no 201 after the restart at ${up} ms (${summary})`);
    }
    // Nothing hangs: each request above has a client timeout of 10–15 s, twice the pool's 5 s
    // connect timeout, and one that ran out was recorded with status 0, refused above. The
    // slowest is printed, not asserted.
    const slowest = samples.reduce((m, s) => Math.max(m, s.ms), 0);
    // The last probe, after the last restart, is ready again.
    const probes = samples.filter((s) => s.what === 'GET /readyz');
    assert.equal(probes.at(-1)!.status, 200, `readyz after the outage (${summary})`);
    const resumedAfter = outages.map(({ up }) => samples.filter((s) => s.what === 'POST /credentials' && s.status === 201 && s.at > up).reduce((m, s) => Math.min(m, s.at + s.ms), Infinity) - up);
    const causes = new Set(b.logged('PostgreSQL unavailable').map((l) => `${l.err?.code ?? ''} ${l.err?.message ?? ''}`.trim()));
    assert.deepEqual(b.logged('request failed'), [], 'requests that failed with a 500');
    console.log(`outage: ${ROUNDS} PostgreSQL restart(s) under load (stop, ${DOWN_MS} ms down, start; down ${outages.map((o) => `${o.down}-${o.up} ms`).join(', ')});`
      + ` first 201 again ${resumedAfter.join(', ')} ms after start; slowest request ${slowest} ms; ${summary}; 503 causes: ${[...causes].join(' / ')}`);

    // No half-made state: every managed role has a lease row, every active lease can log in,
    // every credential handed out has its lease, and the ones issued after the restart work.
    const orphans = await pgs.query(
      `SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid JOIN pg_roles g ON g.oid = m.roleid
        WHERE g.rolname = $1 AND NOT m.admin_option AND r.rolname <> 'broker'
          AND NOT EXISTS (SELECT 1 FROM broker.leases l WHERE l.username = r.rolname)`, [MANAGED_ROLE]);
    assert.deepEqual(orphans, [], 'managed roles without a lease');
    const broken = await pgs.query(
      `SELECT l.id FROM broker.leases l LEFT JOIN pg_roles r ON r.rolname = l.username
        WHERE l.state = 'active' AND l.expires_at > now() AND (r.oid IS NULL OR NOT r.rolcanlogin OR r.rolvaliduntil IS DISTINCT FROM l.expires_at)`);
    assert.deepEqual(broken, [], 'active leases whose role cannot log in');
    const rows = await pgs.query<{ id: string }>('SELECT id FROM broker.leases WHERE id = ANY($1)', [credentials.map((c) => c.lease_id)]);
    assert.equal(rows.length, credentials.length, 'every 201 has its lease row');
    const fresh = credentials.filter((c) => c.at > upAt).slice(-3);
    let loggedIn = 0;
    for (const cred of fresh) {
      const [lease] = await pgs.query<{ state: string; live: boolean }>('SELECT state, expires_at > now() AS live FROM broker.leases WHERE id = $1', [cred.lease_id]);
      if (lease.state !== 'active' || !lease.live) continue;
      const client = await connectAs(pgs, cred);
      await client.end();
      loggedIn++;
    }
    // Those may all have been revoked (worker 0) or have run out (2-4 s TTLs) by now: one issued
    // here logs in for certain (its TTL within the policy's max_ttl of 30 s).
    if (loggedIn === 0) {
      const tok = await issuer.sign({ aud: AUDIENCE, sub: 'outage:after', exp: Math.floor(Date.now() / 1000) + 600 });
      const after = await http(`${b.url}/credentials`, { method: 'POST', token: tok, body: { ttl: 30 } });
      assert.equal(after.status, 201, JSON.stringify(after.body));
      const client = await connectAs(pgs, after.body);
      await client.end();
      assert.equal((await http(`${b.url}/leases/${after.body.lease_id}`, { method: 'DELETE', token: tok })).status, 200);
    }

    // The reaper came back too (its leadership connection died with the server): every lease
    // issued before or during the outage ends and loses its role.
    const ids = credentials.map((c) => c.lease_id);
    const deadline = Date.now() + 15_000;
    for (;;) {
      const [left] = await pgs.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM broker.leases l WHERE l.id = ANY($1)
            AND (l.state NOT IN ('expired', 'revoked') OR EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = l.username))`, [ids]);
      if (left.n === 0) break;
      assert.ok(Date.now() < deadline, `${left.n} leases not ended and torn down 15 s after the outage`);
      await sleep(250);
    }
    await expectAlive(b, 'at the end');
  });

  test('PostgreSQL refusing the broker\'s connections (too many connections) is a 503 too, and it resumes', async () => {
    const b = broker!;
    const tok = await issuer.sign({ aud: AUDIENCE, sub: 'outage:full' });
    const issue = () => http(`${b.url}/credentials`, { method: 'POST', token: tok, body: { ttl: 2 } });
    assert.equal((await issue()).status, 201);
    // The server is up but full for this role: every new connection fails with SQLSTATE 53300.
    await pgs.query('ALTER ROLE broker CONNECTION LIMIT 0', [], 'postgres');
    try {
      await pgs.query(`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'broker'`, [], 'postgres');
      await sleep(200);
      for (let i = 0; i < 5; i++) {
        const res = await issue();
        assert.equal(res.status, 503, JSON.stringify(res.body));
        assert.equal(res.body.code, 'DATABASE_UNAVAILABLE');
        assert.match(res.headers!.get('content-type') ?? '', /^application\/problem\+json/);
        assert.match(res.headers!.get('retry-after') ?? '', /^\d+$/);
      }
      const ready = await http(`${b.url}/readyz`);
      assert.equal(ready.status, 503);
      assert.ok(b.logged('PostgreSQL unavailable').some((l) => l.err?.code === '53300'), 'the refusals were 53300');
    } finally {
      await pgs.query('ALTER ROLE broker CONNECTION LIMIT -1', [], 'postgres');
    }
    const res = await issue();
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.equal((await http(`${b.url}/readyz`)).status, 200);
    assert.deepEqual(b.logged('request failed'), [], 'requests that failed with a 500');
  });

  test('after all that the broker never crashed, wrote nothing to stderr, and shuts down cleanly on SIGTERM', async () => {
    const b = broker!;
    await expectAlive(b, 'at the end');
    assert.deepEqual(b.stderr.filter((l) => l.trim()), [], 'the broker wrote to stderr');
    assert.deepEqual(await b.kill('SIGTERM'), { code: 0, signal: null });
    broker = undefined;
  });
});

test('serve started while PostgreSQL is down waits for it, then migrates and becomes ready', async () => {
  // Down for a second, and until the new broker has met the outage however long a loaded machine
  // takes to start it (a fixed outage could end before it first tried).
  let metIt!: () => void;
  const restarting = pgs.restart({ downMs: 1000, upWhen: new Promise<void>((resolve) => { metIt = resolve; }) });
  // Start the broker only once the server really refuses connections.
  for (let i = 0; ; i++) {
    const probe = new pg.Client({ connectionString: pgs.brokerUrl, connectionTimeoutMillis: 500 });
    probe.on('error', () => undefined);
    const down = await probe.connect().then(() => false, () => true);
    await probe.end().catch(() => undefined);
    if (down) break;
    assert.ok(i < 200, 'PostgreSQL never went down');
    await sleep(10);
  }
  const late = await spawnBroker(childBrokerEnv(pgs, issuer, { LOG_LEVEL: 'info' }), { noWait: true });
  try {
    await waitFor('the broker to log its wait', async () => late.logged('PostgreSQL is not reachable yet; retrying').length > 0 || null, 60_000)
      .finally(() => metIt());
    await restarting;
    await waitReady(late, 30_000);
    const waits = late.logged('PostgreSQL is not reachable yet; retrying');
    assert.ok(waits.length >= 1, 'it logged its wait');
    assert.equal(waits[0].err.code, 'ECONNREFUSED');
    const res = await http(`${late.url}/credentials`, { method: 'POST', token: await issuer.sign({ aud: AUDIENCE, sub: 'outage:late' }), body: { ttl: 2 } });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    assert.deepEqual(late.stderr.filter((l) => l.trim()), [], 'the broker wrote to stderr');
  } finally {
    await late.kill('SIGTERM');
  }
});

test('no token or password the clients saw reached a broker log or the PostgreSQL statement log', () => {
  const { leaks, tokens, passwords } = loggedSecrets(pgs.logLines());
  assert.ok(tokens > 0 && passwords > 0, `the suite saw secrets of both kinds to look for: ${tokens} tokens, ${passwords} passwords`);
  assert.deepEqual(leaks, []);
});
