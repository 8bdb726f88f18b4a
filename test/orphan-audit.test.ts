import assert from 'node:assert/strict';
import { after, before, describe, test, type TestContext } from 'node:test';
import pg from 'pg';
import { reapOrphans, recordOrphanDropFailures } from '../src/reaper/orphans.js';
import { api, roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';

// A managed login that outlived every lease and could not be dropped is on the audit trail, not
// only in the log: one role.orphan_drop_failed per failed attempt, as often as the sweep's rest
// lets it try.
let b: TestBroker;

before(async () => {
  // Lock waits end after 1 s, so a drop blocked on the role's row fails at NOLOGIN quickly.
  b = await startTestBroker({ env: { BROKER_LOCK_TIMEOUT: '1' } });
});
after(async () => b?.close());

interface Event { id: string; type: string; issuer: string | null; subject: string | null; lease_id: string | null; policy: string | null; username: string; reason: string; request_id: string | null; client_ip: string | null; detail: any }

// Ordered by the bigint column: `id` alone would be the text alias, and '100' sorts before '99'.
const events = (username: string) => b.pg.query<Event>(
  `SELECT e.id::text AS id, type, issuer, subject, lease_id, policy, username, reason, request_id, client_ip, detail
     FROM broker.audit_events e WHERE username = $1 ORDER BY e.id`, [username]);
const failures = async (username: string) => (await events(username)).filter((e) => e.type === 'role.orphan_drop_failed');

/** One sweep, as the reaper runs it after its leases; `batchSize` as if that many others came first. */
const sweep = (batchSize?: number) => reapOrphans({
  pool: b.app.db, databaseUrl: b.config.databaseUrl, managedRole: b.config.managedRole, log: b.app.log, timeouts: b.config, retryBaseSeconds: 1, batchSize,
});

/** The error the sweep logged for the role's latest failure. */
function loggedErrors(username: string): string[] {
  return b.logs.map((l) => JSON.parse(l)).filter((l) => l.msg === 'could not drop orphaned managed role' && l.username === username).map((l) => l.error);
}

/**
 * An orphan with a login, made by the broker as a lost lease row leaves one, that owns a table in
 * `database`, which takes no connections until `open()`: its group could take the table then.
 */
async function stuckOrphan(name: string, database: string): Promise<{ open(): Promise<void> }> {
  await b.app.db.query(`CREATE ROLE ${name} LOGIN IN ROLE app_readers, credential_broker_managed`);
  await b.pg.query(`CREATE DATABASE ${database} CONNECTION LIMIT 0`, [], 'postgres');
  await b.pg.query(`CREATE TABLE public.kept (id int); ALTER TABLE public.kept OWNER TO ${name}`, [], database);
  return { open: () => b.pg.query(`ALTER DATABASE ${database} CONNECTION LIMIT -1`, [], 'postgres').then(() => undefined) };
}

/** Date.now() under the test's control from here on; pg's timers are left alone. */
function freezeClock(t: TestContext): { now(): number; advance(seconds: number): void } {
  const start = Date.now();
  t.mock.timers.enable({ apis: ['Date'], now: start });
  return { now: () => Date.now(), advance: (seconds) => t.mock.timers.tick(seconds * 1000) };
}

describe('a failed orphan drop', () => {
  test('writes role.orphan_drop_failed with the error and the next attempt; the sweep\'s rest bounds repeats; a later success writes role.orphan_dropped', async (t) => {
    const gate = await stuckOrphan('oa_stuck', 'oa_sealed1');
    const clock = freezeClock(t);
    const first = clock.now();
    assert.equal(await sweep(), 0);
    assert.equal(await roleExists(b.pg, 'oa_stuck'), true);
    const [event, ...more] = await failures('oa_stuck');
    assert.equal(more.length, 0, 'one event for one failed attempt');
    const [logged] = loggedErrors('oa_stuck');
    assert.match(logged, /oa_sealed1: 53300/);
    assert.deepEqual({ ...event, id: undefined }, {
      id: undefined, type: 'role.orphan_drop_failed', issuer: null, subject: null, lease_id: null, policy: null, username: 'oa_stuck',
      reason: logged, request_id: null, client_ip: null,
      detail: { attempt: 1, login_disabled: true, retry_scheduled: true, next_attempt_at: new Date(first + 60_000).toISOString() },
    });
    const [role] = await b.pg.query<{ rolcanlogin: boolean }>(`SELECT rolcanlogin FROM pg_roles WHERE rolname = 'oa_stuck'`);
    assert.equal(role.rolcanlogin, false, 'login_disabled says what the catalogue holds');

    // Swept every 10 s (BROKER_REAPER_INTERVAL's default) for 10 minutes: tried, and recorded, only
    // when its rest is over (after 60, 120 and 240 s), not 60 times.
    for (let second = 10; second < 600; second += 10) {
      clock.advance(10);
      assert.equal(await sweep(), 0, `at ${second} s`);
    }
    const repeated = await failures('oa_stuck');
    assert.deepEqual(repeated.map((e) => [e.detail.attempt, e.detail.next_attempt_at]), [
      [1, new Date(first + 60_000).toISOString()],
      [2, new Date(first + (60 + 120) * 1000).toISOString()],
      [3, new Date(first + (180 + 240) * 1000).toISOString()],
      [4, new Date(first + (420 + 480) * 1000).toISOString()],
    ]);
    assert.deepEqual(repeated.map((e) => e.reason), loggedErrors('oa_stuck'), 'each event holds its attempt\'s logged error');

    await gate.open();
    clock.advance(900 - 590);
    assert.equal(await sweep(), 1);
    assert.equal(await roleExists(b.pg, 'oa_stuck'), false);
    const all = await events('oa_stuck');
    assert.deepEqual(all.map((e) => e.type), [...Array(4).fill('role.orphan_drop_failed'), 'role.orphan_dropped']);
    assert.deepEqual([all[4].reason, all[4].detail], ['managed role without a live lease', { reassigned_to: 'app_readers' }], 'recorded as before');

    t.mock.timers.reset();
    // GET /audit takes the type as a filter (AUDIT_TYPES), and finds it by username.
    const page = await api(b, 'GET', '/audit?type=role.orphan_drop_failed&username=oa_stuck', await b.adminToken());
    assert.equal(page.status, 200, JSON.stringify(page.body));
    assert.deepEqual(page.body.items.map((e: Event) => e.id), repeated.map((e) => e.id).reverse());
  });

  test('stopped at NOLOGIN says the login was not disabled', async () => {
    await b.pg.query(`CREATE ROLE oa_held LOGIN IN ROLE credential_broker_managed ADMIN broker`, [], 'postgres');
    // Another session's open ALTER ROLE holds the role's catalogue row: NOLOGIN waits, then times out.
    const holder = new pg.Client({ connectionString: b.pg.superuserUrl });
    holder.on('error', () => undefined);
    await holder.connect();
    try {
      await holder.query('BEGIN; ALTER ROLE oa_held CONNECTION LIMIT 7');
      assert.equal(await sweep(), 0);
    } finally {
      await holder.query('ROLLBACK').catch(() => undefined);
      await holder.end();
    }
    const [event, ...more] = await failures('oa_held');
    assert.equal(more.length, 0);
    assert.match(event.reason, /^NOLOGIN: 55P03/);
    assert.deepEqual([event.reason, event.detail.login_disabled, event.detail.attempt], [loggedErrors('oa_held')[0], false, 1]);
    await b.pg.query('DROP ROLE oa_held', [], 'postgres');
  });
});

describe('failing orphans beyond one sweep\'s batch', () => {
  test('keep their rest and attempt count when a sweep does not reach them', async (t) => {
    await stuckOrphan('oa_batch1', 'oa_sealed2');
    await stuckOrphan('oa_batch2', 'oa_sealed3');
    const clock = freezeClock(t);
    const first = clock.now();
    // One orphan per sweep: each fails once, 10 s apart.
    assert.equal(await sweep(1), 0);
    clock.advance(10);
    assert.equal(await sweep(1), 0);
    // Both rests are over; this sweep reaches only the first by name, the next one the second.
    clock.advance(90);
    assert.equal(await sweep(1), 0);
    clock.advance(10);
    assert.equal(await sweep(1), 0);
    const second = (await failures('oa_batch2')).map((e) => [e.detail.attempt, e.detail.next_attempt_at]);
    assert.deepEqual(second, [[1, new Date(first + 70_000).toISOString()], [2, new Date(first + 110_000 + 120_000).toISOString()]],
      'its second failure backs off as its second, not as a first again');
    t.mock.timers.reset();
    // Gone before the next tests sweep, whatever their rests.
    for (const [name, database] of [['oa_batch1', 'oa_sealed2'], ['oa_batch2', 'oa_sealed3']]) {
      await b.pg.query('DROP TABLE public.kept', [], database);
      await b.pg.query(`DROP ROLE ${name}`, [], 'postgres');
    }
  });
});

describe('an orphan dropped at the first attempt', () => {
  test('leaves role.orphan_dropped and no role.orphan_drop_failed', async () => {
    await b.pg.query(`CREATE ROLE oa_free LOGIN IN ROLE credential_broker_managed ADMIN broker`, [], 'postgres');
    assert.equal(await sweep(), 1);
    assert.equal(await roleExists(b.pg, 'oa_free'), false);
    assert.deepEqual((await events('oa_free')).map((e) => e.type), ['role.orphan_dropped']);
  });
});

describe('a failure recorded for a role already gone', () => {
  test('is not written: a concurrent sweep dropped it, with its role.orphan_dropped', async () => {
    await b.pg.query('CREATE ROLE oa_present NOLOGIN', [], 'postgres');
    const retryAt = new Date(Date.now() + 60_000);
    await recordOrphanDropFailures(b.app.db, b.config.managedRole, ['oa_present', 'oa_gone'].map((rolname) => ({ rolname, error: 'DROP ROLE: 55P03: lock timeout', attempt: 1, retryAt })));
    assert.deepEqual((await failures('oa_present')).map((e) => [e.reason, e.detail.login_disabled]), [['DROP ROLE: 55P03: lock timeout', true]]);
    assert.deepEqual(await failures('oa_gone'), []);
    await b.pg.query('DROP ROLE oa_present', [], 'postgres');
  });
});
