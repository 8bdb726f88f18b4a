import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { buildCli } from '../src/cli/index.js';
import { AuditQuery } from '../src/schemas/audit.js';
import { ADMIN_SUB, type TestBroker } from './helpers/broker.js';
import { nextPageHint, startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let cli: CliBench['cli'];
let pasted: CliBench['pasted'];

before(async () => {
  ({ b, cli, pasted } = await startCliBench('pgcb-cli-audit-'));
});
after(async () => b?.close());

interface Event { id: string; type: string; subject: string | null; lease_id: string | null; reason: string | null }

/** A lease of `subject`, revoked by the admin with `reason`: two events, issued and revoked. */
async function revokedLease(subject: string, reason: string): Promise<string> {
  const issued = await b.issue(await b.token({ sub: subject }));
  assert.equal(issued.status, 201);
  const run = await cli(['leases', 'revoke', '--subject', subject, '--reason', reason, '--token', await b.adminToken()]);
  assert.equal(run.code, 0, run.stderr);
  return issued.body.lease_id;
}

describe('pg-broker audit', () => {
  test('every query parameter of GET /audit is an option of audit', () => {
    const audit = buildCli().commands.find((c) => c.name() === 'audit')!;
    const flags = audit.options.map((o) => o.long);
    for (const parameter of Object.keys(AuditQuery.properties)) assert.ok(flags.includes(`--${parameter.replace(/_/g, '-')}`), parameter);
    assert.ok(flags.includes('--owner'));
  });

  test('rows are at, type, subject, lease_id, policy, reason, one line per event whatever the values hold; --json and --ndjson carry the events whole', async () => {
    // A tab and an escape sequence in the subject, a newline in the reason.
    const subject = 'cli:audit\tme\u001b[31m';
    const leaseId = await revokedLease(subject, 'left\nthe company');
    const admin = await b.adminToken();
    const text = await cli(['audit', '--lease-id', leaseId, '--token', admin]);
    assert.deepEqual([text.code, text.stderr], [0, '']);
    const rows = text.stdout.trimEnd().split('\n').map((r) => r.split('\t'));
    assert.deepEqual(rows.map((r) => r.length), [6, 6]);
    // Newest first.
    assert.deepEqual(rows.map((r) => r.slice(1)), [
      ['lease.revoked', ADMIN_SUB, leaseId, 'cli', 'left\\nthe company'],
      ['credential.issued', 'cli:audit\\tme\\u001b[31m', leaseId, 'cli', '-'],
    ]);
    assert.ok(!Number.isNaN(Date.parse(rows[0][0])), rows[0][0]);

    const json = await cli(['audit', '--lease-id', leaseId, '--json', '--token', admin]);
    const page = JSON.parse(json.stdout) as { items: Event[]; next_cursor: null };
    assert.deepEqual(page.items.map((e) => [e.type, e.subject, e.reason]), [['lease.revoked', ADMIN_SUB, 'left\nthe company'], ['credential.issued', subject, null]]);
    const ndjson = await cli(['audit', '--lease-id', leaseId, '--ndjson', '--token', admin]);
    assert.deepEqual([ndjson.code, ndjson.stderr], [0, '']);
    assert.deepEqual(ndjson.stdout.trimEnd().split('\n').map((l) => JSON.parse(l)), page.items);

    const both = await cli(['audit', '--lease-id', leaseId, '--ndjson', '--json', '--token', admin]);
    assert.equal(both.code, 1);
    assert.match(both.stderr, /^error: option '--ndjson' cannot be used with option '--json'/);
  });

  test('a rejected token\'s subject is marked unverified in the rows, as actor_verified marks it in JSON', async () => {
    // Anyone can write any sub into a token the broker refuses: here an admin's, in one for another audience.
    const forged = await b.token({ sub: ADMIN_SUB, aud: 'someone-else' });
    assert.equal((await b.issue(forged)).status, 401);
    const run = await cli(['audit', '--type', 'token.rejected', '--subject', ADMIN_SUB, '--limit', '1', '--token', await b.adminToken()]);
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual(run.stdout.trimEnd().split('\t').slice(1, 3), ['token.rejected', `${ADMIN_SUB} (unverified)`]);
  });

  test('paging: the next page is the whole command on stderr, and --all --ndjson exports every event of the filters', async () => {
    const subject = 'cli:audit-pages';
    const leases = [await revokedLease(subject, 'one'), await revokedLease(subject, 'two')];
    await revokedLease('cli:audit-someone-else', 'three');
    const admin = await b.adminToken();
    const first = await cli(['audit', '--type', 'credential.issued', '--subject', subject, '--limit', '1', '--token', admin]);
    assert.equal(first.code, 0, first.stderr);
    const next = nextPageHint(first.stderr);
    assert.match(next ?? '', /^pg-broker audit --type credential\.issued --subject cli:audit-pages --limit 1 --url http:\/\/127\.0\.0\.1:\d+ --cursor \S+$/, first.stderr);
    const second = await pasted(`${next} --token "$T"`, { T: admin });
    assert.equal(second.code, 0, second.stderr);
    const ids = [first, second].map((r) => r.stdout.trim().split('\t')[3]);
    assert.deepEqual(ids, [...leases].reverse());

    const all = await cli(['audit', '--subject', subject, '--all', '--ndjson', '--limit', '1', '--token', admin]);
    assert.deepEqual([all.code, all.stderr], [0, '']);
    const events = all.stdout.trimEnd().split('\n').map((l) => JSON.parse(l) as Event);
    assert.deepEqual(events.map((e) => [e.type, e.lease_id]), [['credential.issued', leases[1]], ['credential.issued', leases[0]]]);
    const wholeJson = await cli(['audit', '--lease-id', leases[0], '--all', '--json', '--limit', '1', '--token', admin]);
    assert.deepEqual(JSON.parse(wholeJson.stdout), { items: JSON.parse((await cli(['audit', '--lease-id', leases[0], '--json', '--token', admin])).stdout).items, next_cursor: null });
  });

  test('--all to a reader that has gone (| head -1) stops fetching pages; read whole, every page is fetched', async () => {
    for (let i = 0; i < 5; i++) await revokedLease(`cli:audit-head-${i}`, 'for head');
    const [{ n }] = await b.pg.query(`SELECT count(*)::int AS n FROM broker.audit_events`);
    assert.ok(n >= 10, `${n} events`);
    const auditCalls = () => b.logs.filter((l) => l.includes('"path":"/audit"')).length;
    const admin = await b.adminToken();
    const before = auditCalls();
    const head = await pasted('pg-broker audit --all --ndjson --limit 1 --token "$T" | head -1', { T: admin });
    assert.equal(head.stdout.trimEnd().split('\n').length, 1);
    assert.ok(JSON.parse(head.stdout).id, head.stdout);
    const headCalls = auditCalls() - before;
    assert.ok(headCalls < n / 2, `${headCalls} pages fetched of ${n}`);
    const whole = await pasted('pg-broker audit --all --ndjson --limit 1 --token "$T" | wc -l', { T: admin });
    assert.ok(Number(whole.stdout.trim()) >= n, whole.stdout);
    assert.ok(auditCalls() - before - headCalls >= n);
  });

  test('--owner reaches the broker: a broker without the filter refuses it, one with it answers events of that owner\'s leases', async () => {
    const owner = 'cli:audit-owner';
    const leaseId = await revokedLease(owner, 'owner filter');
    await revokedLease('cli:audit-not-owner', 'not this one');
    const run = await cli(['audit', '--owner', owner, '--token', await b.adminToken()]);
    if ('owner' in AuditQuery.properties) {
      assert.equal(run.code, 0, run.stderr);
      const leaseIds = new Set(run.stdout.trim().split('\n').map((r) => r.split('\t')[3]));
      assert.deepEqual(leaseIds, new Set([leaseId]));
    } else {
      // Never an unfiltered listing of everyone's events.
      assert.equal(run.code, 1);
      assert.equal(run.stdout, '');
      assert.match(run.stderr, /GET \/audit\?owner=cli%3Aaudit-owner failed with 400 .*"owner" is not one of its fields/);
    }
  });

  test('refused with the broker\'s reason to a token that is no admin\'s, and for a type the broker does not know; an admin with a known type is answered', async () => {
    const notAdmin = await cli(['audit', '--token', await b.token({ sub: 'cli:nosy' })]);
    assert.equal(notAdmin.code, 1);
    assert.match(notAdmin.stderr, /^pg-broker: GET \/audit failed with 403/);
    const admin = await b.adminToken();
    const typo = await cli(['audit', '--type', 'lease.revokd', '--token', admin]);
    assert.equal(typo.code, 1);
    assert.match(typo.stderr, /failed with 400 .*lease\.revoked/);
    const known = await cli(['audit', '--type', 'lease.revoked', '--limit', '1', '--token', admin]);
    assert.equal(known.code, 0, known.stderr);
    assert.equal(known.stdout.trim().split('\t')[1], 'lease.revoked');
  });
});
