import assert from 'node:assert/strict';
import { test } from 'node:test';
import { retryDelaySeconds } from '../../src/leases/finish.js';
import { disableLogins, loginStillEnabled, teardownRoles } from '../../src/leases/teardown.js';
import { describeError, stepEach, TeardownResult, type RoleToDrop, type TeardownDeps, type TeardownRun } from '../../src/leases/teardown-steps.js';

// The teardown's bookkeeping when statements fail in ways a real server does not produce on cue
// (the server gone at one step and not the next, a batch refused for one role only). These drive
// teardownRoles through a stand-in pool that answers by statement; the same code runs against real
// PostgreSQL, outages and refused databases included, in teardown-faults, teardown-retry, lifecycle
// and the crash and outage suites.
const roles: RoleToDrop[] = ['lease_a', 'lease_b', 'lease_c'].map((username) => ({ username, reassign_to: 'app' }));
const fresh = (): TeardownResult => new TeardownResult(roles.map((r) => [r.username, null]));

test('a batch that fails for one role is retried role by role, so the others still get through', async () => {
  const calls: string[][] = [];
  const result = fresh();
  const ok = await stepEach(roles, result, 'drop', async (batch) => {
    calls.push(batch.map((r) => r.username));
    if (batch.some((r) => r.username === 'lease_b')) throw Object.assign(new Error('role "lease_b" cannot be dropped'), { code: '2BP01' });
  });
  assert.deepEqual(ok.map((r) => r.username), ['lease_a', 'lease_c']);
  assert.deepEqual(calls, [['lease_a', 'lease_b', 'lease_c'], ['lease_a'], ['lease_b'], ['lease_c']]);
  assert.match(result.get('lease_b')!, /^drop: 2BP01: role "lease_b" cannot be dropped/);
  assert.equal(result.get('lease_a'), null);
});

