import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import type { TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let tmp: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, home: tmp, cli } = await startCliBench('pgcb-cli-input-'));
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
  test('leases revoke refuses a lease id together with --subject, --issuer, --policy or --reason before sending anything; each alone works', async () => {
    const admin = await b.adminToken();
    const one = (await b.issue(await b.token({ sub: 'cli:revoke-one' }))).body.lease_id as string;
    const other = (await b.issue(await b.token({ sub: 'cli:revoke-other' }))).body.lease_id as string;
    const state = async (id: string) => (await b.pg.query(`SELECT state FROM broker.leases WHERE id = $1`, [id]))[0].state;
    const refusals: Array<[string[], RegExp]> = [
      [['--subject', 'cli:revoke-other'], /^pg-broker: give a lease id or --subject, not both: an id revokes that one lease, whatever the filters say$/],
      [['--issuer', b.issuer.issuer, '--policy', 'cli'], /^pg-broker: give a lease id or --issuer and --policy, not both/],
      [['--reason', 'left'], /^pg-broker: --reason is recorded only when revoking by --subject, --issuer or --policy; revoking one lease by id records none$/],
    ];
    for (const [extra, error] of refusals) {
      const run = await cli(['leases', 'revoke', one, ...extra, '--token', admin]);
      assert.equal(run.code, 1, extra.join(' '));
      assert.match(run.stderr.trim(), error);
      assert.equal(run.stdout, '');
    }
    assert.equal(await state(one), 'active', 'nothing was revoked');
    assert.equal(await state(other), 'active');

    // The good input: the id alone, then the subject alone (with a reason).
    const byId = await cli(['leases', 'revoke', one, '--token', admin]);
    assert.equal(byId.code, 0, byId.stderr);
    assert.equal(byId.stdout, `lease ${one}: revoked\n`);
    const bySubject = await cli(['leases', 'revoke', '--subject', 'cli:revoke-other', '--reason', 'left', '--token', admin]);
    assert.equal(bySubject.code, 0, bySubject.stderr);
    assert.equal(bySubject.stdout, `revoked 1 lease(s): ${other}\n`);
    assert.equal(await state(other), 'revoked');
  });
});
