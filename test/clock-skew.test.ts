import assert from 'node:assert/strict';
import { pathToFileURL } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { AUDIENCE, connectAs, waitFor } from './helpers/broker.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';
import { startPostgres, type TestPostgres } from './helpers/postgres.js';
import { childBrokerEnv, http, loggedSecrets, spawnBroker, type BrokerProcess } from './helpers/process.js';

// A broker whose host clock is off (fixtures/skewed-clock.mjs) must still hand out lifetimes on
// the clock PostgreSQL enforces: VALID UNTIL, the lease row and the answer all read PostgreSQL's
// now() + ttl, whatever the broker's own clock says.
const SKEWED_CLOCK = pathToFileURL(new URL('./fixtures/skewed-clock.mjs', import.meta.url).pathname).href;
const TTL = 60;
const MAX_TTL = 120;
// Whole seconds rounded up, plus the time a request takes here.
const SLACK_MS = 2000;
const CLOCK_WARNING = /clock and this host's disagree/;

let pgs: TestPostgres;
let issuer: TestIssuer;
const brokers: BrokerProcess[] = [];

before(async () => {
  pgs = await startPostgres();
  issuer = await startIssuer();
});

after(async () => {
  await Promise.all(brokers.map((b) => b.kill()));
  const { leaks } = loggedSecrets(pgs?.logLines() ?? []);
  await issuer?.close();
  await pgs?.stop();
  assert.deepEqual(leaks, []);
});

/** PostgreSQL's clock, read as the superuser, in ms. */
async function dbNow(): Promise<number> {
  const [{ ms }] = await pgs.query<{ ms: number }>('SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS ms');
  return ms;
}

/** What PostgreSQL holds for an issued role: VALID UNTIL, and its lease's expiries. */
async function stored(username: string): Promise<{ validUntil: number; expiresAt: number; maxExpiresAt: number }> {
  const [row] = await pgs.query<{ valid_until: Date; expires_at: Date; max_expires_at: Date }>(
    `SELECT r.rolvaliduntil AS valid_until, l.expires_at, l.max_expires_at
       FROM pg_roles r JOIN broker.leases l ON l.username = r.rolname WHERE r.rolname = $1`, [username]);
  return { validUntil: row.valid_until.getTime(), expiresAt: row.expires_at.getTime(), maxExpiresAt: row.max_expires_at.getTime() };
}

/** `at` lies in [from + seconds, to + seconds + SLACK_MS]: a lifetime of `seconds` on PostgreSQL's clock. */
function assertLifetime(what: string, at: number, from: number, to: number, seconds: number): void {
  const lo = from + seconds * 1000 - SLACK_MS;
  const hi = to + seconds * 1000 + SLACK_MS;
  assert.ok(at >= lo && at <= hi, `${what} ${new Date(at).toISOString()} is not PostgreSQL's now() + ${seconds} s (${new Date(from + seconds * 1000).toISOString()})`);
}

async function canLogIn(cred: { username: string; password: string }): Promise<void> {
  const client = await connectAs(pgs, cred);
  try {
    const [{ who }] = (await client.query<{ who: string }>('SELECT session_user AS who')).rows;
    assert.equal(who, cred.username);
  } finally {
    await client.end();
  }
}

