import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, test } from 'node:test';
import type { TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let url: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, url, cli } = await startCliBench('pgcb-cli-exec-revoke-'));
});
after(async () => b?.close());

/**
 * An HTTP proxy in front of the broker that passes every request on at once, and holds the
 * broker's answer to DELETE /leases/{id} for `holdMs`: a revocation the broker carries out but
 * answers late, as one does while it waits for sessions to end and the role to be dropped.
 */
async function slowRevocations(target: string, holdMs: number): Promise<{ url: string; held: number; close(): Promise<void> }> {
  const upstream = new URL(target);
  const timers = new Set<NodeJS.Timeout>();
  const state = { url: '', held: 0, close: () => new Promise<void>((r) => { for (const t of timers) clearTimeout(t); server.closeAllConnections(); server.close(() => r()); }) };
  const server = http.createServer((req, res) => {
    const forward = http.request({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers }, (answer) => {
      const chunks: Buffer[] = [];
      answer.on('data', (c: Buffer) => chunks.push(c));
      answer.on('end', () => {
        const send = () => { res.writeHead(answer.statusCode!, answer.headers); res.end(Buffer.concat(chunks)); };
        if (req.method !== 'DELETE' || !req.url!.startsWith('/leases/')) return send();
        state.held += 1;
        const timer = setTimeout(send, holdMs);
        timers.add(timer);
      });
    });
    forward.on('error', () => res.destroy());
    req.pipe(forward);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  state.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return state;
}

test('exec waits for a revocation as long as leases revoke does, past the 30 s other calls get, and reports it done', async () => {
  // Just past the 30 s that issuance, renewals and listings wait.
  const proxy = await slowRevocations(url, 32_000);
  try {
    const run = await cli(['exec', '--token', await b.token({ sub: 'cli:slow-revoke' }), '--', process.execPath, '-e', 'console.log(process.env.PG_BROKER_LEASE_ID)'], { PG_BROKER_URL: proxy.url });
    assert.equal(run.code, 0, run.stderr);
    assert.equal(proxy.held, 1, 'the revocation went through the slow proxy');
    assert.doesNotMatch(run.stderr, /could not revoke/, run.stderr);
    const [lease] = await b.pg.query(`SELECT state FROM broker.leases WHERE id = $1`, [run.stdout.trim()]);
    assert.equal(lease.state, 'revoked');
  } finally {
    await proxy.close();
  }
});
