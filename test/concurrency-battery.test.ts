import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { identityLockKey } from '../src/leases/repository.js';
import { api, connectAs, startTestBroker, untilPast, waitFor, type TestBroker } from './helpers/broker.js';
import { canLogIn } from './helpers/crash-checks.js';

// Interleavings the other race suites do not reach, each followed by a check of the global
// invariants in SQL (checkInvariants: every issued role has exactly one live or ending lease; an
// active lease's role logs in with VALID UNTIL = expires_at; ended leases have no role and no
// session; one credential.issued and at most one ending event per lease). login-race,
// holder-tricks and renew-holder stall one teardown or renewal by hand; replicas and reaper race
// issuance, DELETE and reapers at random; crash kills the broker. Here, over two replicas on one
// database: a CI fan-out against max_active_leases; a bulk revocation by subject racing issuance,
// renewal and DELETE of that subject; renewals racing expiry and both reapers; policy changes racing
// issuance; bulk revocations by subject and by policy overlapping; and all of it at once. Four of
// these found bugs, pinned by deterministic interleavings (or, for the deadlock, bounded rounds):
// a renewal committing across its lease's expiry while the identity is issued another lease (past
// max_active_leases), an issuance that read its policies afresh just before a change committed,
// a bulk revocation answering 200 while a lease of its filter mid-teardown could still log in, and
// overlapping bulk revocations deadlocking (500). DEBUG_BATTERY=1 prints the brokers' errors and
// PostgreSQL's deadlock reports when a scenario fails.
let b1: TestBroker;
let b2: TestBroker;
const ENV = { BROKER_REAPER_INTERVAL: '1', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' };

before(async () => {
  b1 = await startTestBroker({ env: ENV });
  b2 = await startTestBroker({ pg: b1.pg, issuer: b1.issuer, env: ENV });
});
after(async () => {
  await b2?.close();
  await b1?.close();
});

const pick = <T>(xs: T[]) => xs[Math.floor(Math.random() * xs.length)];
const brokers = () => [b1, b2];
const admin = () => b1.adminToken();

/**
 * The invariants every scenario must leave, read as superuser. `settled`: no teardown may still be
 * under way (every ended lease's role gone), checked once the reapers have had their turn.
 */
async function checkInvariants(settled: boolean): Promise<string[]> {
  const q = b1.pg.query.bind(b1.pg);
  const marker = b1.config.managedRole;
  const problems: string[] = [];
  const issued = `SELECT r.rolname, r.oid FROM pg_roles r JOIN pg_auth_members m ON m.member = r.oid JOIN pg_roles g ON g.oid = m.roleid
                   WHERE g.rolname = '${marker}' AND NOT m.admin_option AND NOT r.rolsuper AND NOT r.rolcreaterole AND r.rolname <> 'broker'`;
  for (const r of await q(`SELECT i.rolname, count(l.id)::int AS n, string_agg(l.state, ',') AS states
                             FROM (${issued}) i LEFT JOIN broker.leases l ON l.username = i.rolname GROUP BY i.rolname`)) {
    if (r.n !== 1) problems.push(`role ${r.rolname} has ${r.n} leases`);
    else if (!['active', 'revoking', 'revoke_failed'].includes(r.states)) problems.push(`role ${r.rolname} outlives its ${r.states} lease`);
  }
  for (const r of await q(`SELECT l.id, l.state, r.rolcanlogin, r.rolvaliduntil, l.expires_at FROM broker.leases l LEFT JOIN pg_roles r ON r.rolname = l.username
                            WHERE l.state = 'active' AND (r.oid IS NULL OR NOT r.rolcanlogin OR r.rolvaliduntil IS DISTINCT FROM l.expires_at)`)) {
    problems.push(`active lease ${r.id}: role ${r.rolcanlogin === null ? 'missing' : `login ${r.rolcanlogin}, VALID UNTIL ${r.rolvaliduntil?.toISOString()} vs ${r.expires_at.toISOString()}`}`);
  }
  if (settled) {
    for (const r of await q(`SELECT l.id, l.state FROM broker.leases l JOIN pg_roles r ON r.rolname = l.username WHERE l.state IN ('expired', 'revoked')`)) {
      problems.push(`${r.state} lease ${r.id} still has its role`);
    }
    for (const r of await q(`SELECT id, state, last_error FROM broker.leases WHERE state IN ('revoking', 'revoke_failed')`)) {
      problems.push(`lease ${r.id} still ${r.state} (${r.last_error})`);
    }
  }
  for (const r of await q(`SELECT l.id, count(*) FILTER (WHERE e.type = 'credential.issued')::int AS created,
                                  count(*) FILTER (WHERE e.type IN ('lease.expired', 'lease.revoked'))::int AS ended, l.state
                             FROM broker.leases l LEFT JOIN broker.audit_events e ON e.lease_id = l.id GROUP BY l.id, l.state`)) {
    if (r.created !== 1) problems.push(`lease ${r.id} has ${r.created} credential.issued events`);
    if (r.ended > 1 || (['expired', 'revoked'].includes(r.state) && r.ended !== 1)) problems.push(`${r.state} lease ${r.id} has ${r.ended} ending events`);
  }
  // A session whose role was dropped shows no usename: ended leases have no roles, so any such
  // client backend is a session that outlived its lease.
  for (const r of await q(`SELECT pid FROM pg_stat_activity a WHERE backend_type = 'client backend' AND usesysid IS NOT NULL
                              AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = a.usesysid)`)) {
    problems.push(`backend ${r.pid} runs as a dropped role`);
  }
  for (const r of await q(`SELECT a.pid, l.id, l.state FROM pg_stat_activity a JOIN broker.leases l ON l.username = a.usename WHERE l.state IN ('expired', 'revoked')`)) {
    problems.push(`backend ${r.pid} of ${r.state} lease ${r.id}`);
  }
  return problems;
}

/** With DEBUG_BATTERY set, the brokers' error lines and PostgreSQL's deadlock reports. */
function dumpErrors(): void {
  if (!process.env.DEBUG_BATTERY) return;
  for (const line of [...b1.logs, ...b2.logs]) if (/"level":(50|60)/.test(line)) console.log(line.slice(0, 3000));
  const lines = b1.pg.logLines();
  lines.forEach((l, i) => { if (/deadlock detected/.test(l)) console.log(lines.slice(i, i + 12).join('\n').slice(0, 6000)); });
}

/** Runs both reapers until no teardown is left (bounded), then asserts the invariants. */
async function settleAndCheck(label: string): Promise<void> {
  await waitFor(`${label}: teardowns to finish`, async () => {
    await Promise.all([b1.reaper.reap({ requireLeadership: false }), b2.reaper.reap({ requireLeadership: false })]);
    const [{ n }] = await b1.pg.query(`SELECT count(*)::int AS n FROM broker.leases WHERE state IN ('revoking', 'revoke_failed')
                                         OR (state = 'active' AND expires_at <= now())`);
    return n === 0;
  }, 20_000, 100);
  assert.deepEqual(await checkInvariants(true), [], label);
}

describe('a CI fan-out: 100 concurrent requests of one identity over two replicas', () => {
  test('never more leases than max_active_leases, and each refused request leaves no lease and no role', async () => {
    await b1.putPolicy('fanout', { claims: { sub: 'ci:*' }, max_active_leases: 7, default_ttl: 60 });
    const token = await b1.token({ sub: 'ci:fanout' });
    const rolesBefore = (await b1.pg.query(`SELECT count(*)::int AS n FROM pg_roles`))[0].n;
    const results = await Promise.all(Array.from({ length: 100 }, () => pick(brokers()).issue(token)));
    const statuses = results.map((r) => r.status);
    assert.equal(statuses.filter((s) => s === 201).length, 7, JSON.stringify(statuses));
    assert.equal(statuses.filter((s) => s === 429).length, 93, JSON.stringify(statuses));
    const [{ n }] = await b1.pg.query(`SELECT count(*)::int AS n FROM broker.leases WHERE subject = 'ci:fanout'`);
    assert.equal(n, 7);
    assert.equal((await b1.pg.query(`SELECT count(*)::int AS n FROM pg_roles`))[0].n, rolesBefore + 7);
    const [{ denied }] = await b1.pg.query(`SELECT count(*)::int AS denied FROM broker.audit_events WHERE subject = 'ci:fanout' AND type = 'credential.denied'`);
    assert.equal(denied, 93);
    assert.deepEqual(await checkInvariants(false), []);
    // Half end (by id, at once, on both replicas), and the refill races the quota again.
    const mine = results.filter((r) => r.status === 201).map((r) => r.body);
    const refill = await Promise.all([
      ...mine.slice(0, 4).map((c) => api(pick(brokers()), 'DELETE', `/leases/${c.lease_id}`, token)),
      ...Array.from({ length: 40 }, () => pick(brokers()).issue(token)),
    ]);
    assert.ok(refill.slice(0, 4).every((r) => r.status === 200), JSON.stringify(refill.slice(0, 4)));
    const [{ live }] = await b1.pg.query(`SELECT count(*)::int AS live FROM broker.leases WHERE subject = 'ci:fanout' AND state = 'active'`);
    assert.ok(live <= 7, `${live} active leases`);
    await api(b1, 'POST', '/leases/revoke', await admin(), { subject: 'ci:fanout' });
    await settleAndCheck('fan-out');
  });
});

describe('a bulk revocation by subject racing issuance, renewal and DELETE of that subject', () => {
  test('once it answers, no lease issued before it is active or can log in, and nothing is left ending', async () => {
    await b1.putPolicy('leavers', { claims: { sub: 'leaver:*' }, max_active_leases: 100, default_ttl: 60, max_ttl: 600 });
    for (let round = 0; round < 3; round++) {
      const sub = `leaver:r${round}`;
      const token = await b1.token({ sub });
      const held = (await Promise.all(Array.from({ length: 12 }, () => pick(brokers()).issue(token)))).map((r) => {
        assert.equal(r.status, 201, JSON.stringify(r.body));
        return r.body;
      });
      // Sessions of some of them, which the revocation must end.
      const sessions = await Promise.all(held.slice(0, 3).map((c) => connectAs(b1.pg, c)));
      const issuedBefore = new Set(held.map((c) => c.lease_id));
      const lateIssued: any[] = [];
      let revokeSentAt = 0;
      let revokeAnswer: { status: number; body: any } | null = null;
      let afterAnswer: string[] = [];
      const revoke = (async () => {
        await sleep(5 + round * 10);
        revokeSentAt = Date.now();
        revokeAnswer = await api(pick(brokers()), 'POST', '/leases/revoke', await admin(), { subject: sub });
        // Checked at once, before anything else may finish a teardown for it.
        afterAnswer = (await b1.pg.query(
          `SELECT l.id, l.state, r.rolcanlogin FROM broker.leases l LEFT JOIN pg_roles r ON r.rolname = l.username
            WHERE l.id = ANY($1::uuid[]) AND (l.state = 'active' OR r.rolcanlogin)`, [[...issuedBefore]]))
          .map((r) => `${r.id} ${r.state} login=${r.rolcanlogin}`);
      })();
      const others = [
        ...Array.from({ length: 15 }, async () => {
          const r = await pick(brokers()).issue(token);
          if (r.status === 201) {
            // Answered before the revocation was even sent: it must be ended by it.
            if (revokeSentAt === 0) issuedBefore.add(r.body.lease_id);
            lateIssued.push(r.body);
          }
          return r.status;
        }),
        ...held.slice(3, 8).map((c) => api(pick(brokers()), 'POST', `/leases/${c.lease_id}/renew`, token, { ttl: 300 }).then((r) => r.status)),
        ...held.slice(8, 11).map((c) => api(pick(brokers()), 'DELETE', `/leases/${c.lease_id}`, token).then((r) => r.status)),
      ];
      const statuses = await Promise.all(others);
      await revoke;
      assert.ok(revokeAnswer, 'revocation answered');
      const answer = revokeAnswer as { status: number; body: any };
      assert.equal(answer.status, 200, JSON.stringify(answer.body));
      assert.deepEqual(afterAnswer, [], `round ${round}: leases issued before the revocation still live after its 200`);
      for (const s of statuses) assert.ok([200, 201, 409, 503].includes(s), `round ${round}: ${statuses}`);
      for (const c of held.slice(0, 2)) assert.equal(await canLogIn(b1.pg, c), false);
      // Their sessions were ended with them (issued before the revocation, none renewed or deleted).
      for (const s of sessions) await assert.rejects(s.query('SELECT 1'));
      for (const s of sessions) await s.end().catch(() => undefined);
      // What was issued after it may live on; end it for the checks.
      await api(b1, 'POST', '/leases/revoke', await admin(), { subject: sub });
      await settleAndCheck(`bulk round ${round}`);
    }
  });
});

describe('renewals racing expiry and two reapers at once', () => {
  test('a renewed lease\'s VALID UNTIL always matches it, and no ended lease is renewed', async () => {
    await b1.putPolicy('short', { claims: { sub: 'short:*' }, max_active_leases: 100, default_ttl: 1, max_ttl: 8 });
    const token = await b1.token({ sub: 'short:renewer' });
    // 2-3 s: the first renewals go out only once all 16 are answered, and must find some alive.
    const creds = (await Promise.all(Array.from({ length: 16 }, (_, i) => pick(brokers()).issue(token, { ttl: 2 + (i % 2) })))).map((r) => {
      assert.equal(r.status, 201, JSON.stringify(r.body));
      return r.body;
    });
    const stopAt = Date.now() + 4000;
    const answers: Record<string, number> = {};
    const badRenewals: string[] = [];
    const renewer = async (c: any) => {
      while (Date.now() < stopAt) {
        const sentAt = Date.now();
        const r = await api(pick(brokers()), 'POST', `/leases/${c.lease_id}/renew`, token, { ttl: 1 });
        answers[r.status] = (answers[r.status] ?? 0) + 1;
        if (r.status === 200 && new Date(r.body.expires_at).getTime() < sentAt) badRenewals.push(`${c.lease_id} renewed to ${r.body.expires_at}, before it was asked`);
        if (r.status === 409) return;
        await sleep(Math.random() * 2200);
      }
    };
    const reaping = (async () => {
      while (Date.now() < stopAt) {
        await Promise.all([b1.reaper.reap({ requireLeadership: false }), b2.reaper.reap({ requireLeadership: false })]);
        await sleep(50);
      }
    })();
    const mid: string[] = [];
    const sampling = (async () => {
      while (Date.now() < stopAt) {
        mid.push(...await checkInvariants(false));
        await sleep(200);
      }
    })();
    await Promise.all([...creds.map(renewer), reaping, sampling]);
    assert.deepEqual(badRenewals, []);
    assert.deepEqual([...new Set(mid)], [], 'invariants while renewals raced the reapers');
    const renewedAfterEnd = await b1.pg.query(
      `SELECT e.lease_id FROM broker.audit_events e JOIN broker.audit_events x ON x.lease_id = e.lease_id AND x.type IN ('lease.expired', 'lease.revoked')
        WHERE e.type = 'lease.renewed' AND e.id > x.id`);
    assert.deepEqual(renewedAfterEnd, []);
    assert.ok((answers[200] ?? 0) > 0 && (answers[409] ?? 0) > 0, JSON.stringify(answers));
    await settleAndCheck('renewal race');
  });
});

describe('policy changes racing issuance under the policy', () => {
  test('a request sent after a change that refuses the token answered is never issued', async () => {
    const name = 'flip';
    const base = { claims: { sub: 'flip:*' }, max_active_leases: 1000, default_ttl: 30 };
    await b1.putPolicy(name, base);
    const token = await b1.token({ sub: 'flip:a' });
    const problems: string[] = [];
    // Each change counts one step: odd while a refusing change has answered and the change that
    // admits again has not been sent yet. A request sent and answered within one odd step was
    // wholly after the refusal and before anything admitted again, so it must not be issued.
    let step = 0;
    let stop = false;
    const issuer = async () => {
      while (!stop) {
        const sentIn = step;
        const b = pick(brokers());
        const r = await b.issue(token);
        if (sentIn % 2 === 1 && step === sentIn && r.status === 201) problems.push(`issued ${r.body.lease_id} by b${brokers().indexOf(b) + 1} though a refusing change had answered`);
        if (![201, 403].includes(r.status)) problems.push(`issue ${r.status} ${JSON.stringify(r.body)}`);
      }
    };
    const adminTok = await admin();
    const changes = [
      () => api(pick(brokers()), 'PUT', `/policies/${name}`, adminTok, { issuer: b1.issuer.issuer, database: b1.pg.database, grant_role: 'app_readers', ...base, enabled: false }),
      () => api(pick(brokers()), 'DELETE', `/policies/${name}`, adminTok),
      () => api(pick(brokers()), 'PUT', `/policies/${name}`, adminTok, { issuer: b1.issuer.issuer, database: b1.pg.database, grant_role: 'app_readers', ...base, claims: { sub: 'flip:b*' } }),
    ];
    const changer = (async () => {
      for (let i = 0; i < 12; i++) {
        await sleep(40);
        const refuse = changes[i % changes.length];
        const r = await refuse();
        assert.ok([200, 204].includes(r.status), JSON.stringify(r.body));
        step++;
        await sleep(40);
        step++;
        const back = await api(pick(brokers()), 'PUT', `/policies/${name}`, adminTok, { issuer: b1.issuer.issuer, database: b1.pg.database, grant_role: 'app_readers', ...base });
        assert.ok([200, 201].includes(back.status), JSON.stringify(back.body));
      }
      stop = true;
    })();
    await Promise.all([changer, ...Array.from({ length: 6 }, issuer)]);
    assert.deepEqual(problems, []);
    await api(b1, 'POST', '/leases/revoke', adminTok, { subject: 'flip:a' });
    await settleAndCheck('policy race');
  });
});

/** A superuser session in the broker database, for holding locks the broker must wait on. */
async function superSession(): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: b1.pg.superuserUrl.replace(/\/[^/?]*(\?|$)/, '/broker$1') });
  client.on('error', () => undefined);
  await client.connect();
  return client;
}