for (const [label, skewMs] of [['10 minutes ahead of', 600_000], ['2 minutes behind', -120_000], ['in step with', 0]] as const) {
  describe(`a broker whose clock is ${label} PostgreSQL's`, () => {
    let broker: BrokerProcess;
    const policy = `skew-${skewMs < 0 ? 'behind' : skewMs > 0 ? 'ahead' : 'none'}`;
    // Tokens fresh by the broker's clock: what this is about is PostgreSQL's, not the issuer's.
    const token = (sub: string) => {
      const at = Math.floor((Date.now() + skewMs) / 1000);
      return issuer.sign({ aud: AUDIENCE, sub, iat: at, exp: at + 300 });
    };

    before(async () => {
      broker = await spawnBroker(childBrokerEnv(pgs, issuer, { LOG_LEVEL: 'info', NODE_OPTIONS: `--import ${SKEWED_CLOCK}`, TEST_CLOCK_SKEW_MS: String(skewMs) }));
      brokers.push(broker);
      const put = await http(`${broker.url}/policies/${policy}`, {
        method: 'PUT', token: await token('admin:skew'),
        body: { issuer: issuer.issuer, database: pgs.database, grant_role: 'app_readers', claims: { sub: `${policy}:*` }, default_ttl: TTL, max_ttl: MAX_TTL },
      });
      assert.ok(put.status === 201 || put.status === 200, JSON.stringify(put.body));
    });

    after(async () => {
      await broker?.kill();
    });

    test('the credential lives ttl seconds on PostgreSQL\'s clock, logs in, and renews on that clock too', async () => {
      const tok = await token(`${policy}:ci`);
      const before = await dbNow();
      const res = await http(`${broker.url}/credentials`, { method: 'POST', token: tok, body: {} });
      const issuedBy = await dbNow();
      assert.equal(res.status, 201, JSON.stringify(res.body));
      const cred = res.body;
      const held = await stored(cred.username);
      assert.equal(held.validUntil, held.expiresAt, 'VALID UNTIL is the lease\'s expires_at');
      assert.equal(new Date(cred.expires_at).getTime(), held.expiresAt, 'the answer gives the expiry PostgreSQL enforces');
      assert.equal(new Date(cred.max_expires_at).getTime(), held.maxExpiresAt);
      assertLifetime('VALID UNTIL', held.validUntil, before, issuedBy, TTL);
      assertLifetime('max_expires_at', held.maxExpiresAt, before, issuedBy, MAX_TTL);
      await canLogIn(cred);

      const renewFrom = await dbNow();
      const renewed = await http(`${broker.url}/leases/${cred.lease_id}/renew`, { method: 'POST', token: tok, body: { ttl: 90 } });
      const renewedBy = await dbNow();
      assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
      const afterRenew = await stored(cred.username);
      assert.equal(afterRenew.validUntil, afterRenew.expiresAt);
      assert.equal(new Date(renewed.body.expires_at).getTime(), afterRenew.expiresAt);
      assertLifetime('renewed VALID UNTIL', afterRenew.validUntil, renewFrom, renewedBy, 90);
      assert.equal(renewed.body.capped, false);
      await canLogIn(cred);

      // Past max_expires_at by PostgreSQL's clock: cut to it, not to the broker's idea of it. (A
      // second on, so that now + max_ttl, rounded up, is past the bound issuance rounded up.)
      await new Promise((r) => setTimeout(r, 1100));
      const capped = await http(`${broker.url}/leases/${cred.lease_id}/renew`, { method: 'POST', token: tok, body: { ttl: MAX_TTL } });
      assert.equal(capped.status, 200, JSON.stringify(capped.body));
      assert.equal(capped.body.capped, true);
      assert.equal((await stored(cred.username)).validUntil, held.maxExpiresAt);
    });

    test(skewMs === 0 ? 'no clock warning' : 'the offset is logged as a warning', async () => {
      // The reaper reads PostgreSQL's clock after each run (every second here).
      await waitFor('a reaper run', async () => broker.logs.some((l) => l.component === 'reaper' && l.msg === 'became reaper leader') || broker.logs.length > 20, 15_000);
      if (skewMs === 0) {
        await new Promise((r) => setTimeout(r, 1500));
        assert.deepEqual(broker.logged(CLOCK_WARNING), []);
        return;
      }
      const [warning] = await waitFor('the clock warning', async () => {
        const hits = broker.logged(CLOCK_WARNING);
        return hits.length ? hits : null;
      }, 15_000);
      assert.equal(warning.level, 40);
      assert.ok(Math.abs(warning.offset_ms + skewMs) < 1000, `offset_ms ${warning.offset_ms} for a clock ${skewMs} ms off`);
    });
  });
}
