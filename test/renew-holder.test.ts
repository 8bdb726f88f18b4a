import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { api, connectAs, leaseRow, loginError, roleExists, startTestBroker, untilPast, waitFor, type TestBroker } from './helpers/broker.js';

// Renewal against a holder who works against it: one who keeps its own role's catalogue row
// locked (any role may ALTER its own password in a transaction it leaves open) and keeps asking
// for renewals. Renewals must neither stall a revocation nor outlast the lease they extend.
let b: TestBroker;

before(async () => {
  // The default lock timeout (10 s): a renewal must not use all of it on the role's row.
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('rh', { claims: { sub: 'rh:*' }, default_ttl: 120, max_ttl: 600 });
});
after(async () => b?.close());

async function issue(sub: string, ttl = 120): Promise<{ token: string; cred: any }> {
  const token = await b.token({ sub });
  const res = await b.issue(token, { ttl });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return { token, cred: res.body };
}

async function holdOwnRow(cred: { username: string; password: string }): Promise<pg.Client> {
  const session = await connectAs(b.pg, cred);
  session.on('error', () => undefined);
  await session.query('BEGIN');
  await session.query(`ALTER ROLE "${cred.username}" PASSWORD NULL`);
  return session;
}

const renew = (token: string, id: string, ttl = 120) => api(b, 'POST', `/leases/${id}/renew`, token, { ttl });

describe('a renewal while the lease\'s own role holds its catalogue row', () => {
  test('is refused with DATABASE_BUSY, changing nothing; once let go, the same renewal succeeds', async () => {
    const { token, cred } = await issue('rh:held');
    const session = await holdOwnRow(cred);
    try {
      const refused = await renew(token, cred.lease_id, 300);
      assert.equal(refused.status, 503, JSON.stringify(refused.body));
      assert.equal(refused.body.code, 'DATABASE_BUSY');
      assert.match(refused.body.detail, /another session holds its role's catalogue row/);
      assert.equal((await leaseRow(b.pg, cred.lease_id)).expires_at.toISOString(), cred.expires_at);
    } finally {
      await session.query('ROLLBACK');
      await session.end();
    }
    const renewed = await renew(token, cred.lease_id, 300);
    assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
    assert.ok(new Date(renewed.body.expires_at) > new Date(cred.expires_at));
  });

  test('renewals in a loop keep neither a DELETE nor a bulk revocation from ending the lease, nor others from being served', async () => {
    for (const how of ['DELETE', 'bulk'] as const) {
      const { token, cred } = await issue(`rh:loop-${how}`);
      const session = await holdOwnRow(cred);
      let stop = false;
      const answers: number[] = [];
      const loop = (async () => {
        // Several at once, as a holder trying to crowd the pool would send them.
        while (!stop) answers.push(...(await Promise.all([1, 2, 3].map(() => renew(token, cred.lease_id)))).map((r) => r.status));
      })();
      try {
        await waitFor('renewals to be refused', async () => answers.length >= 6);
        const admin = await b.adminToken();
        const revoked = how === 'DELETE'
          ? await api(b, 'DELETE', `/leases/${cred.lease_id}`, admin)
          : await api(b, 'POST', '/leases/revoke', admin, { subject: `rh:loop-${how}` });
        assert.equal(revoked.status, 200, `${how}: ${JSON.stringify(revoked.body)}`);
        const bystander = await b.issue(await b.token({ sub: `rh:bystander-${how}` }), { ttl: 60 });
        assert.equal(bystander.status, 201, `${how}: another identity is served meanwhile`);
      } finally {
        stop = true;
        await loop;
        await session.end().catch(() => undefined);
      }
      assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked', how);
      assert.equal(await roleExists(b.pg, cred.username), false, how);
      assert.ok(answers.every((s) => [503, 409, 200].includes(s)), `${how}: ${answers.join(' ')}`);
    }
  });
});

describe('a renewal that waits past the lease\'s expiry', () => {
  test('answers LEASE_ENDED and leaves the expiry and VALID UNTIL as they were', async () => {
    // The renewal must be waiting on the role's row before the expiry and still be waiting after
    // it; on a machine too busy for that window the attempt is made again with a new lease.
    for (let attempt = 1; ; attempt++) {
      const { token, cred } = await issue(`rh:lapse-${attempt}`, 3);
      const session = await holdOwnRow(cred);
      const expiry = new Date(cred.expires_at).getTime();
      await new Promise((r) => setTimeout(r, Math.max(0, expiry - Date.now() - 400)));
      const renewing = renew(token, cred.lease_id, 60);
      await waitFor('the renewal to wait on the role', async () => (await b.pg.query(
        `SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%VALID UNTIL%'`)).length > 0, 5000, 10);
      const waitingBeforeExpiry = Date.now() < expiry - 20;
      await untilPast(cred.expires_at, 60);
      await session.query('ROLLBACK');
      await session.end();
      const res = await renewing;
      if (!waitingBeforeExpiry || res.status === 503) {
        assert.ok(attempt < 5, `no attempt had the renewal wait across the expiry (last: ${res.status})`);
        continue;
      }
      assert.deepEqual([res.status, res.body.code], [409, 'LEASE_ENDED'], JSON.stringify(res.body));
      assert.match(res.body.detail, /expired while this renewal waited/);
      assert.equal((await leaseRow(b.pg, cred.lease_id)).expires_at.toISOString(), cred.expires_at);
      const [role] = await b.pg.query<{ until: Date }>('SELECT rolvaliduntil AS until FROM pg_roles WHERE rolname = $1', [cred.username]);
      assert.equal(role.until.toISOString(), cred.expires_at, 'VALID UNTIL rolled back with it');
      return;
    }
  });
});

describe('a renewal of a lease another request holds', () => {
  test('is refused at once as busy to its owner, 404 to anyone else, and succeeds once the row is free', async () => {
    const { token, cred } = await issue('rh:busy');
    const other = await b.token({ sub: 'rh:someone-else' });
    const holder = new pg.Client({ connectionString: b.pg.superuserUrl.replace(/\/[^/?]*(\?|$)/, `/${b.pg.database}$1`) });
    await holder.connect();
    try {
      await holder.query('BEGIN');
      await holder.query('SELECT 1 FROM broker.leases WHERE id = $1 FOR UPDATE', [cred.lease_id]);
      const busy = await renew(token, cred.lease_id);
      assert.deepEqual([busy.status, busy.body.code], [503, 'DATABASE_BUSY'], JSON.stringify(busy.body));
      assert.match(busy.body.detail, /is being renewed or revoked by another request right now/);
      assert.equal((await renew(other, cred.lease_id)).status, 404, 'a lease that is not yours is not found, locked or not');
    } finally {
      await holder.query('ROLLBACK');
      await holder.end();
    }
    assert.equal((await renew(token, cred.lease_id)).status, 200);
    assert.equal(await loginError(b.pg, cred), undefined);
  });
});
