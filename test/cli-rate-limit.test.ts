import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { startTestBroker, type TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

// The broker's rate-limit window is a minute and cannot be shortened, so a run that is refused
// mid-way waits up to 60 s for it to end; the two tests below wait side by side.
const CLI_TIMEOUT_MS = 150_000;

let b: TestBroker;
let cli: CliBench['cli'];
let pasted: CliBench['pasted'];
const limited: TestBroker[] = [];

before(async () => {
  ({ b, cli, pasted } = await startCliBench('pgcb-cli-rate-limit-', { cliTimeoutMs: CLI_TIMEOUT_MS }));
  await b.putPolicy('rl-export', { claims: { sub: 'rl:*' }, max_active_leases: 20 });
});
after(async () => {
  for (const broker of limited) await broker.close();
  await b?.close();
});

/**
 * Another broker over the same PostgreSQL and issuer, listening, with low rate limits of its own
 * (they are counted in each broker's memory): nothing the setup sends through `b` counts there.
 */
async function limitedBroker(env: Record<string, string>): Promise<string> {
  const broker = await startTestBroker({ pg: b.pg, issuer: b.issuer, env });
  limited.push(broker);
  return broker.app.listen({ host: '127.0.0.1', port: 0 });
}

async function issueLeases(sub: string, n: number): Promise<Set<string>> {
  const ids = new Set<string>();
  for (let i = 0; i < n; i++) {
    const issued = await b.issue(await b.token({ sub }));
    assert.equal(issued.status, 201, JSON.stringify(issued.body));
    ids.add(issued.body.lease_id);
  }
  return ids;
}

const WAITING = /^pg-broker: the broker is limiting the rate of requests \(429 RATE_LIMITED: .*\); waiting \d+ s, then going on/gm;

describe('pg-broker listings under the broker\'s rate limit', { concurrency: true, timeout: 2 * CLI_TIMEOUT_MS }, () => {
  test('audit --all waits out a 429 as Retry-After asks, says so once, and exports every event exactly once', async () => {
    const leaseIds = await issueLeases('rl:audited', 11);
    // 6 pages of 2 against 4 requests a minute from one address: the 5th page is refused, whenever it runs.
    const url = await limitedBroker({ BROKER_RATE_LIMIT_IP: '4' });
    const run = await cli(['audit', '--subject', 'rl:audited', '--type', 'credential.issued', '--limit', '2', '--all', '--ndjson', '--url', url, '--token', await b.adminToken()]);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(run.stderr.match(WAITING)?.length, 1, run.stderr);
    assert.match(run.stderr, /More than 4 requests a minute from this address/);
    const exported = run.stdout.trim().split('\n').map((line) => (JSON.parse(line) as { lease_id: string }).lease_id);
    assert.equal(exported.length, 11, 'no event repeated');
    assert.deepEqual(new Set(exported), leaseIds, 'none missing');
  });

  test('leases list --all gives up after 5 refusals in a row, naming what it wrote and the command that resumes after it', async () => {
    const token = await b.token({ sub: 'rl:lister' });
    const leaseIds = await issueLeases('rl:lister', 6);
    // 3 pages of 2 against 2 requests a minute for one identity: the 3rd page is refused.
    const url = await limitedBroker({ BROKER_RATE_LIMIT_IDENTITY: '2' });
    const args = ['leases', 'list', '--limit', '2', '--all', '--url', url, '--token', token];

    const badCap = await cli(args, { PG_BROKER_RATE_LIMIT_MAX_WAIT: '0' });
    assert.deepEqual([badCap.code, badCap.stdout], [1, '']);
    assert.match(badCap.stderr, /^pg-broker: PG_BROKER_RATE_LIMIT_MAX_WAIT must be a whole number of seconds ≥ 1/);

    // Each wait capped at 1 s: five refusals come well inside the broker's minute.
    const cut = await cli(args, { PG_BROKER_RATE_LIMIT_MAX_WAIT: '1' });
    assert.equal(cut.code, 1, cut.stderr);
    const written = cut.stdout.trim().split('\n').map((row) => row.split('\t')[0]);
    assert.equal(written.length, 4, cut.stdout);
    assert.equal(cut.stderr.match(WAITING)?.length, 1, cut.stderr);
    assert.match(cut.stderr, /waiting 1 s, then going on \(each wait at most 1 s; gives up after 5 refusals in a row\)/);
    const gaveUp = /^pg-broker: GET \/leases was refused 5 times in a row \(429 RATE_LIMITED: More than 2 requests a minute for this identity; retry in \d+ s\); gave up; 2 pages \(4 leases\) written; to resume from there: (pg-broker leases list .*)$/m.exec(cut.stderr);
    assert.ok(gaveUp, cut.stderr);
    const resume = gaveUp[1];
    assert.match(resume, /^pg-broker leases list --url http:\/\/127\.0\.0\.1:\d+ --limit 2 --all --cursor \S+$/);
    assert.ok(!cut.stderr.includes(token), 'the token stays out of the resume command');

    // Pasted with the token, and the default cap, it waits out the minute and lists the rest.
    const rest = await pasted(`${resume} --token "$T"`, { T: token });
    assert.equal(rest.code, 0, rest.stderr);
    const resumed = rest.stdout.trim().split('\n').map((row) => row.split('\t')[0]);
    assert.equal(resumed.length, 2, rest.stdout);
    assert.deepEqual(new Set([...written, ...resumed]), leaseIds, 'every lease once, none repeated');
  });
});
