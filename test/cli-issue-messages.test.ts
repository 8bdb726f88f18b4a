import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let cli: CliBench['cli'];

before(async () => {
  ({ b, cli } = await startCliBench('pgcb-cli-issue-'));
  // With the bench's `cli` (sub cli:*), two policies admit sub cli:both.
  await b.putPolicy('cli-both', { claims: { sub: 'cli:both' }, default_ttl: 120, max_ttl: 600 });
});
after(async () => b?.close());

describe('pg-broker creds and exec when several policies admit the token', () => {
  test('the error lists the policies and says to pass --policy; with --policy, creds and exec are issued', async () => {
    const token = await b.token({ sub: 'cli:both' });
    // The broker's list of the policies kept, its advice for API clients replaced.
    const expected = /^pg-broker: POST \/credentials failed with 409 AMBIGUOUS_POLICY: [^\n]*\(cli, cli-both\)[^\n]*; pass --policy NAME to choose one\n$/;
    const creds = await cli(['creds', '--format', 'json', '--token', token]);
    assert.equal(creds.code, 1);
    assert.match(creds.stderr, expected);
    assert.doesNotMatch(creds.stderr, /request body/);
    const exec = await cli(['exec', '--token', token, '--', process.execPath, '-e', 'console.log("ran")']);
    assert.equal(exec.code, 1);
    assert.match(exec.stderr, expected);
    assert.equal(exec.stdout, '', 'the command never ran');

    const chosen = await cli(['creds', '--format', 'json', '--policy', 'cli-both', '--token', token]);
    assert.equal(chosen.code, 0, chosen.stderr);
    assert.equal(JSON.parse(chosen.stdout).policy, 'cli-both');
    const ran = await cli(['exec', '--policy', 'cli', '--token', token, '--', process.execPath, '-e', 'console.log("ran")']);
    assert.deepEqual([ran.code, ran.stdout], [0, 'ran\n'], ran.stderr);
  });
});

describe('pg-broker names the lease of a credential whose output does not', () => {
  const leaseOf = async (username: string) => (await b.pg.query(`SELECT id::text AS id, expires_at FROM broker.leases WHERE username = $1`, [username]))[0] as { id: string; expires_at: Date };
  const notice = (command: string, lease: { id: string; expires_at: Date }) => `pg-broker ${command}: lease ${lease.id}, expires ${lease.expires_at.toISOString()}`;

  test('creds --format uri, pgpass and json print the lease id and expiry on stderr, never the password; env and dotenv carry it in the output', async () => {
    const token = await b.token({ sub: 'cli:notice' });
    const usernameOf: Record<string, (out: string) => { username: string; password: string }> = {
      uri: (out) => { const u = new URL(out.trim()); return { username: u.username, password: decodeURIComponent(u.password) }; },
      pgpass: (out) => { const f = out.trim().split(':'); return { username: f[3], password: f[4] }; },
      json: (out) => JSON.parse(out) as { username: string; password: string },
    };
    for (const [format, parse] of Object.entries(usernameOf)) {
      const run = await cli(['creds', '--format', format, '--token', token]);
      assert.equal(run.code, 0, run.stderr);
      const { username, password } = parse(run.stdout);
      assert.equal(run.stderr, `${notice('creds', await leaseOf(username))}\n`, format);
      assert.ok(password.length > 20 && !run.stderr.includes(password), format);
    }
    for (const format of ['env', 'dotenv']) {
      const run = await cli(['creds', '--format', format, '--token', token]);
      assert.deepEqual([run.code, run.stderr], [0, ''], format);
      assert.match(run.stdout, /PG_BROKER_LEASE_ID=/, format);
    }
  });

  test('exec --keep names the kept lease on stderr once the command has exited; without --keep the lease is revoked and not named', async () => {
    const token = await b.token({ sub: 'cli:notice-exec' });
    const script = 'console.log(JSON.stringify({ id: process.env.PG_BROKER_LEASE_ID, user: process.env.PGUSER, password: process.env.PGPASSWORD }))';
    const kept = await cli(['exec', '--keep', '--token', token, '--', process.execPath, '-e', script]);
    assert.equal(kept.code, 0, kept.stderr);
    const seen = JSON.parse(kept.stdout) as { id: string; user: string; password: string };
    const lease = await leaseOf(seen.user);
    assert.equal(lease.id, seen.id);
    assert.equal(kept.stderr, `${notice('exec', lease)} (kept: --keep)\n`);
    assert.ok(!kept.stderr.includes(seen.password));
    const revoked = await cli(['exec', '--token', token, '--', process.execPath, '-e', script]);
    assert.deepEqual([revoked.code, revoked.stderr], [0, '']);
    const [row] = await b.pg.query(`SELECT state FROM broker.leases WHERE username = $1`, [JSON.parse(revoked.stdout).user]);
    assert.equal(row.state, 'revoked');
  });
});
