import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, test } from 'node:test';
import { startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';
import { startRelayedPostgres, type RelayedPostgres } from './helpers/relay.js';

let db: RelayedPostgres;
let b: TestBroker;
let port: number;

before(async () => {
  db = await startRelayedPostgres();
  b = await startTestBroker({ pg: db.pgs, env: { DATABASE_URL: db.url } });
  await b.putPolicy('abort', { claims: { sub: 'abort:*' } });
  port = Number(new URL(await b.app.listen({ host: '127.0.0.1', port: 0 })).port);
});
after(async () => {
  await b?.close();
  await db?.stop();
});

/**
 * Sends a request announcing 100 body bytes; with `hangUp` the socket closes after part of it,
 * at once ('destroy') or by ending its side, which Node's parser also sees as a truncated request.
 */
async function rawPost(path: string, token: string, body: string, hangUp: false | 'destroy' | 'end'): Promise<string> {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  let answer = '';
  socket.on('data', (chunk: Buffer) => (answer += chunk.toString('latin1')));
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.write(`POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${token}\r\nContent-Type: application/json\r\n`
    + `Content-Length: ${hangUp ? 100 : Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`);
  if (hangUp) {
    await new Promise((r) => setTimeout(r, 300));
    if (hangUp === 'end') socket.end();
    else socket.destroy();
  }
  await closed;
  return answer;
}

const brokerMetrics = async () =>
  (await b.app.inject({ method: 'GET', url: '/metrics' })).body.split('\n').filter((l) => l.startsWith('broker_')).join('\n');
const parsed = () => b.logs.map((l) => JSON.parse(l));

test('a client that hangs up mid-body is logged as gone, not as a PostgreSQL outage', async () => {
  for (const path of ['/credentials', '/policies/evaluate']) {
    const token = await b.token({ sub: 'abort:client' });
    for (const hangUp of ['destroy', 'end'] as const) {
      const metricsBefore = await brokerMetrics();
      const from = b.logs.length;
      await rawPost(path, token, '{"ttl":', hangUp);
      // The broker writes one line for the abort; a little longer shows no second one follows.
      await waitFor(`a log line for the aborted ${path}`, async () => b.logs.length > from);
      await new Promise((r) => setTimeout(r, 200));
      const lines = parsed().slice(from);
      assert.deepEqual(lines.map((l) => [l.level, l.msg]), [[30, 'client went away before its request was read']], `${path}, ${hangUp}: ${b.logs.slice(from).join('')}`);
      assert.equal(await brokerMetrics(), metricsBefore, `${path}, ${hangUp}: no counter moved`);
    }
    // The same request, whole, is answered.
    const whole = await rawPost(path, token, path === '/credentials' ? '{"ttl":60}' : '{}', false);
    assert.match(whole, path === '/credentials' ? /^HTTP\/1\.1 201 / : /^HTTP\/1\.1 200 /, whole.split('\r\n')[0]);
  }
});

test('a PostgreSQL that refuses connections is still logged and answered as an outage', async () => {
  const from = b.logs.length;
  db.relay.cut();
  try {
    const res = await b.issue(await b.token({ sub: 'abort:outage' }));
    assert.equal(res.status, 503, JSON.stringify(res.body));
    assert.equal(res.body.code, 'DATABASE_UNAVAILABLE');
  } finally {
    db.relay.refusing = false;
  }
  assert.ok(parsed().slice(from).some((l) => l.msg === 'PostgreSQL unavailable' && l.level === 40));
  assert.equal((await b.issue(await b.token({ sub: 'abort:outage' }))).status, 201, 'and it resumes');
});
