import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { existsSync } from 'node:fs';
import { lstat, mkdir, mkdtemp, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { callBroker, CliError } from '../src/cli/client.js';
import {
  isFinalRenewFailure, nextRenewDelayMs, RENEW_REQUEST_ALLOWANCE_MS, RENEW_RETRY_FIRST_MS, RENEW_RETRY_FLOOR_MS, RENEW_RETRY_MAX_MS,
} from '../src/cli/renew-schedule.js';
import { api, connectAs, waitFor, type TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';
import { startRelay } from './helpers/relay.js';

let b: TestBroker;
let url: string;
let tmp: string;

/**
 * A command for `exec` that writes its lease id to `started` once exec has its credential, then
 * runs until `finish()` is called (or the test ends).
 */
async function heldCommand(): Promise<{ script: string; leaseId(): Promise<string>; finish(): Promise<void> }> {
  const dir = await mkdtemp(path.join(tmp, 'exec-'));
  const started = path.join(dir, 'started');
  const done = path.join(dir, 'done');
  return {
    script: `require('fs').writeFileSync(${JSON.stringify(started)}, process.env.PG_BROKER_LEASE_ID);
      const t = setInterval(() => { if (require('fs').existsSync(${JSON.stringify(done)})) clearInterval(t); }, 50);`,
    leaseId: () => waitFor('exec to start the command', async () => (existsSync(started) ? readFile(started, 'utf8') : null)),
    finish: () => writeFile(done, '').catch(() => undefined),
  };
}

let cli: CliBench['cli'];

before(async () => {
  ({ b, url, home: tmp, cli } = await startCliBench('pgcb-cli-creds-'));
});
after(async () => b?.close());

describe('exec renew scheduling (pure)', () => {
  const now = Date.parse('2030-01-01T00:00:00Z');
  const lease = (remainingMs: number, maxMs = 3_600_000) => ({ expiresAtMs: now + remainingMs, maxExpiresAtMs: now + maxMs });

  test('no renew once the lease is at max_expires_at or has lapsed', () => {
    assert.equal(nextRenewDelayMs(lease(90_000, 90_000), now, 0), null);
    assert.equal(nextRenewDelayMs(lease(90_000, 90_000), now, 1), null);
    assert.equal(nextRenewDelayMs(lease(0), now, 0), null);
    assert.equal(nextRenewDelayMs(lease(-5_000), now, 2), null);
    // …while the same lease one second short of its cap, or not yet lapsed, is renewed.
    assert.equal(nextRenewDelayMs(lease(90_000, 91_000), now, 0), 60_000);
    assert.equal(nextRenewDelayMs(lease(90_000), now, 1), RENEW_RETRY_FIRST_MS);
  });

  test('a routine renew is due at two thirds of the remaining lifetime; after failures the retry backs off from 2 s to 30 s', () => {
    assert.equal(nextRenewDelayMs(lease(90_000), now, 0), 60_000);
    assert.equal(nextRenewDelayMs(lease(600), now, 0), 1_000);
    const delays = [1, 2, 3, 4, 5, 6, 20].map((failures) => nextRenewDelayMs(lease(600_000), now, failures));
    assert.deepEqual(delays, [2_000, 4_000, 8_000, 16_000, RENEW_RETRY_MAX_MS, RENEW_RETRY_MAX_MS, RENEW_RETRY_MAX_MS]);
  });

  test('a long lease is renewed within what setTimeout can wait, not in a 1 ms loop', () => {
    const day = 86_400_000;
    // setTimeout fires after 1 ms for any delay above 2^31-1 ms (about 24.8 days).
    const timerLimitMs = 2 ** 31 - 1;
    for (const days of [38, 60, 365]) {
      const delay = nextRenewDelayMs(lease(days * day, 400 * day), now, 0)!;
      assert.ok(delay <= timerLimitMs, `${days}-day lease: ${delay} ms`);
      assert.ok(delay > 24 * day, `${days}-day lease: still renewed weeks ahead, not at once (${delay} ms)`);
    }
    // Up to the limit, two thirds still holds.
    assert.equal(nextRenewDelayMs(lease(36 * day, 400 * day), now, 0), 24 * day);
  });

  test('a retry is never put off past the last moment it can land before expires_at', () => {
    // 8 s of backoff would overshoot a lease with 5 s left; it goes 1 s before expiry instead.
    assert.equal(nextRenewDelayMs(lease(5_000), now, 3), 5_000 - RENEW_REQUEST_ALLOWANCE_MS);
    assert.equal(nextRenewDelayMs(lease(40_000), now, 9), RENEW_RETRY_MAX_MS);
    // With under a second left it still tries, but never in a tight loop.
    assert.equal(nextRenewDelayMs(lease(800), now, 1), RENEW_RETRY_FLOOR_MS);
    assert.equal(nextRenewDelayMs(lease(RENEW_RETRY_FLOOR_MS), now, 1), null);
    for (let remaining = RENEW_RETRY_FLOOR_MS + 1; remaining < 70_000; remaining += 997) {
      for (let failures = 1; failures < 8; failures++) {
        const delay = nextRenewDelayMs(lease(remaining), now, failures)!;
        assert.ok(delay >= RENEW_RETRY_FLOOR_MS && delay < remaining, `remaining ${remaining} ms, failure ${failures}: ${delay} ms`);
      }
    }
  });

  test('only a failure the broker will repeat forever is final, judged on the real client errors', async () => {
    const token = await b.token({ sub: 'cli:classify' });
    const failure = (p: Promise<unknown>) => p.then(() => assert.fail('expected the call to fail'), (err: Error) => err);
    const issued = await b.issue(token, { policy: 'cli' });
    assert.equal(issued.status, 201);
    const renewPath = `/leases/${issued.body.lease_id}/renew`;

    // The good input: the same call on a live lease succeeds.
    assert.equal((await callBroker(url, token, 'POST', renewPath, { ttl: 60 })).status, 200);
    const badTtl = await failure(callBroker(url, token, 'POST', renewPath, { ttl: 0 }));
    const notFound = await failure(callBroker(url, token, 'POST', `/leases/${randomUUID()}/renew`, { ttl: 60 }));
    const otherOwner = await failure(callBroker(url, await b.token({ sub: 'cli:someone-else' }), 'POST', renewPath, { ttl: 60 }));
    const unauthenticated = await failure(callBroker(url, 'not-a-jwt', 'POST', renewPath, { ttl: 60 }));
    const closed = await new Promise<number>((r) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const port = (s.address() as net.AddressInfo).port;
        s.close(() => r(port));
      });
    });
    const unreachable = await failure(callBroker(`http://127.0.0.1:${closed}`, token, 'POST', renewPath, { ttl: 60 }));
    assert.equal((await api(b, 'DELETE', `/leases/${issued.body.lease_id}`, token)).status, 200);
    const ended = await failure(callBroker(url, token, 'POST', renewPath, { ttl: 60 }));

    assert.match(ended.message, /409 LEASE_ENDED/);
    assert.equal(isFinalRenewFailure(ended), true, ended.message);
    assert.match(notFound.message, /404 LEASE_NOT_FOUND/);
    assert.equal(isFinalRenewFailure(notFound), true, notFound.message);
    assert.equal(isFinalRenewFailure(otherOwner), true, otherOwner.message);
    assert.match(badTtl.message, / 400 /);
    assert.equal(isFinalRenewFailure(badTtl), true, badTtl.message);
    assert.match(unauthenticated.message, / 401/);
    assert.equal(isFinalRenewFailure(unauthenticated), false, unauthenticated.message);
    assert.match(unreachable.message, /cannot reach the broker/);
    assert.equal(isFinalRenewFailure(unreachable), false, unreachable.message);
    assert.equal(isFinalRenewFailure(new CliError('POST /leases/x/renew failed with 503 DATABASE_UNAVAILABLE: retry shortly', 1, 503)), false);
    assert.equal(isFinalRenewFailure(new CliError('cannot read token file /t: ENOENT')), false);
  });
});