describe('a renewal whose commit comes after its lease\'s expiry has passed', () => {
  test('and a lease issued to the same identity meanwhile never hold more than max_active_leases together', async () => {
    await b1.putPolicy('one', { claims: { sub: 'one:*' }, max_active_leases: 1, default_ttl: 2, max_ttl: 60 });
    // Stands in for whatever delays a renewal's COMMIT (its audit INSERT, the network, a busy server)
    // after it checked the lease's expiry: its event waits on a lock this test holds.
    await b1.pg.query(`CREATE FUNCTION public.battery_gate() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN IF NEW.type = 'lease.renewed' AND NEW.subject LIKE 'one:renewer-%' THEN PERFORM pg_advisory_xact_lock(4242); END IF; RETURN NEW; END $$`);
    await b1.pg.query('CREATE TRIGGER battery_gate BEFORE INSERT ON broker.audit_events FOR EACH ROW EXECUTE FUNCTION public.battery_gate()');
    const gate = await superSession();
    const advisoryWaits = async () => (await b1.pg.query(
      `SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory' AND usename = 'broker'`))[0].n;
    try {
      // The window is narrow by nature: the renewal must reach its event before the lease expires,
      // and then wait there under a second (its lock_timeout) while the lease expires and an
      // issuance queues. A machine too busy for that window gets another attempt, with a new identity.
      for (let attempt = 1; ; attempt++) {
        const sub = `one:renewer-${attempt}`;
        const token = await b1.token({ sub });
        await gate.query('SELECT pg_advisory_lock(4242)');
        const first = await b1.issue(token, { ttl: 2 });
        assert.equal(first.status, 201, JSON.stringify(first.body));
        const expiry = new Date(first.body.expires_at).getTime();
        await sleep(expiry - Date.now() - 700);
        let renewAnswered = false;
        const renewing = api(b1, 'POST', `/leases/${first.body.lease_id}/renew`, token, { ttl: 30 }).finally(() => { renewAnswered = true; });
        await waitFor('the renewal to wait at its event', async () => renewAnswered || (await advisoryWaits()) >= 1);
        const inTime = !renewAnswered && Date.now() < expiry - 20;
        await untilPast(first.body.expires_at);
        let issuedAnswered = false;
        const issuing = b2.issue(token).finally(() => { issuedAnswered = true; });
        // Either the issuance is answered, or it queues behind the renewal on the identity.
        await waitFor('the issuance to be answered or to wait', async () => issuedAnswered || (await advisoryWaits()) >= 2);
        await gate.query('SELECT pg_advisory_unlock(4242)');
        const [renewed, issued] = await Promise.all([renewing, issuing]);
        const [{ live }] = await b1.pg.query(
          `SELECT count(*)::int AS live FROM broker.leases WHERE subject = $1 AND state = 'active' AND expires_at > now()`, [sub]);
        // Whatever the timing, never two.
        assert.ok(live <= 1, `max_active_leases 1, yet ${live} live leases: renewal ${renewed.status}, issuance ${issued.status}`);
        assert.deepEqual(await checkInvariants(false), []);
        await api(b1, 'POST', '/leases/revoke', await admin(), { subject: sub });
        if (!inTime || renewed.status === 503) {
          assert.ok(attempt < 5, `no attempt had the renewal wait across the expiry (last: renewal ${renewed.status}, issuance ${issued.status})`);
          continue;
        }
        // The issuance waited for the renewal, and then counted the renewed lease.
        assert.deepEqual([renewed.status, issued.status], [200, 429]);
        break;
      }
    } finally {
      await gate.end();
      await b1.pg.query('DROP TRIGGER battery_gate ON broker.audit_events; DROP FUNCTION public.battery_gate()');
    }
    await settleAndCheck('renewal across expiry');
  });

  test('a renewal waits on its identity\'s requests at most a second, then answers DATABASE_BUSY with nothing changed', async () => {
    const token = await b1.token({ sub: 'one:waiter' });
    const cred = (await b1.issue(token, { ttl: 30 })).body;
    const holder = await superSession();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [identityLockKey(b1.issuer.issuer, 'one:waiter')]);
      const started = Date.now();
      const busy = await api(b1, 'POST', `/leases/${cred.lease_id}/renew`, token, { ttl: 60 });
      assert.equal(busy.status, 503, JSON.stringify(busy.body));
      assert.equal(busy.body.code, 'DATABASE_BUSY');
      assert.ok(Date.now() - started < 5000, `waited ${Date.now() - started} ms`);
    } finally {
      await holder.query('ROLLBACK');
      await holder.end();
    }
    const [row] = await b1.pg.query('SELECT expires_at FROM broker.leases WHERE id = $1', [cred.lease_id]);
    assert.equal(row.expires_at.toISOString(), cred.expires_at);
    assert.equal((await api(b1, 'POST', `/leases/${cred.lease_id}/renew`, token, { ttl: 60 })).status, 200);
    await api(b1, 'POST', '/leases/revoke', await admin(), { subject: 'one:waiter' });
  });
});

