import assert from 'node:assert/strict';
import { mkdir, writeFile } from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import type { TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let url: string;
let tmp: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, url, home: tmp, cli } = await startCliBench('pgcb-cli-policy-'));
});
after(async () => b?.close());

/** Passes every request on to the broker, except that it drops the connection of those `cut` picks. */
async function cuttingProxy(cut: (req: http.IncomingMessage) => boolean): Promise<http.Server> {
  const upstream = new URL(url);
  const proxy = http.createServer((req, res) => {
    if (cut(req)) return void req.socket.destroy();
    const forward = http.request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode!, answer.headers);
      answer.pipe(res);
    });
    req.pipe(forward);
  });
  await new Promise<void>((r) => proxy.listen(0, '127.0.0.1', r));
  return proxy;
}

const policyNames = async () => (await b.pg.query(`SELECT name FROM broker.policies ORDER BY name`)).map((r) => r.name as string);

describe('pg-broker policy apply', () => {
  test('policy apply is idempotent, --dry-run changes nothing, --prune deletes, and a bad file names the policy', async () => {
    const admin = await b.adminToken();
    const file = path.join(tmp, 'policies.yaml');
    const doc = (extra = '') => `policies:
  file-a:
    issuer: ${b.issuer.issuer}
    claims: { sub: "file:a:*" }
    grant_role: app_readers
    database: ${b.pg.database}
  file-b:
    issuer: ${b.issuer.issuer}
    claims:
      /kubernetes.io/namespace: [prod, staging]
    grant_role: app_readers
    database: ${b.pg.database}
    max_ttl: 1200
${extra}`;
    await writeFile(file, doc());
    const dry = await cli(['policy', 'apply', '-f', file, '--dry-run', '--token', admin]);
    assert.match(dry.stdout, /\+ create file-a/);
    assert.equal((await b.pg.query(`SELECT 1 FROM broker.policies WHERE name = 'file-a'`)).length, 0, 'dry run applied nothing');
    const first = await cli(['policy', 'apply', '-f', file, '--token', admin]);
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /2 created/);
    // The test cluster leaves CONNECT on the broker's database to PUBLIC: stored, and said on stderr.
    assert.deepEqual(first.stderr.trim().split('\n').map((line) => line.replace(/: credentials issued .*PUBLIC holds CONNECT there.*$/, ': …')),
      ['pg-broker: warning: policy file-a: …', 'pg-broker: warning: policy file-b: …']);
    const second = await cli(['policy', 'apply', '-f', file, '--token', admin]);
    assert.match(second.stdout, /^no changes \(2 unchanged\)$/m);

    await writeFile(file, doc().replace('max_ttl: 1200', 'max_ttl: 1800'));
    assert.match((await cli(['policy', 'apply', '-f', file, '--token', admin])).stdout, /~ updated file-b \(max_ttl\)/);

    const pruned = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin]);
    assert.match(pruned.stdout, /- deleted cli/);
    assert.deepEqual((await b.pg.query(`SELECT name FROM broker.policies ORDER BY name`)).map((r) => r.name), ['file-a', 'file-b']);
    await b.putPolicy('cli', { claims: { sub: 'cli:*' }, default_ttl: 120, max_ttl: 600, max_active_leases: 50 });

    await writeFile(file, doc(`  file-c:\n    issuer: ${b.issuer.issuer}\n    claims: {}\n    grant_role: app_readers\n    database: broker\n`));
    const bad = await cli(['policy', 'apply', '-f', file, '--token', admin]);
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /policies\.yaml: policy file-c: a policy must bind at least one claim/);

    await writeFile(file, doc(`  file-d:\n    issuer: ${b.issuer.issuer}\n    claims: { sub: x }\n    grant_role: pg_execute_server_program\n    database: broker\n`));
    const unsafe = await cli(['policy', 'apply', '-f', file, '--token', admin]);
    assert.equal(unsafe.code, 1);
    // The broker refuses this one: its reason is on the policy's own line.
    assert.match(unsafe.stdout, /^✗ FAILED to create file-d: 400 INVALID_POLICY: .*predefined PostgreSQL role/m);
    assert.match(unsafe.stderr, /policies\.yaml: 1 policy failed \(file-d\)\n$/);

    // Checked before anything is sent, by the same rules as the API.
    await writeFile(file, doc(`  file-e:\n    issuer: ${b.issuer.issuer}\n    claims: { sub: x }\n    grant_role: app_readers\n    database: broker\n    connection_limit: 0\n`));
    const locked = await cli(['policy', 'apply', '-f', file, '--token', admin]);
    assert.equal(locked.code, 1);
    assert.match(locked.stderr, /policy file-e: connection_limit 0 would issue credentials that can never log in/);
  });

  test('--dry-run prints the per-policy lines the apply then prints, = unchanged included, in the same order, marked as a dry run', async () => {
    const admin = await b.adminToken();
    const file = path.join(tmp, 'dry.yaml');
    const policy = (name: string, maxTtl: number) => `  ${name}:\n    issuer: ${b.issuer.issuer}\n    claims: { sub: "${name}:*" }\n`
      + `    grant_role: app_readers\n    database: ${b.pg.database}\n    max_ttl: ${maxTtl}\n`;
    await writeFile(file, `policies:\n${policy('dry-a', 1200)}${policy('dry-b', 1200)}`);
    const first = await cli(['policy', 'apply', '-f', file, '--token', admin]);
    assert.equal(first.code, 0, first.stderr);
    await writeFile(file, `policies:\n${policy('dry-a', 1200)}${policy('dry-b', 1800)}${policy('dry-c', 1200)}`);
    const dry = (await cli(['policy', 'apply', '-f', file, '--dry-run', '--token', admin])).stdout.trim().split('\n');
    assert.deepEqual(dry.slice(0, 3), ['= unchanged dry-a', '~ update dry-b (max_ttl)', '+ create dry-c']);
    assert.match(dry[3], /^\(dry run: nothing applied; 1 to create, 1 to update, 0 to delete, 1 unchanged\. .*apply may still refuse some\.\)$/);
    assert.equal(dry.length, 4);
    assert.ok(!(await policyNames()).includes('dry-c'), 'nothing applied');
    const real = (await cli(['policy', 'apply', '-f', file, '--token', admin])).stdout.trim().split('\n');
    assert.deepEqual(real.slice(0, 3), dry.slice(0, 3).map((line) => line.replace(/^([+~]) (create|update) /, '$1 $2d ')));
    // With nothing to change, it still accounts for every policy in the file.
    const idle = await cli(['policy', 'apply', '-f', file, '--dry-run', '--token', admin]);
    assert.equal(idle.stdout, '= unchanged dry-a\n= unchanged dry-b\n= unchanged dry-c\nno changes (3 unchanged; dry run: nothing applied)\n');
  });
  test('a "policies" that is missing, empty or not a map or list is refused before anything is deleted; an explicit empty map prunes all', async () => {
    const admin = await b.adminToken();
    await b.putPolicy('keep-me', { claims: { sub: 'keep:*' } });
    const before = await policyNames();
    assert.ok(before.length >= 2, before.join());
    const file = path.join(tmp, 'p.yaml');
    const refusals: Array<[string, RegExp]> = [
      ['policies: ci\n', /^pg-broker: .*p\.yaml: "policies" must be a map or a list, not "ci"$/],
      ['policies: 5\n', /^pg-broker: .*p\.yaml: "policies" must be a map or a list, not 5$/],
      ['policies:\n', /^pg-broker: .*p\.yaml: "policies" has no value; to mean no policies at all, write "policies: \{\}"$/],
      ['policy:\n  ci: {}\n', /^pg-broker: .*p\.yaml: no top-level "policies" key; to mean no policies at all, write "policies: \{\}"$/],
      ['', /^pg-broker: .*p\.yaml: the file is empty; expected a top-level "policies" map or list$/],
      ['# nothing but a comment\n', /^pg-broker: .*p\.yaml: expected a top-level "policies" map or list$/],
      ['- ci\n', /^pg-broker: .*p\.yaml: expected a top-level "policies" map or list$/],
      ['policies:\n  - ci\n', /^pg-broker: .*p\.yaml: policy #1: a list entry must be a map whose "name" is a string$/],
    ];
    for (const [text, error] of refusals) {
      await writeFile(file, text);
      const run = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin]);
      assert.equal(run.code, 1, `${JSON.stringify(text)}: ${run.stdout}`);
      assert.match(run.stderr.trim(), error, JSON.stringify(text));
      assert.equal(run.stdout, '', `${JSON.stringify(text)}: nothing planned or applied`);
      assert.deepEqual(await policyNames(), before, `${JSON.stringify(text)}: nothing deleted`);
    }

    // The good input: a proper list applies and prunes the rest.
    await writeFile(file, `policies:\n  - name: listed\n    issuer: ${b.issuer.issuer}\n    claims: { sub: "listed:*" }\n    grant_role: app_readers\n    database: ${b.pg.database}\n`);
    const listed = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin]);
    assert.equal(listed.code, 0, listed.stderr);
    assert.deepEqual(await policyNames(), ['listed']);

    // An explicit empty map is the way to say "no policies": with --prune, every policy goes.
    await writeFile(file, 'policies: {}\n');
    const emptied = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin]);
    assert.equal(emptied.code, 0, emptied.stderr);
    assert.match(emptied.stdout, /- deleted listed/);
    assert.deepEqual(await policyNames(), []);
    await b.putPolicy('cli', { claims: { sub: 'cli:*' }, default_ttl: 120, max_ttl: 600, max_active_leases: 50 });
  });
  test('a file that cannot be read or parsed is named, with what is wrong and where; the same policies as good JSON apply', async () => {
    const admin = await b.adminToken();
    const dir = path.join(tmp, 'unreadable');
    await mkdir(dir, { recursive: true });
    const refused = async (file: string) => {
      const run = await cli(['policy', 'apply', '-f', file, '--token', admin]);
      assert.equal(run.code, 1, run.stdout);
      assert.equal(run.stdout, '');
      assert.equal(run.stderr.split('\n').length, 2, `one line: ${run.stderr}`);
      return run.stderr.trim();
    };
    assert.equal(await refused(dir), `pg-broker: ${dir}: is a directory, not a policies file`);
    assert.equal(await refused(path.join(dir, 'absent.yaml')), `pg-broker: ${path.join(dir, 'absent.yaml')}: no such file`);

    // JSON mistakes are reported as JSON, at a line and column.
    const json = path.join(dir, 'p.json');
    await writeFile(json, '{\n  "policies": {\n    "a": {"issuer": "x",}\n  }\n}\n');
    assert.equal(await refused(json), `pg-broker: ${json}: not valid JSON: Expected double-quoted property name at line 3, column 25`);
    // JSON.parse would keep the second of two policies of one name; the file is refused instead.
    await writeFile(json, '{"policies": {"a": {}, "a": {}}}\n');
    assert.match(await refused(json), new RegExp(`^pg-broker: ${json}: not valid JSON: Map keys must be unique at line 1, column 24$`));

    // A YAML error keeps its position, and does not end in a dangling ":".
    const yaml = path.join(dir, 'p.yaml');
    await writeFile(yaml, 'policies:\n  a: {issuer: x\n');
    assert.match(await refused(yaml), new RegExp(`^pg-broker: ${yaml}: not valid YAML: .* at line 3, column 1$`));

    // The good input: the same file as valid JSON applies.
    await writeFile(json, JSON.stringify({ policies: { 'from-json': { issuer: b.issuer.issuer, claims: { sub: 'json:*' }, grant_role: 'app_readers', database: b.pg.database } } }));
    const applied = await cli(['policy', 'apply', '-f', json, '--token', admin]);
    assert.equal(applied.code, 0, applied.stderr);
    assert.ok((await policyNames()).includes('from-json'));
  });
  test('every policy is tried and reported as the broker answered; a failure exits 1 and withholds --prune', async () => {
    const admin = await b.adminToken();
    await b.putPolicy('stays', { claims: { sub: 'stays:*' } });
    const file = path.join(tmp, 'partial.yaml');
    const policy = (name: string, extra: Record<string, string>) => [`  ${name}:`, ...Object.entries({
      issuer: b.issuer.issuer, claims: `{ sub: "${name}:*" }`, grant_role: 'app_readers', database: b.pg.database, ...extra,
    }).map(([k, v]) => `    ${k}: ${v}`)].join('\n');
    await writeFile(file, ['policies:',
      policy('a-first', {}),
      policy('b-broken', { grant_role: 'no_such_role' }),
      policy('c-third', { issuer: 'https://not-allowed.example' }),
      ''].join('\n'));

    // A dry run cannot know what the broker will refuse, and says so.
    const dry = await cli(['policy', 'apply', '-f', file, '--prune', '--dry-run', '--token', admin]);
    assert.equal(dry.code, 0, dry.stderr);
    assert.match(dry.stdout, /^\+ create b-broken$/m);
    assert.match(dry.stdout, /apply may still refuse some/);

    const run = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin]);
    assert.equal(run.code, 1, run.stdout);
    const lines = run.stdout.trim().split('\n');
    assert.equal(lines[0], '+ created a-first');
    assert.match(lines[1], /^✗ FAILED to create b-broken: 400 INVALID_POLICY: .*no_such_role/);
    assert.match(lines[2], /^✗ FAILED to create c-third: 400 INVALID_POLICY: .*not-allowed\.example/);
    assert.match(lines[3], /^! not pruned because of the failures above; kept: .*\bstays\b/);
    assert.equal(lines[4], 'applied in part: 1 created, 0 updated, 0 deleted, 0 unchanged, 2 FAILED');
    assert.equal(lines.length, 5, run.stdout);
    assert.match(run.stderr, /partial\.yaml: 2 policies failed \(b-broken, c-third\); nothing was pruned\n$/);
    const names = await policyNames();
    assert.ok(names.includes('a-first') && names.includes('stays') && !names.includes('b-broken'), names.join());

    // The good input: with the two fixed, the rest applies and prunes.
    await writeFile(file, ['policies:', policy('a-first', {}), policy('b-broken', {}), policy('c-third', {}), ''].join('\n'));
    const fixed = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin]);
    assert.equal(fixed.code, 0, fixed.stderr);
    assert.match(fixed.stdout, /^= unchanged a-first\n\+ created b-broken\n\+ created c-third\n/);
    assert.match(fixed.stdout, /^- deleted stays$/m);
    assert.match(fixed.stdout, /^applied: 2 created, 0 updated, \d+ deleted, 1 unchanged$/m);
    assert.deepEqual(await policyNames(), ['a-first', 'b-broken', 'c-third']);
    await b.putPolicy('cli', { claims: { sub: 'cli:*' }, default_ttl: 120, max_ttl: 600, max_active_leases: 50 });
  });
  test('after a call the broker never answered, the rest are reported as not tried rather than each waiting for its own timeout', async () => {
    const admin = await b.adminToken();
    // The connection carrying PUT /policies/n-cut is dropped.
    const proxy = await cuttingProxy((req) => req.method === 'PUT' && req.url === '/policies/n-cut');
    try {
      const file = path.join(tmp, 'cut.yaml');
      const entry = (name: string) => `  ${name}: { issuer: "${b.issuer.issuer}", claims: { sub: "${name}:*" }, grant_role: app_readers, database: ${b.pg.database} }`;
      await writeFile(file, ['policies:', entry('n-before'), entry('n-cut'), entry('n-after'), ''].join('\n'));
      const run = await cli(['policy', 'apply', '-f', file, '--token', admin], { PG_BROKER_URL: `http://127.0.0.1:${(proxy.address() as AddressInfo).port}` });
      assert.equal(run.code, 1, run.stdout);
      const lines = run.stdout.trim().split('\n');
      assert.equal(lines[0], '+ created n-before');
      assert.match(lines[1], /^✗ FAILED to create n-cut: cannot reach the broker at /);
      assert.equal(lines[2], '✗ not tried: create n-after (the broker did not answer an earlier call)');
      assert.equal(lines[3], 'applied in part: 1 created, 0 updated, 0 deleted, 0 unchanged, 2 FAILED');
      assert.match(run.stderr, /cut\.yaml: 2 policies failed \(n-cut, n-after\)\n$/);
      // The good input: straight to the broker, the same file completes.
      const direct = await cli(['policy', 'apply', '-f', file, '--token', admin]);
      assert.equal(direct.code, 0, direct.stderr);
      assert.match(direct.stdout, /^= unchanged n-before\n\+ created n-cut\n\+ created n-after\n/);
    } finally {
      proxy.closeAllConnections();
      await new Promise<void>((r) => proxy.close(() => r()));
    }
  });

  test('a prune whose first DELETE goes unanswered tries no further DELETE, and deletes nothing it did not report', async () => {
    const admin = await b.adminToken();
    let cut = false;
    // The connection carrying the first DELETE is dropped.
    const proxy = await cuttingProxy((req) => req.method === 'DELETE' && !cut && (cut = true));
    try {
      const file = path.join(tmp, 'prune-cut.yaml');
      await writeFile(file, `policies:\n  p-keep: { issuer: "${b.issuer.issuer}", claims: { sub: "p-keep:*" }, grant_role: app_readers, database: ${b.pg.database} }\n`);
      for (const name of ['p-drop-a', 'p-drop-b']) await b.putPolicy(name, { claims: { sub: `${name}:*` } });
      const others = (await policyNames()).filter((n) => n !== 'p-keep');
      const run = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin], { PG_BROKER_URL: `http://127.0.0.1:${(proxy.address() as AddressInfo).port}` });
      assert.equal(run.code, 1, run.stdout);
      const lines = run.stdout.trim().split('\n');
      assert.match(lines[1], /^✗ FAILED to delete \S+: cannot reach the broker at /);
      const notTried = lines.filter((l) => l.startsWith('✗ not tried: delete '));
      assert.equal(notTried.length, others.length - 1, run.stdout);
      assert.deepEqual((await policyNames()).filter((n) => n !== 'p-keep'), others, 'nothing was deleted');
      // The good input: straight to the broker, the same prune completes.
      const direct = await cli(['policy', 'apply', '-f', file, '--prune', '--token', admin]);
      assert.equal(direct.code, 0, direct.stderr);
      assert.deepEqual(await policyNames(), ['p-keep']);
    } finally {
      proxy.closeAllConnections();
      await new Promise<void>((r) => proxy.close(() => r()));
    }
  });
});