describe('pg-broker exec renewal', () => {
  test('a renew that fails while the broker is unreachable is retried, and the lease lives on', async () => {
    // The command signals that exec has its credential (so cutting the link cannot hit issuance),
    // then runs until the test lets it finish.
    const command = await heldCommand();
    const cutter = await startRelay(Number(new URL(url).port));
    try {
      const token = await b.token({ sub: 'cli:renew-retry' });
      // ttl 20: the routine renew comes about 13 s in and its first retry 2 s later, leaving about
      // 5 s before expiry for the retry to land even on a loaded machine.
      const running = cli(['exec', '--ttl', '20', '--token', token, '--', process.execPath, '-e', command.script], { PG_BROKER_URL: cutter.url });
      const leaseId = await command.leaseId();
      const [before] = await b.pg.query(`SELECT expires_at FROM broker.leases WHERE id = $1`, [leaseId]);
      const issuedExpiry = (before.expires_at as Date).getTime();

      cutter.cut();
      await waitFor('the routine renew to hit the cut link', async () => cutter.refused > 0, 25_000);
      assert.ok(Date.now() < issuedExpiry, 'the renew failed while the lease was still alive');
      cutter.refusing = false;

      const renewed = await waitFor('a retried renew to extend the lease', async () => {
        const [row] = await b.pg.query(`SELECT state, expires_at FROM broker.leases WHERE id = $1`, [leaseId]);
        return row.state === 'active' && (row.expires_at as Date).getTime() > issuedExpiry ? row : null;
      }, 15_000);
      assert.ok((renewed.expires_at as Date).getTime() > Date.now(), 'the lease did not lapse in between');

      await command.finish();
      const run = await running;
      assert.equal(run.code, 0, run.stderr);
      const failures = run.stderr.split('\n').filter((l) => l.includes('could not renew'));
      assert.equal(failures.length, 1, run.stderr);
      assert.match(failures[0], new RegExp(`^pg-broker exec: could not renew lease ${leaseId}: cannot reach the broker at .*; retrying in \\d+ s \\(the lease ends at `));
      const [after] = await b.pg.query(`SELECT state FROM broker.leases WHERE id = $1`, [leaseId]);
      assert.equal(after.state, 'revoked', 'exec still revokes when the command ends');
    } finally {
      await command.finish();
      await cutter.close();
    }
  });
});