describe('an issuance that read its policies afresh, in its first statement', () => {
  test('is not issued once a change that refuses its token committed before its lease INSERT', async () => {
    await b1.putPolicy('fresh', { claims: { sub: 'fresh:*' } });
    // A replica that has kept no policies yet reads them in the statement that takes the identity lock.
    const b3 = await startTestBroker({ pg: b1.pg, issuer: b1.issuer, env: ENV });
    const locker = await superSession();
    try {
      // Holds back the lease INSERT only (the policy read and the change touch no lease), as a
      // slow round trip between the two statements would.
      await locker.query('BEGIN; LOCK TABLE broker.leases IN EXCLUSIVE MODE');
      const issuing = b3.issue(await b3.token({ sub: 'fresh:x' }));
      await waitFor('the lease INSERT to wait', async () => (await b1.pg.query(
        `SELECT 1 FROM pg_stat_activity WHERE usename = 'broker' AND wait_event_type = 'Lock' AND wait_event = 'relation'`)).length > 0);
      const disabled = await api(b1, 'PUT', '/policies/fresh', await admin(),
        { issuer: b1.issuer.issuer, database: b1.pg.database, grant_role: 'app_readers', claims: { sub: 'fresh:*' }, enabled: false });
      assert.equal(disabled.status, 200, JSON.stringify(disabled.body));
      await locker.query('COMMIT');
      const res = await issuing;
      assert.equal(res.status, 403, `issued under the policy as it was before it was disabled: lease ${res.body.lease_id ?? res.body.code}`);
    } finally {
      await locker.end();
      await b3.close();
    }
    await api(b1, 'POST', '/leases/revoke', await admin(), { subject: 'fresh:x' });
    await settleAndCheck('fresh policies');
  });
});

