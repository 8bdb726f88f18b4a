import assert from 'node:assert/strict';
import { readFile, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { createRequire } from 'node:module';
import { parseEnv as parseDotenv } from 'node:util';
import { connectAs, type TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let tmp: string;
let cli: CliBench['cli'];
let checkout: CliBench['checkout'];

before(async () => {
  ({ b, home: tmp, cli, checkout } = await startCliBench('pgcb-cli-'));
});
after(async () => b?.close());

describe('pg-broker CLI', () => {
  test('exec runs the command with working PG* variables, then revokes the lease and drops the role', async () => {
    const token = await b.token({ sub: 'cli:exec' });
    const script = `
      const pg = require(${JSON.stringify(createRequire(import.meta.url).resolve('pg'))});
      const c = new pg.Client();
      c.connect().then(() => c.query('select current_user as u, count(*)::int as n from public.widgets'))
        .then((r) => { console.log(JSON.stringify({ user: r.rows[0].u, n: r.rows[0].n, url: process.env.DATABASE_URL.startsWith('postgresql://') })); return c.end(); })
        .catch((e) => { console.error(e.message); process.exit(3); });`;
    const run = await cli(['exec', '--token', token, '--', process.execPath, '-e', script]);
    assert.equal(run.code, 0, run.stderr);
    const seen = JSON.parse(run.stdout.trim());
    assert.match(seen.user, /^lease_cli_exec_/);
    assert.ok(seen.n > 0);
    assert.equal(seen.url, true);
    const [lease] = await b.pg.query(`SELECT state FROM broker.leases WHERE username = $1`, [seen.user]);
    assert.equal(lease.state, 'revoked');
    const roles = await b.pg.query(`SELECT 1 FROM pg_roles WHERE rolname = $1`, [seen.user]);
    assert.equal(roles.length, 0, 'the role is gone');
  });

  test('exec returns the command exit code, and --keep leaves the lease active; the command never sees the token', async () => {
    const token = await b.token({ sub: 'cli:keep' });
    const script = 'console.log(JSON.stringify({ user: process.env.PGUSER, token: process.env.PG_BROKER_TOKEN ?? null, other: process.env.PASSED_ON })); process.exit(7)';
    // The token comes from $PG_BROKER_TOKEN here, the way CI passes it.
    const run = await cli(['exec', '--keep', '--', process.execPath, '-e', script], { PG_BROKER_TOKEN: token, PASSED_ON: 'yes' });
    assert.equal(run.code, 7, run.stderr);
    const seen = JSON.parse(run.stdout.trim());
    assert.equal(seen.token, null, 'PG_BROKER_TOKEN is not passed to the command');
    assert.equal(seen.other, 'yes', 'the rest of the environment is');
    const [lease] = await b.pg.query(`SELECT state FROM broker.leases WHERE username = $1`, [seen.user]);
    assert.equal(lease.state, 'active');
  });

  test('creds prints env, json, uri and pgpass that parse back to a working credential; files are 0600', async () => {
    const token = await b.token({ sub: 'cli:creds' });
    const json = JSON.parse((await cli(['creds', '--format', 'json', '--token', token])).stdout);
    const client = await connectAs(b.pg, json);
    await client.end();

    const env = await cli(['creds', '--format', 'env', '--token', token]);
    const vars = Object.fromEntries([...env.stdout.matchAll(/^export (\w+)='([^']*)'$/gm)].map((m) => [m[1], m[2]]));
    assert.equal(vars.PGPORT, String(b.pg.port));
    await (await connectAs(b.pg, { username: vars.PGUSER, password: vars.PGPASSWORD, database: vars.PGDATABASE })).end();

    const uri = new URL((await cli(['creds', '--format', 'uri', '--token', token])).stdout.trim());
    await (await connectAs(b.pg, { username: uri.username, password: decodeURIComponent(uri.password), database: uri.pathname.slice(1) })).end();

    const pgpassFile = path.join(tmp, 'pgpass');
    await writeFile(pgpassFile, 'old contents\n', { mode: 0o644 });
    const written = await cli(['creds', '--format', 'pgpass', '--token', token, '--output', pgpassFile]);
    assert.equal(written.code, 0, written.stderr);
    assert.equal((await stat(pgpassFile)).mode & 0o777, 0o600);
    const [host, port, database, user, password] = (await readFile(pgpassFile, 'utf8')).trim().split(':');
    assert.deepEqual([host, port, database], [b.pg.host, String(b.pg.port), b.pg.database]);
    await (await connectAs(b.pg, { username: user, password })).end();

    const dotenvFile = path.join(tmp, 'db.env');
    await cli(['creds', '--format', 'dotenv', '--token', token, '-o', dotenvFile]);
    const dotenv = parseDotenv(await readFile(dotenvFile, 'utf8'));
    await (await connectAs(b.pg, { username: dotenv.PGUSER!, password: dotenv.PGPASSWORD! })).end();

    const bad = await cli(['creds', '--format', 'xml', '--token', token]);
    assert.notEqual(bad.code, 0);
    assert.match(bad.stderr, /xml/);
  });

  test('creds obtains a token from a GitHub Actions-shaped token endpoint', async () => {
    const requests: string[] = [];
    const token = await b.token({ sub: 'cli:github' });
    const gh = http.createServer((req, res) => {
      requests.push(`${req.url} ${req.headers.authorization}`);
      const ok = req.headers.authorization === 'Bearer runtime-secret';
      res.writeHead(ok ? 200 : 401, { 'content-type': 'application/json' });
      res.end(JSON.stringify(ok ? { value: token, count: 1 } : { message: 'bad runtime token' }));
    });
    await new Promise<void>((r) => gh.listen(0, '127.0.0.1', r));
    const endpoint = `http://127.0.0.1:${(gh.address() as AddressInfo).port}/_apis/token?api-version=2.0`;
    try {
      const run = await cli(['creds', '--format', 'json', '--audience', 'pg-broker'], {
        ACTIONS_ID_TOKEN_REQUEST_URL: endpoint,
        ACTIONS_ID_TOKEN_REQUEST_TOKEN: 'runtime-secret',
      });
      assert.equal(run.code, 0, run.stderr);
      assert.match(JSON.parse(run.stdout).username, /^lease_cli_github_/);
      assert.match(requests[0], /audience=pg-broker/);
      const refused = await cli(['creds'], { ACTIONS_ID_TOKEN_REQUEST_URL: endpoint, ACTIONS_ID_TOKEN_REQUEST_TOKEN: 'wrong' });
      assert.equal(refused.code, 1);
      assert.match(refused.stderr, /GitHub Actions token request answered 401/);
    } finally {
      gh.close();
    }
  });

  test('policy evaluate names the failing claim for a denied token, and exits 0 for an admitted one', async () => {
    const denied = await cli(['policy', 'evaluate', '--token', await b.token({ sub: 'someone:else' })]);
    assert.equal(denied.code, 2);
    assert.match(denied.stdout, /✗ denied\s+cli: claim sub is "someone:else", wants "cli:\*"/);
    const admitted = await cli(['policy', 'evaluate', '--token', await b.token({ sub: 'cli:ok' })]);
    assert.equal(admitted.code, 0);
    assert.match(admitted.stdout, /✓ admitted cli/);
  });

  test('policy evaluate exits 2 when the only admitting policy cannot issue, and says why', async () => {
    // Two databases, one dropped after its policy was stored.
    for (const db of ['cli_here', 'cli_gone']) await b.pg.query(`CREATE DATABASE ${db}`, [], 'postgres');
    await b.putPolicy('cli-here', { claims: { sub: 'here:*' }, database: 'cli_here' });
    await b.putPolicy('cli-gone', { claims: { sub: 'gone:*' }, database: 'cli_gone' });
    await b.pg.query('DROP DATABASE cli_gone', [], 'postgres');
    // Storing the policy left "it exists" for BROKER_GRANT_RECHECK_INTERVAL (60 s here); as if
    // that had passed:
    b.app.grantRoles.forgetDatabase('cli_gone');
    const fine = await cli(['policy', 'evaluate', '--token', await b.token({ sub: 'here:me' })]);
    assert.equal(fine.code, 0, fine.stdout);
    assert.match(fine.stdout, /✓ admitted cli-here\n/);
    const blocked = await cli(['policy', 'evaluate', '--token', await b.token({ sub: 'gone:me' })]);
    assert.equal(blocked.code, 2, blocked.stdout);
    assert.match(blocked.stdout, /! admitted cli-gone, but issues nothing now: database cli_gone does not exist/);
  });

  test('leases list and revoke --subject work for an admin', async () => {
    const tok = await b.token({ sub: 'cli:leaver' });
    await b.issue(tok);
    await b.issue(tok);
    const admin = await b.adminToken();
    const list = await cli(['leases', 'list', '--subject', 'cli:leaver', '--state', 'active', '--json', '--token', admin]);
    assert.equal(JSON.parse(list.stdout).items.length, 2);
    const lines = await cli(['leases', 'list', '--subject', 'cli:leaver', '--state', 'active', '--token', admin]);
    assert.deepEqual([lines.stdout.trim().split('\n').length, lines.stderr], [2, '']);
    const revoked = await cli(['leases', 'revoke', '--subject', 'cli:leaver', '--token', admin]);
    assert.match(revoked.stdout, /revoked 2 lease\(s\)/);
    // Nothing left to list: no lines on stdout, and a word on stderr for whoever is reading.
    const empty = await cli(['leases', 'list', '--subject', 'cli:leaver', '--state', 'active', '--token', admin]);
    assert.deepEqual([empty.code, empty.stdout, empty.stderr], [0, '', 'no leases match\n']);
    const none = await cli(['leases', 'revoke', '--token', admin]);
    assert.equal(none.code, 1);
    assert.match(none.stderr, /name a lease id, or --subject/);
  });

  test('bin/pg-broker.js, the checkout\'s entry, runs the same CLI from the TypeScript sources through tsx', async () => {
    // The other suites run the CLI compiled (helpers/bundle.ts); this is the path `npx pg-broker` takes in a checkout.
    const [viaTsx, compiled] = await Promise.all([checkout(['--help']), cli(['--help'])]);
    assert.equal(viaTsx.code, 0, viaTsx.stderr);
    assert.deepEqual(viaTsx, compiled);
    const creds = await checkout(['creds', '--format', 'json', '--token', await b.token({ sub: 'cli:checkout' })]);
    assert.equal(creds.code, 0, creds.stderr);
    await (await connectAs(b.pg, JSON.parse(creds.stdout))).end();
  });

  test('every subcommand has --help with examples, and unknown commands fail with one line', async () => {
    for (const cmd of [['serve'], ['migrate'], ['dev'], ['demo'], ['creds'], ['exec'], ['policy', 'apply'], ['policy', 'evaluate'], ['leases', 'list'], ['leases', 'revoke'], ['audit'], ['policy', 'get'], ['policy', 'delete']]) {
      const run = await cli([...cmd, '--help']);
      assert.equal(run.code, 0, cmd.join(' '));
      assert.match(run.stdout, /Examples:/, `${cmd.join(' ')} --help shows examples`);
    }
    // -o replaces the file it names, so no example may point it at a file holding other entries.
    const credsHelp = (await cli(['creds', '--help'])).stdout;
    assert.doesNotMatch(credsHelp, /-o ~\/\.pgpass/);
    assert.match(credsHelp, /replaces the whole file/);
    const unknown = await cli(['frobnicate']);
    assert.notEqual(unknown.code, 0);
    const serve = await cli(['serve'], { DATABASE_URL: '' });
    assert.equal(serve.code, 1);
    assert.equal(serve.stderr.trim(), 'pg-broker: configuration error: DATABASE_URL: is required');
    // migrate checks the marker role name as serve does, before it touches the database.
    const badRole = await cli(['migrate'], { DATABASE_URL: 'postgres://broker@127.0.0.1:1/broker', BROKER_MANAGED_ROLE: 'Managed' });
    assert.equal(badRole.code, 1);
    assert.match(badRole.stderr.trim(), /^pg-broker: configuration error: BROKER_MANAGED_ROLE: must be a lowercase identifier/);
  });

  test('migrate checks DATABASE_URL as serve does, and a failed login names it without the password', async () => {
    const wrongScheme = await cli(['migrate'], { DATABASE_URL: 'mysql://broker@127.0.0.1/broker' });
    assert.equal(wrongScheme.code, 1);
    assert.equal(wrongScheme.stderr.trim(), 'pg-broker: configuration error: DATABASE_URL: must be a postgres:// or postgresql:// URL');
    const good = new URL(b.pg.brokerUrl);
    const wrongPassword = new URL(good.href);
    wrongPassword.password = 'not-the-password';
    const refused = await cli(['migrate'], { DATABASE_URL: wrongPassword.href });
    assert.equal(refused.code, 1);
    assert.match(refused.stderr.trim(), new RegExp(`^pg-broker: DATABASE_URL \\(user broker at 127\\.0\\.0\\.1:${good.port}, database broker\\): password authentication failed for user "broker"$`));
    assert.doesNotMatch(refused.stderr, /not-the-password/);
    const fine = await cli(['migrate'], { DATABASE_URL: good.href });
    assert.equal(fine.code, 0, fine.stderr);
    assert.equal(fine.stdout.trim(), 'database is up to date');
  });
});
