import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { buildCli } from '../src/cli/index.js';
import { LeaseQuery } from '../src/schemas/lease.js';
import type { TestBroker } from './helpers/broker.js';
import { nextPageHint as hint, startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let url: string;
let cli: CliBench['cli'];
let pasted: CliBench['pasted'];

before(async () => {
  ({ b, url, cli, pasted } = await startCliBench('pgcb-cli-listing-'));
});
after(async () => b?.close());

describe('pg-broker leases list paging', () => {
  test('every query parameter of GET /leases is an option of leases list', () => {
    const list = buildCli().commands.find((c) => c.name() === 'leases')!.commands.find((c) => c.name() === 'list')!;
    const flags = list.options.map((o) => o.long);
    for (const parameter of Object.keys(LeaseQuery.properties)) assert.ok(flags.includes(`--${parameter.replace(/_/g, '-')}`), parameter);
  });

  test('the next page is a whole command on stderr, filters and --limit kept; pasted, it lists the rest of the same leases', async () => {
    // A quote and a space: the command must survive being pasted into a shell.
    const subject = "cli:pager o'brien";
    const mine = new Set<string>();
    for (let i = 0; i < 3; i++) mine.add((await b.issue(await b.token({ sub: subject }))).body.lease_id);
    for (let i = 0; i < 2; i++) assert.equal((await b.issue(await b.token({ sub: 'cli:pager-other' }))).status, 201);
    const admin = await b.adminToken();
    const first = await cli(['leases', 'list', '--subject', subject, '--state', 'active', '--limit', '2', '--token', admin]);
    assert.equal(first.code, 0, first.stderr);
    const rows = first.stdout.trim().split('\n');
    assert.equal(rows.length, 2, 'only rows on stdout');
    const next = hint(first.stderr);
    assert.ok(next, first.stderr);
    // The broker came from PG_BROKER_URL: the hint names it, or pasted elsewhere it would ask another.
    assert.match(next, /^pg-broker leases list --subject 'cli:pager o'\\''brien' --state active --limit 2 --url http:\/\/127\.0\.0\.1:\d+ --cursor \S+$/);
    assert.ok(!first.stderr.includes(admin), 'the token stays out of the hint');
    const second = await pasted(`${next} --token "$T"`, { T: admin, PG_BROKER_URL: 'http://127.0.0.1:9' });
    assert.equal(second.code, 0, second.stderr);
    const rest = second.stdout.trim().split('\n');
    assert.equal(rest.length, 1);
    assert.equal(hint(second.stderr), undefined, 'the last page says no more');
    assert.deepEqual(new Set([...rows, ...rest].map((r) => r.split('\t')[0])), mine);
  });

  test('--all follows the pages to the end, as rows or as one JSON document; with --cursor, from there to the end', async () => {
    const subject = 'cli:pager-all';
    const mine = new Set<string>();
    for (let i = 0; i < 3; i++) mine.add((await b.issue(await b.token({ sub: subject }))).body.lease_id);
    const admin = await b.adminToken();
    const text = await cli(['leases', 'list', '--subject', subject, '--limit', '1', '--all', '--token', admin]);
    assert.deepEqual([text.code, text.stderr], [0, '']);
    assert.deepEqual(new Set(text.stdout.trim().split('\n').map((r) => r.split('\t')[0])), mine);
    const json = await cli(['leases', 'list', '--subject', subject, '--limit', '2', '--all', '--json', '--token', admin]);
    assert.deepEqual([json.code, json.stderr], [0, '']);
    const body = JSON.parse(json.stdout) as { items: Array<{ id: string; subject: string }>; next_cursor: unknown };
    assert.deepEqual(Object.keys(body), ['items', 'next_cursor']);
    assert.equal(body.next_cursor, null);
    assert.deepEqual(new Set(body.items.map((l) => l.id)), mine);
    // Without --all, --json is the one page the broker sent, and its cursor is the hint's.
    const page = await cli(['leases', 'list', '--subject', subject, '--limit', '2', '--json', '--token', admin]);
    const onePage = JSON.parse(page.stdout) as { items: Array<{ id: string }>; next_cursor: string };
    assert.equal(onePage.items.length, 2);
    assert.ok(hint(page.stderr)?.endsWith(`--json --url ${url} --cursor ${onePage.next_cursor}`), page.stderr);

    // From a cursor, --all lists every page after it: how an export that gave up resumes.
    const fromCursor = await cli(['leases', 'list', '--subject', subject, '--limit', '1', '--all', '--cursor', onePage.next_cursor, '--token', admin]);
    assert.deepEqual([fromCursor.code, fromCursor.stderr], [0, '']);
    const after = fromCursor.stdout.trim().split('\n').map((r) => r.split('\t')[0]);
    assert.deepEqual(new Set([...onePage.items.map((l) => l.id), ...after]), mine);
    assert.equal(after.length, 1);
    const cursorAlone = await cli(['leases', 'list', '--subject', subject, '--limit', '2', '--cursor', onePage.next_cursor, '--token', admin]);
    assert.equal(cursorAlone.code, 0, cursorAlone.stderr);
    assert.equal(cursorAlone.stdout.trim().split('\n').length, 1);
  });

  test('--all stops at a cursor the broker gave before, A then B then A again, rather than loop', async () => {
    let calls = 0;
    const cycling = http.createServer((_req, res) => {
      calls++;
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ items: [], next_cursor: calls % 2 ? 'A' : 'B' }));
    });
    await new Promise<void>((resolve) => cycling.listen(0, '127.0.0.1', resolve));
    try {
      const run = await cli(['leases', 'list', '--all', '--url', `http://127.0.0.1:${(cycling.address() as AddressInfo).port}`, '--token', 'a.b.c']);
      assert.equal(run.code, 1);
      assert.match(run.stderr, /answered \/leases with a cursor it had given before; stopped rather than loop/);
      assert.equal(calls, 3, 'A, B, then A again');
    } finally {
      await new Promise((resolve) => cycling.close(resolve));
    }
  });
});
