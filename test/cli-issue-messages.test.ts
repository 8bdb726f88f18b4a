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