describe('a bulk revocation by subject meeting a lease of the subject whose teardown is stuck before NOLOGIN', () => {
  test('does not answer 200 while that lease\'s login still works', async () => {
    await b1.putPolicy('stuck', { claims: { sub: 'stuck:*' } });
    const token = await b1.token({ sub: 'stuck:leaver' });
    const cred = (await b1.issue(token)).body;
    // The role's catalogue row, held by a prepared transaction of its own: NOLOGIN waits its lock
    // timeout (10 s), and no session can be ended to free it.
    const session = await connectAs(b1.pg, cred);
    await session.query(`BEGIN; ALTER ROLE "${cred.username}" PASSWORD NULL; PREPARE TRANSACTION 'battery-${cred.username}'`);
    await session.end();
    let deleting: Promise<{ status: number }> | null = null;
    try {
      deleting = api(b2, 'DELETE', `/leases/${cred.lease_id}`, token);
      await waitFor('the DELETE to wait on NOLOGIN', async () => (await b1.pg.query(
        `SELECT 1 FROM broker.leases l JOIN pg_stat_activity a ON a.pid = l.claimed_by_pid OR a.wait_event_type = 'Lock'
          WHERE l.id = $1 AND l.state = 'revoking' AND a.usename = 'broker' AND a.wait_event_type = 'Lock'`, [cred.lease_id])).length > 0);
      // Let go a second after the bulk revocation is sent: the DELETE's NOLOGIN then goes through.
      // (The broker rolls it back itself once NOLOGIN's lock wait has timed out; 42704: it got there first.)
      const release = sleep(1000).then(() => b1.pg.query(`ROLLBACK PREPARED 'battery-${cred.username}'`))
        .catch((err: { code?: string }) => { if (err.code !== '42704') throw err; });
      const bulk = await api(b1, 'POST', '/leases/revoke', await admin(), { subject: 'stuck:leaver' });
      const loginWorks = await canLogIn(b1.pg, cred);
      assert.ok(!(bulk.status === 200 && loginWorks), `bulk revocation answered 200 ${JSON.stringify(bulk.body)} while the subject's credential still logs in`);
      assert.equal(bulk.status, 200, JSON.stringify(bulk.body));
      await release;
    } finally {
      await b1.pg.query(`ROLLBACK PREPARED 'battery-${cred.username}'`).catch(() => undefined);
      await deleting;
    }
    await settleAndCheck('stuck teardown');
  });
});

