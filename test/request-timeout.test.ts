import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { REQUEST_TIMEOUT_MS } from '../src/app.js';
import { identityLockKey } from '../src/leases/repository.js';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

// A request must arrive in full within the broker's request timeout: a client that announced a
// body and went quiet is answered 408 and its socket closed, instead of holding it, and a
// shutdown's drain, for as long as it likes. Shortened to 1 s here; the default is checked too.
const LIMIT_MS = 1000;
let b: TestBroker;
let port: number;
let admin: string;

before(async () => {
  b = await startTestBroker({ requestTimeoutMs: LIMIT_MS });
  port = Number(new URL(await b.app.listen({ host: '127.0.0.1', port: 0 })).port);
  admin = await b.adminToken();
});
after(async () => b?.close());

interface Answer { text: string; closedByServer: boolean; ms: number }

/**
 * Sends `parts` with `gapMs` between them and keeps the socket open until the broker closes it or
 * `waitMs` passes (then closes it itself).
 */
async function send(parts: string[], gapMs: number, waitMs: number): Promise<Answer> {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  let text = '';
  socket.on('data', (chunk: Buffer) => (text += chunk.toString('utf8')));
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()));
  const started = performance.now();
  const closed = new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => {
      socket.destroy();
      resolve(false);
    }, waitMs);
    socket.once('close', () => {
      clearTimeout(timer);
      resolve(true);
    });
  });
  for (const [i, part] of parts.entries()) {
    if (i > 0) await new Promise((r) => setTimeout(r, gapMs));
    if (!socket.destroyed) socket.write(part);
  }
  const closedByServer = await closed;
  return { text, closedByServer, ms: performance.now() - started };
}

const head = (contentLength: number) =>
  `POST /policies/evaluate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${admin}\r\nContent-Type: application/json\r\nContent-Length: ${contentLength}\r\nConnection: close\r\n\r\n`;

test('a body sent in pieces within the limit is answered as usual', async () => {
  const answer = await send([head(2), '{', '}'], LIMIT_MS / 10, 10_000);
  assert.match(answer.text, /^HTTP\/1\.1 200 /, answer.text.slice(0, 300));
  assert.match(answer.text, /"policies":/);
});

test('a body that stops arriving is answered 408 problem+json and its socket closed', async () => {
  // 10 of the 100 bytes announced, then nothing.
  const answer = await send([head(100) + '{"claims":'], 0, 10_000);
  assert.ok(answer.closedByServer, `the broker closed the socket (still open after ${answer.ms.toFixed(0)} ms)`);
  assert.ok(answer.ms >= LIMIT_MS * 0.9, `not before the limit: ${answer.ms.toFixed(0)} ms`);
  assert.match(answer.text, /^HTTP\/1\.1 408 /, answer.text.slice(0, 300));
  assert.match(answer.text, /content-type: application\/problem\+json/i);
  const body = JSON.parse(answer.text.slice(answer.text.indexOf('\r\n\r\n') + 4));
  assert.equal(body.status, 408);
  assert.equal(body.code, 'BAD_REQUEST');
  assert.match(body.detail, /did not arrive in full in time/);
});

test('headers that never end are answered 408 too', async () => {
  const answer = await send([`GET /leases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${admin}\r\n`], 0, 10_000);
  assert.ok(answer.closedByServer, `closed by the broker (after ${answer.ms.toFixed(0)} ms)`);
  assert.match(answer.text, /^HTTP\/1\.1 408 /, answer.text.slice(0, 300));
  // The same request, finished, is answered.
  const whole = await send([`GET /leases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${admin}\r\nConnection: close\r\n\r\n`], 0, 10_000);
  assert.match(whole.text, /^HTTP\/1\.1 200 /, whole.text.slice(0, 300));
});

test('the limit is on the request arriving, not on the answer: a slow issuance still answers 201', async () => {
  await b.putPolicy('slow-answer', { claims: { sub: 'slow:*' } });
  const sub = 'slow:answer';
  const token = await b.token({ sub });
  // The issuance waits on its identity lock, held by another session for 2.5 limits.
  const superuser = new URL(b.pg.superuserUrl);
  superuser.pathname = `/${b.pg.database}`;
  const holder = new pg.Client({ connectionString: superuser.toString() });
  holder.on('error', () => undefined);
  await holder.connect();
  try {
    await holder.query('BEGIN');
    await holder.query('SELECT pg_advisory_xact_lock(hashtextextended($1, 0))', [identityLockKey(b.issuer.issuer, sub)]);
    const release = new Promise((r) => setTimeout(r, LIMIT_MS * 2.5)).then(() => holder.query('COMMIT'));
    const request = `POST /credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${token}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}`;
    const answer = await send([request], 0, 10_000);
    await release;
    // The lock's timer started before the request was sent, so less than the 2.5 limits it held.
    assert.ok(answer.ms >= LIMIT_MS * 1.5, `the answer waited for the lock: ${answer.ms.toFixed(0)} ms`);
    assert.match(answer.text, /^HTTP\/1\.1 201 /, answer.text.slice(0, 300));
  } finally {
    await holder.end();
  }
});

test('by default a request has REQUEST_TIMEOUT_MS to arrive, headers included', async () => {
  const plain = await startTestBroker({ pg: b.pg, issuer: b.issuer });
  try {
    assert.equal(REQUEST_TIMEOUT_MS, 30_000);
    assert.equal(plain.app.server.requestTimeout, REQUEST_TIMEOUT_MS);
    assert.equal(plain.app.server.headersTimeout, REQUEST_TIMEOUT_MS);
    assert.equal(b.app.server.requestTimeout, LIMIT_MS, 'the option reaches the server');
  } finally {
    await plain.close();
  }
});