describe('pg-broker exec and a lowered max_ttl', () => {
  test('exec follows the max_expires_at a renew answers with: once a lowered max_ttl holds the lease at its expiry, it stops renewing', async () => {
    const policy = { claims: { sub: 'shrinkcli:*' }, default_ttl: 60, max_ttl: 600 };
    await b.putPolicy('cli-shrink', policy);
    const command = await heldCommand();
    try {
      const token = await b.token({ sub: 'shrinkcli:a' });
      // ttl 8: the first renew comes at two thirds of it (about 5 s, room for exec to start its
      // command on a loaded machine). Before that, max_ttl drops below what the lease has already
      // run, so that renew answers with the lease's current expiry as its bound.
      const running = cli(['exec', '--ttl', '8', '--token', token, '--', process.execPath, '-e', command.script], { PG_BROKER_URL: url });
      const leaseId = await command.leaseId();
      await b.putPolicy('cli-shrink', { ...policy, default_ttl: 1, max_ttl: 1 });
      const renewals = async () => (await b.pg.query(`SELECT detail FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.renewed'`, [leaseId]));
      const [first] = await waitFor('the first renew', async () => ((await renewals()).length > 0 ? renewals() : null), 15_000);
      assert.equal(first.detail.capped, true, JSON.stringify(first.detail));
      // Past the lease's end, where an exec still steering by the issued bound would have renewed
      // again (every second or so, at two thirds of what is left).
      const [row] = await b.pg.query(`SELECT expires_at, max_expires_at FROM broker.leases WHERE id = $1`, [leaseId]);
      assert.equal(row.max_expires_at.getTime(), row.expires_at.getTime(), 'the bound now is the lease\'s expiry');
      await waitFor('the lease to reach its expiry', async () => (Date.now() > row.expires_at.getTime() + 1_000 ? true : null), 15_000);
      await command.finish();
      const run = await running;
      assert.equal(run.code, 0, run.stderr);
      assert.equal((await renewals()).length, 1, 'one renew, then none');
      assert.doesNotMatch(run.stderr, /could not renew/);
    } finally {
      await command.finish();
    }
  });
});