describe('everything at once on two replicas, for a few seconds', () => {
  test('issuance, renewal, DELETE, bulk revocations by subject and by policy, policy changes and both reapers leave the invariants whole', async () => {
    const adminTok = await admin();
    const policy = (claims: string, extra: Record<string, unknown> = {}) => ({
      issuer: b1.issuer.issuer, database: b1.pg.database, grant_role: 'app_readers', claims: { sub: claims }, max_active_leases: 4, default_ttl: 2, max_ttl: 6, ...extra,
    });
    await api(b1, 'PUT', '/policies/mix', adminTok, policy('mix:*'));
    const subs = ['mix:a', 'mix:b', 'mix:c', 'mix:d'];
    const tokens = new Map(await Promise.all(subs.map(async (s) => [s, await b1.token({ sub: s })] as const)));
    const live: Array<{ sub: string; cred: any }> = [];
    const unexpected: string[] = [];
    const stopAt = Date.now() + 5000;
    const expect = (what: string, status: number, allowed: number[], body: any) => {
      if (!allowed.includes(status)) unexpected.push(`${what} ${status} ${JSON.stringify(body?.code ?? body)}`);
    };
    const worker = async () => {
      while (Date.now() < stopAt) {
        const sub = pick(subs);
        const token = tokens.get(sub)!;
        const r = Math.random();
        if (r < 0.45) {
          const res = await pick(brokers()).issue(token, { ttl: 1 + Math.floor(Math.random() * 3) });
          expect('issue', res.status, [201, 403, 429], res.body);
          if (res.status === 201) live.push({ sub, cred: res.body });
        } else if (r < 0.7 && live.length > 0) {
          const { sub: owner, cred } = pick(live);
          const res = await api(pick(brokers()), 'POST', `/leases/${cred.lease_id}/renew`, tokens.get(owner)!, { ttl: 2 });
          expect('renew', res.status, [200, 403, 409, 503], res.body);
        } else if (r < 0.85 && live.length > 0) {
          const { sub: owner, cred } = pick(live);
          const res = await api(pick(brokers()), 'DELETE', `/leases/${cred.lease_id}`, tokens.get(owner)!);
          expect('delete', res.status, [200], res.body);
        } else if (r < 0.93) {
          const res = await api(pick(brokers()), 'POST', '/leases/revoke', adminTok, Math.random() < 0.7 ? { subject: sub } : { policy: 'mix' });
          expect('bulk', res.status, [200], res.body);
        } else {
          const res = await api(pick(brokers()), 'PUT', '/policies/mix', adminTok, policy('mix:*', { enabled: Math.random() < 0.7, max_active_leases: 2 + Math.floor(Math.random() * 4) }));
          expect('policy', res.status, [200], res.body);
        }
      }
    };
    const reaping = (async () => {
      while (Date.now() < stopAt) {
        await Promise.all([b1.reaper.reap({ requireLeadership: false }), b2.reaper.reap({ requireLeadership: false })]);
        await sleep(100);
      }
    })();
    const sampled: string[] = [];
    const sampling = (async () => {
      while (Date.now() < stopAt) {
        sampled.push(...await checkInvariants(false));
        // The quota as of the policy now: never more live leases than it, per subject.
        sampled.push(...(await b1.pg.query(
          `SELECT l.subject, count(*)::int AS n, p.max_active_leases AS max FROM broker.leases l JOIN broker.policies p ON p.name = l.policy
            WHERE l.policy = 'mix' AND l.state = 'active' AND l.expires_at > now() GROUP BY l.subject, p.max_active_leases HAVING count(*) > 5`))
          .map((r) => `${r.subject} holds ${r.n} live leases`));
        await sleep(150);
      }
    })();
    await Promise.all([...Array.from({ length: 8 }, worker), reaping, sampling]);
    if (unexpected.length) dumpErrors();
    assert.deepEqual(unexpected, []);
    assert.deepEqual([...new Set(sampled)], [], 'invariants sampled under load');
    await api(b1, 'PUT', '/policies/mix', adminTok, policy('mix:*', { enabled: false }));
    await api(b1, 'POST', '/leases/revoke', adminTok, { policy: 'mix' });
    await settleAndCheck('everything at once');
  });
});

