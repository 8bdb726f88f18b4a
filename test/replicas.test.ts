// Replicas: three `pg-broker serve` processes on one fresh database, started at the same moment
// (so all three migrate at once), under concurrent issuance and revocation with short leases;
// then the reaper leader is SIGKILLed and another process must take over the reaping.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import pg from 'pg';
import { after, before, describe, test } from 'node:test';
import { REAPER_LOCK_KEY } from '../src/reaper/leadership.js';
import { AUDIENCE } from './helpers/broker.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { childBrokerEnv, http, killAll, loggedSecrets, sleep, spawnBroker, type BrokerProcess } from './helpers/process.js';

const REPLICAS = 3;
const LOAD_MS = Number(process.env.REPLICA_LOAD_MS ?? 4000);
const MIN_LEASES = 50;
const WORKERS = 6;
const MANAGED_ROLE = 'credential_broker_managed';

let pgs: TestPostgres;
let issuer: TestIssuer;
let env: Record<string, string>;
let brokers: BrokerProcess[] = [];

const token = (sub: string) => issuer.sign({ aud: AUDIENCE, sub });
const pick = <T>(list: T[]) => list[Math.floor(Math.random() * list.length)];

before(async () => {
  pgs = await startPostgres();
  issuer = await startIssuer();
  env = childBrokerEnv(pgs, issuer, {
    LOG_LEVEL: 'info',
  });
});

after(async () => {
  await killAll(brokers);
  await issuer?.close();
  await pgs?.stop();
});

/** The backend pid holding the reaper's advisory lock, with the application name it connected with. */
async function lockHolder(): Promise<{ pid: number; client_port: number; application_name: string } | undefined> {
  const [row] = await pgs.query(
    `SELECT a.pid, a.client_port, a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
        AND (l.classid::bigint << 32) + l.objid::bigint = $1`,
    [REAPER_LOCK_KEY],
  );
  return row;
}

/** Inodes of the TCP sockets bound to this local port on 127.0.0.1 (Linux /proc/net/tcp). */
function socketInodes(localPort: number): Set<string> {
  const inodes = new Set<string>();
  for (const line of fs.readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols.length < 10) continue;
    const port = parseInt(cols[1].split(':')[1], 16);
    if (port === localPort) inodes.add(cols[9]);
  }
  return inodes;
}