test('a batch that fails because PostgreSQL is unreachable or silent is not retried role by role: each retry would cost another timeout', async () => {
  for (const err of [new Error('Query read timeout'), Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' })]) {
    const calls: string[][] = [];
    const result = fresh();
    const ok = await stepEach(roles, result, 'drop', async (batch) => {
      calls.push(batch.map((r) => r.username));
      throw err;
    });
    assert.deepEqual(ok, []);
    assert.equal(calls.length, 1, err.message);
    for (const r of roles) assert.equal(result.get(r.username), `drop: ${(err as { code?: string }).code ? `${(err as { code?: string }).code}: ` : ''}${err.message}`);
  }
});

test('a step on the broker\'s connections that finds the server gone ends the rest of the teardown; a busy server or another database does not', async () => {
  const gone: TeardownRun = { unreachable: null };
  const result = fresh();
  let tries = 0;
  const down = async () => {
    tries += 1;
    throw new Error('Query read timeout');
  };
  assert.deepEqual(await stepEach(roles.slice(0, 2), result, 'NOLOGIN', down, gone), []);
  assert.equal(gone.unreachable, 'NOLOGIN: Query read timeout');
  // Another creator's roles, in the same teardown.
  assert.deepEqual(await stepEach(roles.slice(2), result, 'NOLOGIN', down, gone), []);
  assert.equal(tries, 1);
  assert.equal(result.get('lease_c'), 'NOLOGIN: not tried after NOLOGIN: Query read timeout');
  // Named after the step each role stopped at: these never reached DROP ROLE.
  const later = fresh();
  assert.deepEqual(await stepEach(roles, later, 'DROP ROLE', down, gone), []);
  assert.equal(later.get('lease_a'), 'DROP ROLE: not tried after NOLOGIN: Query read timeout');

  // Busy, not gone: the batch fails (a retry per role would wait the same), the teardown goes on.
  for (const busy of [Object.assign(new Error('too many connections for database "x"'), { code: '53300' }), new Error('timeout exceeded when trying to connect')]) {
    const progress: TeardownRun = { unreachable: null };
    let calls = 0;
    await stepEach(roles, fresh(), 'NOLOGIN', async () => { calls += 1; throw busy; }, progress);
    assert.deepEqual([calls, progress.unreachable], [1, null], busy.message);
  }
  // A step in another database is passed no progress: whatever it meets stays its own.
  const other = fresh();
  assert.deepEqual(await stepEach(roles.slice(0, 1), other, 'otherdb', down), []);
  assert.equal(other.get('lease_a'), 'otherdb: Query read timeout');
  // An ordinary failure leaves the next step free to try.
  const healthy: TeardownRun = { unreachable: null };
  await stepEach(roles.slice(0, 1), fresh(), 'DROP ROLE', async () => { throw Object.assign(new Error('in use'), { code: '2BP01' }); }, healthy);
  assert.equal(healthy.unreachable, null);
});

test('a teardown that stopped before NOLOGIN is retried at the base interval; one that got past it backs off', () => {
  const lockedRole = 'NOLOGIN: 55P03: canceling statement due to lock timeout';
  const notTried = 'NOLOGIN: not tried after looking up the roles: timeout exceeded when trying to connect';
  const afterLogin = 'terminate sessions: sessions of lease_a did not exit within 5000 ms';
  assert.deepEqual([lockedRole, notTried, afterLogin, null].map(loginStillEnabled), [true, true, false, false]);
  // Attempts 1..6 with a 10 s base: the login-enabled case waits the base until it reads
  // revoke_failed (the 5th), then backs off too.
  assert.deepEqual([1, 2, 3, 4, 5, 6].map((n) => retryDelaySeconds(lockedRole, n, 10)), [10, 10, 10, 10, 320, 640]);
  assert.deepEqual([1, 2, 3, 4, 5].map((n) => retryDelaySeconds(afterLogin, n, 10)), [20, 40, 80, 160, 320]);
  assert.equal(retryDelaySeconds(afterLogin, 30, 10), 3600, 'capped at an hour');
});

test('a teardown that cannot even look its roles up reports each as stopped before NOLOGIN, instead of throwing', async () => {
  const busy = new Error('timeout exceeded when trying to connect');
  // The pool is the only part teardownRoles touches before its first step.
  const pool = { query: async () => { throw busy; } } as unknown as TeardownDeps['pool'];
  const deps = { pool, databaseUrl: 'postgres://broker@127.0.0.1/broker', managedRole: 'm', log: console, timeouts: { lockTimeoutSeconds: 1, queryTimeoutSeconds: 2 } } as unknown as TeardownDeps;
  const result = await teardownRoles(deps, roles);
  assert.deepEqual([...result.keys()], roles.map((r) => r.username));
  for (const error of result.values()) {
    assert.equal(error, 'NOLOGIN: not tried after looking up the roles: timeout exceeded when trying to connect');
    assert.equal(loginStillEnabled(error), true);
  }
});

test('when a later creator group finds the server gone, the earlier group\'s roles are reported too, not lost to an exception', async () => {
  // Two creator groups: c1's logins end; c2's NOLOGIN finds the server silent. Every later
  // statement would fail the same way, c1's session step among them: sessions are ended once
  // every group's NOLOGIN is in (logins still starting are looked for once, after them all).
  const gone = () => new Error('Connection terminated unexpectedly');
  let serverUp = true;
  const client = {
    async query() {
      if (!serverUp) throw gone();
      return { rows: [] };
    },
    release() {},
  };
  const pool = {
    async query(sql: string) {
      if (!serverUp) throw gone();
      // Statements without bind parameters run through the creator's function.
      if (/NOLOGIN/.test(sql) && sql.startsWith('SELECT broker."c2"(')) {
        serverUp = false;
        throw new Error('Query read timeout');
      }
      if (/ AS issued/.test(sql)) {
        return { rows: [{ rolname: 'lease_a', issued: true, creator: 'c1', can_login: true, member: false }, { rolname: 'lease_b', issued: true, creator: 'c2', can_login: true, member: false }] };
      }
      return { rows: [] };
    },
    async connect() { return client; },
  } as unknown as TeardownDeps['pool'];
  const deps = { pool, databaseUrl: 'postgres://broker@127.0.0.1/broker', managedRole: 'm', log: console, timeouts: { lockTimeoutSeconds: 1, queryTimeoutSeconds: 2 } } as unknown as TeardownDeps;
  const result = await teardownRoles(deps, roles.slice(0, 2));
  assert.equal(result.get('lease_b'), 'NOLOGIN: Query read timeout');
  assert.equal(result.get('lease_a'), 'terminate sessions: not tried after NOLOGIN: Query read timeout');
  assert.equal(loginStillEnabled(result.get('lease_b')), true);
  assert.equal(loginStillEnabled(result.get('lease_a')), false, 'its login did end');
});

test('a retry sends only what an earlier attempt did not commit, and names a failure by whether the login still works', async () => {
  // lease_a: disabled and granted before (nothing to send); lease_b: granted, but someone enabled
  // its login again; lease_c: disabled by hand, never granted, with a session left; lease_d: the
  // same without a session. Every GRANT meets a lock.
  const four = [...roles, { username: 'lease_d', reassign_to: 'app' }];
  const sent: string[] = [];
  const lookups: string[][] = [];
  const locked = Object.assign(new Error('canceling statement due to lock timeout'), { code: '55P03' });
  const send = (sql: string, params?: unknown[]) => {
    sent.push(`${sql} ${JSON.stringify(params ?? [])}`);
    if (/GRANT/.test(sql)) throw locked;
    return { rows: [] };
  };
  const client = {
    async query(sql: string, params?: unknown[]) {
      return sql.startsWith('BEGIN') ? { rows: [] } : send(sql, params);
    },
    release() {},
  };
  const pool = {
    async query(sql: string, params: unknown[]) {
      if (sql.startsWith('SELECT broker.')) return send(sql, params);
      if (/ AS issued/.test(sql)) {
        return { rows: [
          { rolname: 'lease_a', issued: true, creator: 'c1', can_login: false, member: true },
          { rolname: 'lease_b', issued: true, creator: 'c1', can_login: true, member: true },
          { rolname: 'lease_c', issued: true, creator: 'c1', can_login: false, member: false },
          { rolname: 'lease_d', issued: true, creator: 'c1', can_login: false, member: false },
        ] };
      }
      if (/FROM pg_stat_activity/.test(sql)) {
        lookups.push(params[0] as string[]);
        return { rows: (params[0] as string[]).includes('lease_c') ? [{ usename: 'lease_c' }] : [] };
      }
      return { rows: [] };
    },
    async connect() { return client; },
  } as unknown as TeardownDeps['pool'];
  const deps = { pool, databaseUrl: 'postgres://broker@127.0.0.1/broker', managedRole: 'm', log: console, timeouts: { lockTimeoutSeconds: 1, queryTimeoutSeconds: 2 } } as unknown as TeardownDeps;
  const result = await disableLogins(deps, four);
  assert.equal(result.get('lease_a'), null);
  assert.equal(result.get('lease_b'), null);
  assert.equal(result.get('lease_d'), null);
  assert.match(result.get('lease_c')!, /^terminate sessions: 55P03/);
  assert.deepEqual(four.map((r) => loginStillEnabled(result.get(r.username))), [false, false, false, false]);
  assert.ok(lookups.length > 0 && lookups[0].includes('lease_d'), 'sessions are looked up for every role');
  // No NOLOGIN for the three already disabled; a GRANT only for the role with a session that
  // lacks the membership, and nothing at all as the creator for the others.
  assert.ok(!sent.some((s) => /"lease_[ad]"/.test(s)), sent.join(' | '));
  assert.ok(sent.some((s) => s.includes('ALTER ROLE "lease_b" NOLOGIN') && !/GRANT/.test(s)), sent.join(' | '));
  assert.ok(sent.some((s) => s.startsWith('SELECT broker."c1"(') && s.includes('GRANT "lease_c" TO "c1"') && !/NOLOGIN|lease_b/.test(s)), sent.join(' | '));
  // lease_c's GRANT failed, and the others have no session to end.
  assert.ok(!sent.some((s) => /pg_terminate_backend/.test(s)), sent.join(' | '));
});

test('with a pace, each statement run as a role\'s ender is followed by it, with how long it took; look-ups are not', async () => {
  const sent: string[] = [];
  const paced: number[] = [];
  const pool = {
    async query(sql: string) {
      if (/ AS issued/.test(sql)) {
        return { rows: [
          { rolname: 'lease_a', issued: true, creator: 'c1', can_login: true, member: false },
          { rolname: 'lease_b', issued: true, creator: 'c2', can_login: true, member: false },
        ] };
      }
      if (sql.startsWith('SELECT broker.')) {
        sent.push(sql);
        await new Promise((r) => setTimeout(r, 5));
      }
      return { rows: [] };
    },
  } as unknown as TeardownDeps['pool'];
  const deps = {
    pool, databaseUrl: 'postgres://broker@127.0.0.1/broker', managedRole: 'm', log: console, timeouts: { lockTimeoutSeconds: 1, queryTimeoutSeconds: 2 },
    pace: async (busyMs: number) => { paced.push(busyMs); },
  } as unknown as TeardownDeps;
  const result = await teardownRoles(deps, roles.slice(0, 2));
  assert.deepEqual([...result.values()], [null, null]);
  // NOLOGIN and DROP ROLE for each creator's group; the session and owned-object look-ups run as the broker, unpaced.
  assert.equal(sent.length, 4, sent.join(' | '));
  assert.equal(paced.length, sent.length);
  assert.ok(paced.every((ms) => ms >= 4), paced.join(', '));
});

test('a recorded failure carries PostgreSQL\'s DETAIL and HINT on one line, and only what the error has', () => {
  assert.equal(describeError(Object.assign(new Error('out of shared memory'), { code: '53200', hint: 'You might need to increase "max_locks_per_transaction".' })),
    '53200: out of shared memory (hint: You might need to increase "max_locks_per_transaction".)');
  assert.equal(describeError(Object.assign(new Error('role "lease_x" cannot be dropped because some objects depend on it'), { code: '2BP01', detail: '1 object in database app\nowner of table t' })),
    '2BP01: role "lease_x" cannot be dropped because some objects depend on it (1 object in database app; owner of table t)');
  assert.equal(describeError(Object.assign(new Error('canceling statement due to lock timeout'), { code: '55P03' })), '55P03: canceling statement due to lock timeout');
});
