import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { buildCli } from '../src/cli/index.js';
import type { TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let tmp: string;
let url: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, home: tmp, url, cli } = await startCliBench('pgcb-cli-input-'));
});
after(async () => b?.close());

describe('pg-broker refuses unclear input with a clear error', () => {
  test('a mistyped subcommand is named as unknown, with the one meant; a bare pg-broker still serves', async () => {
    const typo = await cli(['cred']);
    assert.equal(typo.code, 1);
    assert.match(typo.stderr, /^error: unknown command 'cred'\n\(Did you mean creds\?\)/);
    const nested = await cli(['leases', 'revok', 'x']);
    assert.equal(nested.code, 1);
    assert.match(nested.stderr, /^error: unknown command 'revok'\n\(Did you mean revoke\?\)/);
    // The good input: the subcommand spelled right runs it (and finds no token here).
    const creds = await cli(['creds']);
    assert.equal(creds.code, 1);
    assert.match(creds.stderr, /^pg-broker: no token: /);
    // Bare, and by name, it is serve: both stop at the same missing setting.
    for (const args of [[], ['serve']]) {
      const serve = await cli(args, { DATABASE_URL: '' });
      assert.equal(serve.code, 1, args.join());
      assert.equal(serve.stderr.trim(), 'pg-broker: configuration error: DATABASE_URL: is required');
    }
  });
  test('leases revoke refuses a lease id together with --subject, --issuer or --policy before sending anything; each alone works, an id with a --reason', async () => {
    const admin = await b.adminToken();
    const one = (await b.issue(await b.token({ sub: 'cli:revoke-one' }))).body.lease_id as string;
    const other = (await b.issue(await b.token({ sub: 'cli:revoke-other' }))).body.lease_id as string;
    const state = async (id: string) => (await b.pg.query(`SELECT state FROM broker.leases WHERE id = $1`, [id]))[0].state;
    const refusals: Array<[string[], RegExp]> = [
      [['--subject', 'cli:revoke-other'], /^pg-broker: give a lease id or --subject, not both: an id revokes that one lease, whatever the filters say$/],
      [['--issuer', b.issuer.issuer, '--policy', 'cli'], /^pg-broker: give a lease id or --issuer and --policy, not both/],
    ];
    for (const [extra, error] of refusals) {
      const run = await cli(['leases', 'revoke', one, ...extra, '--token', admin]);
      assert.equal(run.code, 1, extra.join(' '));
      assert.match(run.stderr.trim(), error);
      assert.equal(run.stdout, '');
    }
    assert.equal(await state(one), 'active', 'nothing was revoked');
    assert.equal(await state(other), 'active');

    // The good input: the id alone (with a reason, which the lease keeps), then the subject alone.
    const byId = await cli(['leases', 'revoke', one, '--reason', 'pasted in a ticket', '--token', admin]);
    assert.equal(byId.code, 0, byId.stderr);
    assert.equal(byId.stdout, `lease ${one}: revoked\n`);
    assert.equal((await b.pg.query(`SELECT end_reason FROM broker.leases WHERE id = $1`, [one]))[0].end_reason, 'pasted in a ticket');
    const bySubject = await cli(['leases', 'revoke', '--subject', 'cli:revoke-other', '--reason', 'left', '--token', admin]);
    assert.equal(bySubject.code, 0, bySubject.stderr);
    assert.equal(bySubject.stdout, `revoked 1 lease(s): ${other}\n`);
    assert.equal(await state(other), 'revoked');
  });
  test('an empty option, argument or variable is refused, never read as not given; the same with a value works', async () => {
    const leases = async (sub: string) => (await b.pg.query(`SELECT 1 FROM broker.leases WHERE subject = $1`, [sub])).length;
    const token = await b.token({ sub: 'cli:empty-me' });
    // A token of another identity, where a fallback would find it.
    const otherFile = path.join(tmp, 'other.jwt');
    await writeFile(otherFile, await b.token({ sub: 'cli:empty-other' }));
    const admin = await b.adminToken();
    const refusals: Array<[string[], Record<string, string>, string]> = [
      [['creds', '--token', token, '-o', ''], {}, "error: option '-o, --output <file>' is empty (an unset variable?)"],
      [['creds', '--token', token, '--output='], {}, "error: option '-o, --output <file>' is empty (an unset variable?)"],
      [['creds', '--token', ''], { PG_BROKER_TOKEN_FILE: otherFile }, "error: option '--token <jwt>' is empty (an unset variable?)"],
      [['creds', '--token-file', ' '], { PG_BROKER_TOKEN_FILE: otherFile }, "error: option '--token-file <path>' is empty (an unset variable?)"],
      [['creds', '--token', token, '--policy', ''], {}, "error: option '--policy <name>' is empty (an unset variable?)"],
      [['creds', '--token', token, '--url', ''], {}, "error: option '--url <url>' is empty (an unset variable?)"],
      [['exec', '--token', token, '--', ''], {}, "error: argument 'command' is empty (an unset variable?)"],
      [['leases', 'revoke', '', '--token', admin], {}, "error: argument 'id' is empty (an unset variable?)"],
      [['leases', 'revoke', '--subject', '', '--policy', 'cli', '--token', admin], {}, "error: option '--subject <sub>' is empty (an unset variable?)"],
      [['policy', 'apply', '-f', '', '--token', admin], {}, "error: option '-f, --file <file>' is empty (an unset variable?)"],
      [['creds'], { PG_BROKER_TOKEN: '', PG_BROKER_TOKEN_FILE: otherFile }, 'pg-broker: PG_BROKER_TOKEN is set but empty (a missing secret or variable?); give it a value, or unset it'],
      [['creds'], { PG_BROKER_TOKEN_FILE: '' }, 'pg-broker: PG_BROKER_TOKEN_FILE is set but empty (a missing secret or variable?); give it a value, or unset it'],
      [['creds', '--token', token], { PG_BROKER_URL: ' ' }, 'pg-broker: PG_BROKER_URL is set but empty (a missing secret or variable?); give it a value, or unset it'],
    ];
    for (const [args, env, error] of refusals) {
      const run = await cli(args, env);
      const what = `${args.map((a) => (a.length > 100 ? '<token>' : a)).join(' ')} ${JSON.stringify(env)}`;
      assert.equal(run.code, 1, what);
      assert.equal(run.stderr.split('\n')[0], error, what);
      assert.equal(run.stdout, '', `${what}: nothing printed, the password least of all`);
    }
    assert.equal(await leases('cli:empty-me'), 0, 'nothing was issued');
    assert.equal(await leases('cli:empty-other'), 0, 'no fallback to another token');
    assert.equal((await b.pg.query(`SELECT 1 FROM broker.leases WHERE state <> 'active' AND subject LIKE 'cli:empty%'`)).length, 0);

    // The good input: each of those with a value.
    const file = path.join(tmp, 'empty-ok.env');
    const written = await cli(['creds', '--token', token, '--format', 'dotenv', '-o', file]);
    assert.equal(written.code, 0, written.stderr);
    assert.equal(written.stdout, '');
    assert.match(await readFile(file, 'utf8'), /^PGPASSWORD=/m);
    const withPolicy = await cli(['creds', '--token', token, '--policy', 'cli', '--format', 'json']);
    assert.equal(withPolicy.code, 0, withPolicy.stderr);
    assert.equal(JSON.parse(withPolicy.stdout).policy, 'cli');
    const fromFile = await cli(['creds', '--format', 'json'], { PG_BROKER_TOKEN_FILE: otherFile });
    assert.equal(fromFile.code, 0, fromFile.stderr);
    const fromEnv = await cli(['creds', '--format', 'json'], { PG_BROKER_TOKEN: token, PG_BROKER_TOKEN_FILE: otherFile });
    assert.equal(fromEnv.code, 0, fromEnv.stderr);
    assert.equal(await leases('cli:empty-me'), 3);
    assert.equal(await leases('cli:empty-other'), 1);
  });
  test('an empty or blank token file is named as empty, not sent; once the token is written it works', async () => {
    const file = path.join(tmp, 'projected.jwt');
    for (const blank of ['', '\n  \n']) {
      await writeFile(file, blank);
      for (const [args, env] of [[['creds', '--token-file', file], {}], [['creds'], { PG_BROKER_TOKEN_FILE: file }]] as const) {
        const run = await cli([...args], env);
        assert.equal(run.code, 1, run.stderr);
        assert.equal(run.stderr, `pg-broker: token file ${file} is empty\n`);
      }
    }
    const run = await cli(['exec', '--token-file', file, '--', process.execPath, '-e', '']);
    assert.equal(run.code, 1);
    assert.equal(run.stderr, `pg-broker: token file ${file} is empty\n`);

    // The good input: the token written (with the trailing newline files often have).
    await writeFile(file, `${await b.token({ sub: 'cli:projected' })}\n`);
    const written = await cli(['creds', '--token-file', file, '--format', 'json']);
    assert.equal(written.code, 0, written.stderr);
    assert.match(JSON.parse(written.stdout).username, /^lease_cli_projected_/);
  });
  test('a token given where the token file goes is not repeated in the error, which points to --token; a path that cannot be read is named', async () => {
    const token = await b.token({ sub: 'cli:mistaken' });
    const refusals = [
      [['creds', '--token-file', token], {}, /^pg-broker: --token-file got what looks like a token, not a path \(not repeated here; reading it as a file failed: E[A-Z]+\); pass the token itself in --token, or better \$PG_BROKER_TOKEN/],
      [['creds', '--token-file', `Bearer ${token}`], {}, /^pg-broker: --token-file got what looks like a token/],
      [['creds'], { PG_BROKER_TOKEN_FILE: token }, /^pg-broker: PG_BROKER_TOKEN_FILE got what looks like a token, not a path .*; pass the token itself in \$PG_BROKER_TOKEN\n$/],
      // No JWT, but longer than a path: whatever secret it is, it stays out of the log too.
      [['creds', '--token-file', 'k'.repeat(600)], {}, /^pg-broker: --token-file got what looks like a token, not a path \(not repeated here; reading it as a file failed: ENAMETOOLONG\)/],
    ] as const;
    for (const [args, env, message] of refusals) {
      const run = await cli([...args], env);
      assert.equal(run.code, 1, run.stderr);
      assert.match(run.stderr, message);
      assert.ok(!run.stderr.includes(token.split('.')[2]) && !run.stderr.includes('k'.repeat(40)), run.stderr);
    }
    // A path, even one named like a token, is repeated: which file is the whole point of the error.
    const missing = path.join(tmp, 'no-such-dir', 'ci.token.jwt');
    const run = await cli(['creds', '--token-file', missing]);
    assert.equal(run.stderr, `pg-broker: cannot read token file ${missing}: ENOENT\n`);
    // The good input, where the error points.
    const fromEnv = await cli(['creds', '--format', 'json'], { PG_BROKER_TOKEN: token });
    assert.equal(fromEnv.code, 0, fromEnv.stderr);
    assert.match(JSON.parse(fromEnv.stdout).username, /^lease_cli_mistaken_/);
  });
  test('a token no policy admits gets the command that explains why, and that command does', async () => {
    const denied = await b.token({ sub: 'nobody:here' });
    const hint = '; with the CLI: pg-broker policy evaluate (with the same token and broker)\n';
    const run = await cli(['creds', '--token', denied]);
    assert.equal(run.code, 1);
    assert.equal(run.stderr, `pg-broker: POST /credentials failed with 403 NO_POLICY: No policy admits this token; POST /policies/evaluate explains why${hint}`);
    const named = await cli(['exec', '--policy', 'cli', '--token', denied, '--', process.execPath, '-e', '']);
    assert.equal(named.code, 1);
    assert.ok(named.stderr.endsWith(hint), named.stderr);
    const evaluate = await cli(['policy', 'evaluate', '--token', denied]);
    assert.equal(evaluate.code, 2);
    assert.match(evaluate.stdout, /✗ denied\s+cli: claim sub is "nobody:here", wants "cli:\*"/);
    // A claim the token does not carry is said to be missing, not to be null.
    await b.putPolicy('cli-team', { claims: { sub: 'team:*', team: 'data' } });
    const teamless = await cli(['policy', 'evaluate', '--token', await b.token({ sub: 'team:x' })]);
    assert.match(teamless.stdout, /✗ denied\s+cli-team: claim team is missing \(or null\), wants "data"/);
    const team = await cli(['policy', 'evaluate', '--token', await b.token({ sub: 'team:x', team: 'data' })]);
    assert.match(team.stdout, /✓ admitted cli-team/);
    // The good input: an admitted token gets its credential, and no hint (only its lease named).
    const admitted = await cli(['creds', '--token', await b.token({ sub: 'cli:admitted' }), '--format', 'json']);
    assert.equal(admitted.code, 0, admitted.stderr);
    assert.equal(admitted.stderr, `pg-broker creds: lease ${JSON.parse(admitted.stdout).lease_id}, expires ${JSON.parse(admitted.stdout).expires_at}\n`);
  });
  test('exec: words after the command that exec does not have are the command\'s, even without --; an unknown option before it gets a hint', async () => {
    const token = await b.token({ sub: 'cli:exec-words' });
    const script = 'console.log(JSON.stringify({ user: process.env.PGUSER, args: process.argv.slice(1) }))';
    const state = async (user: string) => (await b.pg.query(`SELECT state FROM broker.leases WHERE username = $1`, [user]))[0].state;
    // Before, -h here printed exec's help and exited 0 without running anything. (exec's own
    // options there are refused without --: the next test.)
    const bare = await cli(['exec', '--token', token, process.execPath, '-e', script, 'x', '-h', 'db', '-Atc', 'select 1']);
    assert.equal(bare.code, 0, bare.stderr);
    const seen = JSON.parse(bare.stdout);
    assert.deepEqual(seen.args, ['x', '-h', 'db', '-Atc', 'select 1']);
    assert.equal(await state(seen.user), 'revoked');

    const misplaced = await cli(['exec', '--token', token, '-Atc', 'psql']);
    assert.equal(misplaced.code, 1);
    assert.match(misplaced.stderr, /^error: unknown option '-Atc'\n\(options for the command go after it, best after --: pg-broker exec \[options\] -- COMMAND -Atc …\)\n/);

    // The good input: exec's own options before the command, the command after --.
    const kept = await cli(['exec', '--keep', '--token', token, '--', process.execPath, '-e', script, 'y', '-h']);
    assert.equal(kept.code, 0, kept.stderr);
    const keptSeen = JSON.parse(kept.stdout);
    assert.deepEqual(keptSeen.args, ['y', '-h']);
    assert.equal(await state(keptSeen.user), 'active', '--keep before the command is exec\'s');
  });
  test('exec: one of exec\'s own options after the command, without --, is refused before anything is issued; before the command, or after --, it works', async () => {
    const token = await b.token({ sub: 'cli:exec-meant' });
    // What a misread line would fall back to: another identity's token in the environment.
    const env = { PG_BROKER_TOKEN: await b.token({ sub: 'cli:exec-ambient' }) };
    const leases = async (sub: string) => (await b.pg.query(`SELECT username, state FROM broker.leases WHERE subject = $1`, [sub]));
    const ran = path.join(tmp, 'exec-ran');
    const script = `require('fs').appendFileSync(${JSON.stringify(ran)}, 'x'); console.log(JSON.stringify({ user: process.env.PGUSER, args: process.argv.slice(1) }))`;
    const tokenFile = path.join(tmp, 'exec-meant.jwt');
    await writeFile(tokenFile, token);
    // Every option exec has, read from its definition, as `--opt value` and `--opt=value`.
    const exec = buildCli().commands.find((c) => c.name() === 'exec')!;
    const values: Record<string, string> = { '--url': url, '--token': token, '--token-file': tokenFile, '--audience': 'pg-broker', '--policy': 'cli', '--ttl': '60' };
    const forms = exec.options.flatMap((o) => {
      const value = values[o.long!] ?? 'x';
      return o.required || o.optional ? [[o.long!, value], [`${o.long}=${value}`]] : [[o.long!]];
    });
    assert.ok(forms.length >= 13, `${forms.length} forms`);
    for (const words of forms) {
      const run = await cli(['exec', process.execPath, '-e', script, ...words], env);
      const name = words[0].split('=')[0];
      assert.equal(run.code, 1, `${name}: ${run.stderr}`);
      assert.equal(run.stderr.split('\n')[0], `error: exec's own option '${name}' comes after the command; put exec's options before the command, or put -- before the command if '${name}' is meant for the command`);
      assert.doesNotMatch(run.stderr, /eyJ/, 'the token is not echoed');
      assert.equal(run.stdout, '');
    }
    // Options before the command do not make the ones after it the command's.
    const mixed = await cli(['exec', '--token', token, process.execPath, '-e', script, '--policy', 'cli'], env);
    assert.equal(mixed.code, 1);
    assert.match(mixed.stderr, /^error: exec's own option '--policy' comes after the command;/);
    assert.ok(!existsSync(ran), 'the command never ran');
    assert.deepEqual(await leases('cli:exec-meant'), [], 'nothing was issued');
    assert.deepEqual(await leases('cli:exec-ambient'), [], 'nothing was issued to the ambient identity');

    // The good input: exec's options before the command; after --, every word is the command's.
    const after = await cli(['exec', '--token', token, '--', process.execPath, '-e', script, 'a', '--keep', '--token', 'zz', '--url=x'], env);
    assert.equal(after.code, 0, after.stderr);
    assert.deepEqual(JSON.parse(after.stdout).args, ['a', '--keep', '--token', 'zz', '--url=x']);
    const before = await cli(['exec', '--keep', '--token', token, '--url', url, process.execPath, '-e', script, 'b', '-h', 'db'], env);
    assert.equal(before.code, 0, before.stderr);
    assert.deepEqual(JSON.parse(before.stdout).args, ['b', '-h', 'db']);
    // A -- of the command's own: words after it went to the command before passThroughOptions too.
    const inner = await cli(['exec', '--token', token, process.execPath, '-e', script, 'c', '--', '--ttl', '5'], env);
    assert.equal(inner.code, 0, inner.stderr);
    assert.deepEqual(JSON.parse(inner.stdout).args, ['c', '--', '--ttl', '5']);
    const states = Object.fromEntries((await leases('cli:exec-meant')).map((l) => [l.username, l.state]));
    assert.deepEqual(states, {
      [JSON.parse(after.stdout).user]: 'revoked', // --keep after -- was the command's
      [JSON.parse(before.stdout).user]: 'active',
      [JSON.parse(inner.stdout).user]: 'revoked',
    });
    assert.deepEqual(await leases('cli:exec-ambient'), []);
  });
});
