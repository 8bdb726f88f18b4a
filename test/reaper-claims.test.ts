import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { claimDueLeases } from '../src/leases/claims.js';
import { creatorNames } from '../src/postgres/creators.js';
import { roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';

// Which due leases a reaper's claim takes: whole creator groups, the longest-due lease's first.
let b: TestBroker;
let creators: string[];

before(async () => {
  // The broker's own reaper stays out of the way: the claims here are made by hand.
  b = await startTestBroker({ env: { BROKER_REAPER_INTERVAL: '3600', BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('grouping', { claims: { sub: 'group:*' }, max_active_leases: 100 });
  creators = creatorNames(b.config.managedRole);
});
after(async () => b?.close());

const onCreators = () => b.pg.version >= 16;

/** Seven leases, due oldest first (L0 … L6), their roles ended by the creators in `homes` on 16+. */
async function dueLeases(tag: string, homes: number[]): Promise<Array<{ id: string; username: string }>> {
  const leases: Array<{ id: string; username: string }> = [];
  for (let i = 0; i < homes.length; i++) {
    const res = await b.issue(await b.token({ sub: `group:${tag}:${i}` }), { policy: 'grouping' });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    leases.push({ id: res.body.lease_id, username: res.body.username });
  }
  for (const [i, lease] of leases.entries()) {
    if (onCreators()) {
      // Re-homed as superuser: the creator that made it gives up ADMIN OPTION, the chosen one gets it.
      const [{ creator }] = await b.pg.query<{ creator: string }>(
        `SELECT c.rolname AS creator FROM pg_auth_members m JOIN pg_roles c ON c.oid = m.member JOIN pg_roles r ON r.oid = m.roleid
          WHERE r.rolname = $1 AND m.admin_option AND c.rolname = ANY($2)`, [lease.username, creators]);
      const home = creators[homes[i]];
      if (creator !== home) {
        await b.pg.query(`GRANT ${pg.escapeIdentifier(lease.username)} TO ${pg.escapeIdentifier(home)} WITH ADMIN OPTION, INHERIT FALSE, SET FALSE`);
        await b.pg.query(`REVOKE ${pg.escapeIdentifier(lease.username)} FROM ${pg.escapeIdentifier(creator)} CASCADE`);
      }
    }
    // Ended by expiry, due since 100 − i seconds ago: L0 the longest.
    await b.pg.query(
      `UPDATE broker.leases SET state = 'revoking', ended_at = now(), ended_by = 'reaper', end_reason = 'expired',
              next_attempt_at = now() - make_interval(secs => 100 - $2::int), claimed_by_pid = NULL WHERE id = $1`, [lease.id, i]);
  }
  return leases;
}

const ids = (leases: Array<{ id: string }>, picks: number[]) => picks.map((i) => leases[i].id).sort();

describe('the reaper\'s claim', () => {
  test('takes whole creator groups, the longest-due lease\'s first, then the largest; every lease in turn', async () => {
    // Creators: L0 alone on c00; L1, L3, L5, L6 on c01; L2, L4 on c02.
    const leases = await dueLeases('a', [0, 1, 2, 1, 2, 1, 1]);
    // On 15 the broker ends every role itself: one group, so the claims go strictly by age.
    const expected = onCreators() ? [[0, 1, 3], [2, 4, 5], [6]] : [[0, 1, 2], [3, 4, 5], [6]];
    for (const want of expected) {
      const claimed = await claimDueLeases(b.app.db, 3, creators);
      assert.deepEqual(claimed.map((l) => l.id).sort(), ids(leases, want), `claimed L${want.join(', L')}`);
    }
    assert.deepEqual(await claimDueLeases(b.app.db, 3, creators), [], 'nothing left that is due');
    // The claimed leases are torn down by whoever now holds ADMIN OPTION on them.
    await b.pg.query(`UPDATE broker.leases SET next_attempt_at = now() - interval '1 second', claimed_by_pid = NULL WHERE id = ANY($1::uuid[])`, [leases.map((l) => l.id)]);
    const stats = await b.reaper.reap({ requireLeadership: false });
    assert.equal(stats.failed, 0);
    for (const l of leases) assert.equal(await roleExists(b.pg, l.username), false, l.username);
  });

  test('skips a chosen lease another claimer holds locked, without waiting for it', async () => {
    const leases = await dueLeases('b', [3, 3, 4]);
    const holder = new pg.Client({ connectionString: b.pg.brokerUrl });
    await holder.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM broker.leases WHERE id = $1 FOR UPDATE', [leases[0].id]);
      const claimed = await claimDueLeases(b.app.db, 2, creators);
      // L0 is locked: its group (with L1 on 16+) is still chosen, and only L1 of it claimed.
      assert.deepEqual(claimed.map((l) => l.id).sort(), ids(leases, [1]));
      await holder.query('ROLLBACK');
      const rest = await claimDueLeases(b.app.db, 2, creators);
      assert.deepEqual(rest.map((l) => l.id).sort(), ids(leases, [0, 2]), 'claimed once its lock is gone');
    } finally {
      await holder.end();
    }
    await b.pg.query(`UPDATE broker.leases SET next_attempt_at = now() - interval '1 second', claimed_by_pid = NULL WHERE id = ANY($1::uuid[])`, [leases.map((l) => l.id)]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 0);
  });

  test('when every chosen lease is locked, takes the other due leases by age instead of none', async () => {
    // L0 and L1 share a creator and form the chosen group on 16+; on 15, L0 and L1 are the oldest.
    const leases = await dueLeases('c', [5, 5, 6, 7]);
    const holder = new pg.Client({ connectionString: b.pg.brokerUrl });
    await holder.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM broker.leases WHERE id = ANY($1::uuid[]) FOR UPDATE', [ids(leases, [0, 1])]);
      const claimed = await claimDueLeases(b.app.db, 2, creators);
      assert.deepEqual(claimed.map((l) => l.id).sort(), ids(leases, [2, 3]));
      await holder.query('ROLLBACK');
      const rest = await claimDueLeases(b.app.db, 2, creators);
      assert.deepEqual(rest.map((l) => l.id).sort(), ids(leases, [0, 1]), 'claimed once its lock is gone');
      assert.deepEqual(await claimDueLeases(b.app.db, 2, creators), [], 'nothing left that is due');
    } finally {
      await holder.end();
    }
    await b.pg.query(`UPDATE broker.leases SET next_attempt_at = now() - interval '1 second', claimed_by_pid = NULL WHERE id = ANY($1::uuid[])`, [leases.map((l) => l.id)]);
    assert.equal((await b.reaper.reap({ requireLeadership: false })).failed, 0);
    for (const l of leases) assert.equal(await roleExists(b.pg, l.username), false, l.username);
  });
});