describe('bulk revocations by subject and by policy at once, with the reapers', () => {
  test('never answer 500: their row locks are taken in one order, so they cannot deadlock', async () => {
    await b1.putPolicy('overlap', { claims: { sub: 'ov:*' }, max_active_leases: 100, default_ttl: 60 });
    const adminTok = await admin();
    const subs = ['ov:a', 'ov:b', 'ov:c'];
    const tokens = await Promise.all(subs.map((sub) => b1.token({ sub })));
    const failures: string[] = [];
    // Bounded: a deadlock needs two statements' lock orders to cross, which a round hits by chance.
    for (let round = 0; round < 12 && failures.length === 0; round++) {
      const issued = await Promise.all(tokens.flatMap((t) => Array.from({ length: 8 }, () => pick(brokers()).issue(t))));
      assert.ok(issued.every((r) => r.status === 201));
      const answers = await Promise.all([
        ...subs.map((subject) => api(pick(brokers()), 'POST', '/leases/revoke', adminTok, { subject })),
        api(pick(brokers()), 'POST', '/leases/revoke', adminTok, { policy: 'overlap' }),
        api(pick(brokers()), 'POST', '/leases/revoke', adminTok, { policy: 'overlap' }),
      ]);
      for (const a of answers) if (a.status !== 200) failures.push(`round ${round}: ${a.status} ${a.body?.code}`);
    }
    if (failures.length) dumpErrors();
    assert.deepEqual(failures, []);
    await settleAndCheck('overlapping bulk revocations');
  });
});
