// `pg-broker exec` on a machine whose clock is off: it must renew by the broker's answer, not by
// comparing expires_at with its own clock, or a clock behind renews after the lease has lapsed
// and one ahead (by more than the lease's lifetime) never renews at all.
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { waitFor, type TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

const SKEWED_CLOCK = pathToFileURL(new URL('./fixtures/skewed-clock.mjs', import.meta.url).pathname).href;
// Long enough that the renew due at two thirds of it lands well before it ends on a loaded machine.
const TTL = 12;
const SKEW_MS = 120_000;

let b: TestBroker;
let url: string;
let tmp: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, url, home: tmp, cli } = await startCliBench('pgcb-cli-exec-clock-'));
});
after(async () => b?.close());

/** Runs exec with its clock `skewMs` off, and tells whether the broker renewed the lease before it lapsed. */
async function renewedInTime(name: string, skewMs: number): Promise<void> {
  const dir = await mkdtemp(path.join(tmp, `${name}-`));
  const started = path.join(dir, 'started');
  const done = path.join(dir, 'done');
  const script = `require('fs').writeFileSync(${JSON.stringify(started)}, process.env.PG_BROKER_LEASE_ID);
    const t = setInterval(() => { if (require('fs').existsSync(${JSON.stringify(done)})) clearInterval(t); }, 50);`;
  const token = await b.token({ sub: `cli:clock-${name}` });
  const running = cli(['exec', '--ttl', String(TTL), '--token', token, '--', process.execPath, '-e', script], {
    PG_BROKER_URL: url, NODE_OPTIONS: `--import=${SKEWED_CLOCK}`, TEST_CLOCK_SKEW_MS: String(skewMs),
  });
  try {
    const leaseId = await waitFor('exec to start the command', async () => (existsSync(started) ? readFile(started, 'utf8') : null));
    const [issued] = await b.pg.query(`SELECT expires_at FROM broker.leases WHERE id = $1`, [leaseId]);
    // Whichever comes first on PostgreSQL's clock, the one that ends the lease: a renewal, or the expiry.
    const outcome = await waitFor('a renewal or the lease\'s expiry', async () => {
      const [row] = await b.pg.query(`SELECT expires_at > $2 AS renewed, clock_timestamp() >= $2 AS lapsed FROM broker.leases WHERE id = $1`, [leaseId, issued.expires_at]);
      return row.renewed ? 'renewed' : row.lapsed ? 'lapsed' : null;
    }, (TTL + 10) * 1000);
    assert.equal(outcome, 'renewed', `exec with its clock ${skewMs / 1000} s off let the lease lapse`);
  } finally {
    await writeFile(done, '');
  }
  const run = await running;
  assert.equal(run.code, 0, run.stderr);
  assert.equal(run.stderr, '', 'no renewal failed');
}

describe('pg-broker exec renews by the broker\'s clock', { concurrency: 3 }, () => {
  test('with this machine\'s clock right', () => renewedInTime('right', 0));
  test('with its clock two minutes behind', () => renewedInTime('behind', -SKEW_MS));
  test('with its clock two minutes ahead', () => renewedInTime('ahead', SKEW_MS));
});
