import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { TestBroker } from './helpers/broker.js';
import { BIN, startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let cli: CliBench['cli'];
let url: string;
let home: string;

before(async () => {
  ({ b, cli, url, home } = await startCliBench('pgcb-cli-policy-get-'));
});
after(async () => b?.close());

describe('pg-broker policy get and delete', () => {
  test('get prints the policy as the broker holds it; a name it does not hold, or a token that is no admin\'s, is refused', async () => {
    const stored = await b.putPolicy('cli-shown', { claims: { sub: 'cli:shown' }, default_ttl: 90, max_ttl: 300, description: 'for the get test' });
    const admin = await b.adminToken();
    const got = await cli(['policy', 'get', 'cli-shown', '--token', admin]);
    assert.deepEqual([got.code, got.stderr], [0, '']);
    assert.deepEqual(JSON.parse(got.stdout), stored);
    const missing = await cli(['policy', 'get', 'cli-never', '--token', admin]);
    assert.deepEqual([missing.code, missing.stdout], [1, '']);
    assert.match(missing.stderr, /^pg-broker: GET \/policies\/cli-never failed with 404 POLICY_NOT_FOUND/);
    const notAdmin = await cli(['policy', 'get', 'cli-shown', '--token', await b.token({ sub: 'cli:shown' })]);
    assert.equal(notAdmin.code, 1);
    assert.match(notAdmin.stderr, /^pg-broker: GET \/policies\/cli-shown failed with 403/);
  });

  test('delete removes the policy, prints what it was, and says its leases live on; a second delete is refused', async () => {
    await b.putPolicy('cli-doomed', { claims: { sub: 'cli:doomed' } });
    const issued = await b.issue(await b.token({ sub: 'cli:doomed' }), { policy: 'cli-doomed' });
    assert.equal(issued.status, 201);
    const admin = await b.adminToken();
    const deleted = await cli(['policy', 'delete', 'cli-doomed', '--token', admin]);
    assert.equal(deleted.code, 0, deleted.stderr);
    assert.equal(deleted.stdout, `deleted cli-doomed\tenabled\tapp_readers@${b.pg.database}\tttl 900/3600s\t{"sub":"cli:doomed"}\n`);
    assert.equal(deleted.stderr, 'leases issued under cli-doomed run until they end; to end them now: pg-broker leases revoke --policy cli-doomed\n');
    const gone = await cli(['policy', 'get', 'cli-doomed', '--token', admin]);
    assert.equal(gone.code, 1);
    assert.match(gone.stderr, /404 POLICY_NOT_FOUND/);
    const [lease] = await b.pg.query(`SELECT state FROM broker.leases WHERE id = $1`, [issued.body.lease_id]);
    assert.equal(lease.state, 'active', 'as the notice says');
    const again = await cli(['policy', 'delete', 'cli-doomed', '--token', admin]);
    assert.deepEqual([again.code, again.stdout], [1, '']);
    assert.match(again.stderr, /^pg-broker: GET \/policies\/cli-doomed failed with 404 POLICY_NOT_FOUND/);
  });

  test('delete --json prints the deleted policy whole, as get printed it', async () => {
    await b.putPolicy('cli-kept-copy', { claims: { sub: ['cli:a', 'cli:b'] }, max_active_leases: 3 });
    const admin = await b.adminToken();
    const before = await cli(['policy', 'get', 'cli-kept-copy', '--token', admin]);
    const deleted = await cli(['policy', 'delete', 'cli-kept-copy', '--json', '--token', admin]);
    assert.equal(deleted.code, 0, deleted.stderr);
    assert.deepEqual(JSON.parse(deleted.stdout), JSON.parse(before.stdout));
    const listed = await cli(['policy', 'list', '--token', admin]);
    assert.doesNotMatch(listed.stdout, /^cli-kept-copy\t/m);
    assert.match(listed.stdout, /^cli\t/m);
  });

  test('delete to a standard output that cannot take it (a full disk) still says on stderr what was deleted', async () => {
    const stored = await b.putPolicy('cli-lost', { claims: { sub: 'cli:lost' } });
    const out = openSync(path.join(home, 'deleted.json'), 'w');
    // A 100-byte file size limit: the policy's JSON does not fit.
    const child = spawn('prlimit', ['--fsize=100', process.execPath, BIN, 'policy', 'delete', 'cli-lost', '--json', '--token', await b.adminToken()],
      { env: { PATH: process.env.PATH!, HOME: home, PG_BROKER_URL: url }, stdio: ['ignore', out, 'pipe'] });
    closeSync(out);
    let err = '';
    child.stderr!.on('data', (d) => (err += d));
    const code = await new Promise((resolve) => child.on('exit', resolve));
    assert.equal(code, 1, err);
    const said = /^pg-broker: policy cli-lost is deleted; it was:\n([\s\S]*?\n\})\n/m.exec(err);
    assert.ok(said, err);
    assert.deepEqual(JSON.parse(said[1]), stored);
    assert.match(err, /cannot write to standard output: EFBIG/);
  });
});
