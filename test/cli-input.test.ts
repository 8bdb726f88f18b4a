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
});