describe('pg-broker exec and a client clock ahead of the broker', () => {
  test('without --ttl a renew asks for the policy\'s default_ttl, whatever the local clock says; with --ttl it asks for that', async () => {
    await b.putPolicy('cli-skew', { claims: { sub: 'skewcli:*' }, default_ttl: 6, max_ttl: 600 });
    // The CLI's clock runs 3 s ahead: preloaded into its process, Date.now() answers 3 s late.
    const clockAhead = path.join(await mkdtemp(path.join(tmp, 'clock-')), 'ahead.mjs');
    await writeFile(clockAhead, 'const now = Date.now; Date.now = () => now() + 3_000;\n');
    const firstRenewTtl = async (ttlArgs: string[]) => {
      const command = await heldCommand();
      try {
        const token = await b.token({ sub: 'skewcli:a' });
        const running = cli(['exec', ...ttlArgs, '--token', token, '--', process.execPath, '-e', command.script], { PG_BROKER_URL: url, NODE_OPTIONS: `--import ${clockAhead}` });
        const leaseId = await command.leaseId();
        const [renewed] = await waitFor('the first renew', async () => {
          const rows = await b.pg.query(`SELECT detail FROM broker.audit_events WHERE lease_id = $1 AND type = 'lease.renewed'`, [leaseId]);
          return rows.length > 0 ? rows : null;
        }, 15_000);
        await command.finish();
        const run = await running;
        assert.equal(run.code, 0, run.stderr);
        return renewed.detail.ttl;
      } finally {
        await command.finish();
      }
    };
    // A ttl worked out from expires_at on this clock would be about 3 s short of the 6 issued.
    assert.equal(await firstRenewTtl([]), 6);
    assert.equal(await firstRenewTtl(['--ttl', '5']), 5);
  });
});

describe('pg-broker creds --output', () => {
  test('replaces an existing file or a symlink with a new 0600 file, never writing through either', async () => {
    const token = await b.token({ sub: 'cli:creds-file' });
    const dir = await mkdtemp(path.join(tmp, 'out-'));

    // An existing world-readable file: the result is 0600 and holds only the new credential.
    const existing = path.join(dir, 'pgpass');
    await writeFile(existing, 'old contents\n', { mode: 0o644 });
    const written = await cli(['creds', '--format', 'pgpass', '--token', token, '-o', existing]);
    assert.equal(written.code, 0, written.stderr);
    const st = await lstat(existing);
    assert.ok(st.isFile());
    assert.equal(st.mode & 0o777, 0o600);
    const [, , , user, password] = (await readFile(existing, 'utf8')).trim().split(':');
    await (await connectAs(b.pg, { username: user, password })).end();

    // A symlink at the path: the file it points to is untouched, the link becomes a 0600 file.
    const target = path.join(dir, 'elsewhere.txt');
    await writeFile(target, 'not yours\n', { mode: 0o644 });
    const link = path.join(dir, 'db.env');
    await symlink(target, link);
    const viaLink = await cli(['creds', '--format', 'dotenv', '--token', token, '-o', link]);
    assert.equal(viaLink.code, 0, viaLink.stderr);
    assert.equal(await readFile(target, 'utf8'), 'not yours\n');
    assert.equal((await lstat(target)).mode & 0o777, 0o644);
    const linkNow = await lstat(link);
    assert.ok(linkNow.isFile() && !linkNow.isSymbolicLink(), 'the symlink itself was replaced');
    assert.equal(linkNow.mode & 0o777, 0o600);
    assert.match(await readFile(link, 'utf8'), /^PGPASSWORD=/m);

    // A path that cannot be replaced fails with one line and leaves no temporary file behind.
    const occupied = path.join(dir, 'occupied');
    await mkdir(occupied);
    const refused = await cli(['creds', '--format', 'env', '--token', token, '-o', occupied]);
    assert.notEqual(refused.code, 0);
    assert.equal(refused.stderr.trim().split('\n').length, 1, refused.stderr);
    assert.deepEqual((await readdir(dir)).sort(), ['db.env', 'elsewhere.txt', 'occupied', 'pgpass']);
  });

  test('a file that cannot be written costs no lease: it is revoked, and the error names the path given', async () => {
    const token = await b.token({ sub: 'cli:creds-unwritable' });
    const file = path.join(tmp, 'no-such-dir', 'db.env');
    const run = await cli(['creds', '--format', 'dotenv', '--token', token, '-o', file]);
    assert.equal(run.code, 1, run.stderr);
    const leases = await b.pg.query(`SELECT id, state FROM broker.leases WHERE subject = 'cli:creds-unwritable'`);
    assert.equal(leases.length, 1);
    assert.equal(leases[0].state, 'revoked');
    assert.equal(run.stderr, `pg-broker: cannot write ${file}: ENOENT; lease ${leases[0].id} revoked\n`);
  });
});