/** Which of our broker processes owns the client end of the connection that holds the lock. */
function processOwning(clientPort: number): BrokerProcess | undefined {
  const inodes = socketInodes(clientPort);
  return brokers.find((b) => {
    if (!b.alive()) return false;
    try {
      return fs.readdirSync(`/proc/${b.pid}/fd`).some((fd) => {
        try {
          const m = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${b.pid}/fd/${fd}`));
          return m !== null && inodes.has(m[1]);
        } catch {
          return false;
        }
      });
    } catch {
      return false;
    }
  });
}

async function findLeader(): Promise<{ broker: BrokerProcess; pid: number }> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const holder = await lockHolder();
    if (holder) {
      assert.equal(holder.application_name, 'pg-credential-broker leader');
      const broker = processOwning(holder.client_port);
      if (broker) return { broker, pid: holder.pid };
    }
    assert.ok(Date.now() < deadline, 'no broker process holds the reaper lock');
    await sleep(100);
  }
}

/** Per lease: its state and how many lease.expired / lease.revoked events it has. */
async function endings(ids: string[]): Promise<Array<{ id: string; state: string; expired: number; revoked: number }>> {
  return pgs.query(
    `SELECT l.id, l.state,
            count(a.id) FILTER (WHERE a.type = 'lease.expired')::int AS expired,
            count(a.id) FILTER (WHERE a.type = 'lease.revoked')::int AS revoked
       FROM broker.leases l LEFT JOIN broker.audit_events a ON a.lease_id = l.id
      WHERE l.id = ANY($1) GROUP BY l.id, l.state`,
    [ids],
  );
}

/** Waits until none of `ids` is left un-ended (or the deadline passes; callers assert after). */
async function untilEnded(ids: string[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const [left] = await pgs.query<{ n: number }>(`SELECT count(*)::int AS n FROM broker.leases WHERE id = ANY($1) AND state NOT IN ('expired', 'revoked')`, [ids]);
    if (left.n === 0) return;
    await sleep(200);
  }
}

/** Each ended lease has exactly one ending event, of the kind its state says; none is left un-ended. */
function assertEndedOnce(rows: Awaited<ReturnType<typeof endings>>, expected: number): void {
  assert.equal(rows.length, expected, 'every lease is accounted for');
  const wrong = rows.filter((r) => !((r.state === 'expired' && r.expired === 1 && r.revoked === 0) || (r.state === 'revoked' && r.revoked === 1 && r.expired === 0)));
  assert.deepEqual(wrong, [], 'leases not ended exactly once');
}

async function managedRolesLeft(): Promise<string[]> {
  const rows = await pgs.query<{ rolname: string }>(
    `SELECT r.rolname FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid JOIN pg_roles g ON g.oid = m.roleid
      WHERE g.rolname = $1 AND NOT m.admin_option AND NOT r.rolsuper AND NOT r.rolcreaterole AND r.rolname <> 'broker'`,
    [MANAGED_ROLE],
  );
  return rows.map((r) => r.rolname);
}

describe(`${REPLICAS} broker processes on one database`, () => {
  test('started at the same moment, all migrate without error and become ready', async () => {
    brokers = await Promise.all(Array.from({ length: REPLICAS }, () => spawnBroker(env)));
    const files = fs.readdirSync(new URL('../migrations/', import.meta.url)).filter((f) => /^\d+_.*\.sql$/.test(f)).sort();
    const applied = await pgs.query<{ version: string }>('SELECT version FROM broker.schema_migrations ORDER BY version');
    assert.deepEqual(applied.map((r) => r.version), files);
    // Under the advisory lock each migration ran in exactly one process; the others found it done.
    const runs = brokers.flatMap((b) => b.logged('applied migration').map((l) => l.migration)).sort();
    assert.deepEqual(runs, files);
    assert.equal((await pgs.query(`SELECT 1 FROM pg_roles WHERE rolname = $1`, [MANAGED_ROLE])).length, 1);
    for (const b of brokers) assert.deepEqual(b.stderr, []);
  });

  test('a replica whose port is taken exits with status 1 instead of lingering as a headless reaper', async () => {
    const taken = brokers[0];
    const extra = await spawnBroker(env, { port: taken.port, noWait: true });
    const status = await Promise.race([extra.exited, sleep(15_000).then(() => null)]);
    await extra.kill();
    assert.deepEqual(status, { code: 1, signal: null }, `stderr: ${extra.stderr.join(' | ')}`);
    assert.match(extra.stderr.join('\n'), /EADDRINUSE/);
    assert.equal(extra.logged('became reaper leader').length, 0);
  });

  test('concurrent issuance and revocation across replicas: each lease ends exactly once, no roles left', async () => {
    const admin = await token('admin:replicas');
    const put = await http(`${brokers[0].url}/policies/replicas`, {
      method: 'PUT', token: admin,
      body: { issuer: issuer.issuer, database: pgs.database, grant_role: 'app_readers', claims: { sub: 'rep:*' }, default_ttl: 1, max_ttl: 2, max_active_leases: 1000 },
    });
    assert.equal(put.status, 201, JSON.stringify(put.body));

    const ids = new Set<string>();
    const problems: string[] = [];
    const statuses: Record<string, number> = {};
    const note = (what: string) => (statuses[what] = (statuses[what] ?? 0) + 1);
    // Runs for LOAD_MS and until MIN_LEASES leases were issued, however slow the machine is; the
    // hard stop only keeps a broken broker from looping for ever.
    const until = Date.now() + LOAD_MS;
    const hardStop = until + 120_000;
    const running = () => (Date.now() < until || ids.size < MIN_LEASES) && Date.now() < hardStop;
    const worker = async (w: number) => {
      const sub = `rep:w${w}`;
      const tok = await token(sub);
      while (running()) {
        const res = await http(`${pick(brokers).url}/credentials`, { method: 'POST', token: tok, body: { ttl: 1 + Math.floor(Math.random() * 2) } });
        note(`POST ${res.status}`);
        if (res.status !== 201) {
          problems.push(`POST /credentials ${res.status} ${JSON.stringify(res.body)}`);
          continue;
        }
        ids.add(res.body.lease_id);
        const r = Math.random();
        if (r < 0.3) {
          // Revoke through another replica than the one that issued, racing its reaper.
          const del = await http(`${pick(brokers).url}/leases/${res.body.lease_id}`, { method: 'DELETE', token: tok });
          note(`DELETE ${del.status} ${del.body?.state ?? del.body?.code}`);
          if (del.status !== 200 || !['revoked', 'expired'].includes(del.body.state)) problems.push(`DELETE ${del.status} ${JSON.stringify(del.body)}`);
        } else if (r < 0.33) {
          // The "user left" button, for this worker's subject, on yet another replica.
          const bulk = await http(`${pick(brokers).url}/leases/revoke`, { method: 'POST', token: admin, body: { subject: sub, reason: 'replica test' } });
          note(`bulk ${bulk.status}`);
          if (bulk.status !== 200) problems.push(`POST /leases/revoke ${bulk.status} ${JSON.stringify(bulk.body)}`);
        }
      }
    };
    await Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
    assert.deepEqual(problems, [], 'every request succeeded');
    assert.ok(ids.size >= MIN_LEASES, `only ${ids.size} leases issued before the hard stop`);

    await untilEnded([...ids], 15_000);
    const rows = await endings([...ids]);
    assertEndedOnce(rows, ids.size);
    // Teardown and the orphan sweep run on the leader's schedule: wait for it, bounded.
    for (const deadline = Date.now() + 15_000; (await managedRolesLeft()).length > 0 && Date.now() < deadline;) await sleep(200);
    assert.deepEqual(await managedRolesLeft(), [], 'managed roles left behind');
    const reapers = brokers.filter((b) => b.logged('became reaper leader').length > 0).length;
    console.log(`replicas: ${ids.size} leases over ${REPLICAS} processes in ${LOAD_MS} ms (${JSON.stringify(statuses)});`
      + ` ${rows.filter((r) => r.state === 'expired').length} expired, ${rows.filter((r) => r.state === 'revoked').length} revoked, each with exactly one event;`
      + ` ${reapers} process(es) led the reaper; 0 managed roles left`);
    for (const b of brokers) assert.deepEqual(b.stderr, []);
  });

  test('SIGKILL of the reaper leader: another process takes the lock and expiring leases still get reaped', async () => {
    const { broker: leader, pid: lockPid } = await findLeader();
    assert.equal(leader.logged('became reaper leader').length >= 1, true, 'the lock holder logged its leadership');
    const others = brokers.filter((b) => b !== leader);

    // Leases that expire right around the kill, issued through the replicas that survive.
    const creds: Array<{ lease_id: string; username: string; expires_at: string }> = [];
    await Promise.all(Array.from({ length: 40 }, async (_, i) => {
      const res = await http(`${others[i % others.length].url}/credentials`, { method: 'POST', token: await token(`rep:kill${i % 4}`), body: { ttl: 2 } });
      assert.equal(res.status, 201, JSON.stringify(res.body));
      creds.push(res.body);
    }));
    // Catch the leader in the middle of tearing them down: an open transaction that has altered
    // the first role to expire makes the leader's first teardown statement (GRANT of membership,
    // then ALTER ROLE ... NOLOGIN) wait, after it claimed the batch. pg_stat_activity.query is cut
    // at 1 kB, so a long batch may show only its GRANT.
    const first = creds.reduce((a, c) => (c.expires_at < a.expires_at ? c : a));
    const blocker = new pg.Client({ connectionString: pgs.superuserUrl.replace(/\/postgres$/, `/${pgs.database}`) });
    blocker.on('error', () => undefined);
    await blocker.connect();
    let killedAt: number;
    try {
      await blocker.query('BEGIN');
      await blocker.query(`ALTER ROLE ${pg.escapeIdentifier(first.username)} CONNECTION LIMIT 7`);
      const stuck = async () => (await pgs.query(
        `SELECT 1 FROM pg_stat_activity WHERE application_name = 'pg-credential-broker' AND wait_event_type = 'Lock' AND query ~ '^GRANT|ALTER ROLE.*NOLOGIN'`)).length > 0;
      for (const deadline = Date.now() + 30_000; !(await stuck()); await sleep(50)) {
        assert.ok(Date.now() < deadline, 'the leader never started tearing the expired leases down');
      }
      const [claimed] = await pgs.query<{ n: number }>(`SELECT count(*)::int AS n FROM broker.leases WHERE id = ANY($1) AND state = 'revoking'`, [creds.map((c) => c.lease_id)]);
      assert.ok(claimed.n > 0, 'the leader had claimed leases when it was killed');
      killedAt = Date.now();
      await leader.kill('SIGKILL');
    } finally {
      await blocker.query('ROLLBACK').catch(() => undefined);
      await blocker.end();
    }

    let next: { broker: BrokerProcess; pid: number } | undefined;
    // Safety bounds, not speed claims (the times are printed below): a loaded CI machine may be slow.
    for (const deadline = Date.now() + 30_000; !next && Date.now() < deadline; await sleep(100)) {
      const holder = await lockHolder();
      if (holder && holder.pid !== lockPid) next = { broker: processOwning(holder.client_port)!, pid: holder.pid };
    }
    assert.ok(next, 'no other process holds the reaper lock 30 s (30 reaper intervals) after the leader died');
    assert.ok(others.includes(next.broker), 'the new leader is one of the surviving processes');
    const tookOver = Date.now() - killedAt;

    const ids = creds.map((c) => c.lease_id);
    await untilEnded(ids, 30_000);
    const reapedIn = Date.now() - killedAt;
    assertEndedOnce(await endings(ids), creds.length);
    const left = await pgs.query('SELECT rolname FROM pg_roles WHERE rolname = ANY($1)', [creds.map((c) => c.username)]);
    assert.deepEqual(left, [], 'roles of expired leases are gone');
    assert.deepEqual(await managedRolesLeft(), []);
    console.log(`replicas: leader pid ${leader.pid} SIGKILLed; pid ${next.broker.pid} held the reaper lock ${tookOver} ms later; all ${creds.length} expiring leases (claimed by the dead leader mid-teardown) reaped exactly once within ${reapedIn} ms`);

    // The survivors are unharmed and stop cleanly.
    for (const b of others) {
      const ready = await http(`${b.url}/readyz`);
      assert.equal(ready.status, 200);
      assert.deepEqual(await b.kill('SIGTERM'), { code: 0, signal: null });
      assert.deepEqual(b.stderr, []);
    }
  });
});

test('no token or password the clients saw reached a broker log or the PostgreSQL statement log', () => {
  const { leaks, tokens, passwords } = loggedSecrets(pgs.logLines());
  assert.ok(tokens > 0 && passwords > 0, `the suite saw secrets of both kinds to look for: ${tokens} tokens, ${passwords} passwords`);
  assert.deepEqual(leaks, []);
});
