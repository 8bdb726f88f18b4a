import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import net from 'node:net';
import { after, before, test } from 'node:test';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

// Answers Fastify's router and Node's HTTP parser give before any route runs: they are
// problem+json with the broker's stable codes, like every other error.
let b: TestBroker;
let admin: string;

before(async () => {
  b = await startTestBroker();
  admin = await b.adminToken();
});
after(async () => b?.close());

const get = (url: string) => b.app.inject({ method: 'GET', url, headers: { authorization: `Bearer ${admin}` } });

function assertProblem(res: { statusCode: number; headers: Record<string, unknown>; body: string }, status: number, where: string): any {
  assert.equal(res.statusCode, status, `${where}: ${res.body.slice(0, 300)}`);
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/, where);
  const body = JSON.parse(res.body);
  assert.equal(body.code, 'BAD_REQUEST', where);
  assert.equal(body.status, status, where);
  assert.ok(!res.body.includes('FST_'), `${where}: no Fastify internals`);
  return body;
}

test('a path parameter over 100 characters is 400 BAD_REQUEST problem+json that does not echo the path', async () => {
  const long = 'a'.repeat(5000);
  for (const url of [`/leases/${long}`, `/leases/${long}/renew`, `/policies/${long}`]) {
    const res = url.endsWith('/renew')
      ? await b.app.inject({ method: 'POST', url, headers: { authorization: `Bearer ${admin}` } })
      : await get(url);
    const body = assertProblem(res, 400, url.slice(0, 20));
    assert.ok(res.body.length < 1000, `the answer is ${res.body.length} bytes`);
    const logged = b.logs.map((l) => JSON.parse(l)).find((l) => l.reqId === body.request_id);
    assert.equal(logged?.msg, 'router refused the request', 'its request id leads to a log line');
    assert.ok(logged.path.length < 300, 'which holds only the start of the path');
  }
  // Parameters of a valid length still reach their routes.
  assert.equal((await get(`/leases/${randomUUID()}`)).json().code, 'LEASE_NOT_FOUND');
  assert.equal((await get(`/policies/${'p'.repeat(63)}`)).json().code, 'POLICY_NOT_FOUND');
});

test('a malformed percent-escape in the path is 400 BAD_REQUEST problem+json', async () => {
  for (const url of ['/leases/%E0%A4%A', '/policies/%ZZ']) assertProblem(await get(url), 400, url);
  assert.equal((await get('/policies/%61bc')).json().code, 'POLICY_NOT_FOUND', 'a valid escape is decoded and reaches the route');
});

/** Writes raw bytes to a listening broker and returns all it answers before closing. */
async function raw(port: number, request: string): Promise<{ statusCode: number; headers: Record<string, unknown>; body: string }> {
  const socket = net.connect(port, '127.0.0.1');
  socket.on('error', () => undefined);
  let answer = '';
  socket.on('data', (chunk: Buffer) => (answer += chunk.toString('latin1')));
  const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
  socket.write(request);
  await closed;
  const [head, ...rest] = answer.split('\r\n\r\n');
  const [statusLine, ...fields] = head.split('\r\n');
  const headers = Object.fromEntries(fields.map((f) => [f.slice(0, f.indexOf(':')).toLowerCase(), f.slice(f.indexOf(':') + 1).trim()]));
  return { statusCode: Number(statusLine.split(' ')[1]), headers, body: rest.join('\r\n\r\n') };
}

test('requests Node\'s HTTP parser refuses are answered with problem+json', async () => {
  const port = Number(new URL(await b.app.listen({ host: '127.0.0.1', port: 0 })).port);
  const headersOf = (auth: string) => `GET /leases HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: ${auth}\r\nConnection: close\r\n\r\n`;
  assertProblem(await raw(port, headersOf(`Bearer ${'x'.repeat(40 * 1024)}`)), 431, '40 KB Authorization');
  assertProblem(await raw(port, 'GET /leases HTTP/1.1 extra\r\nHost: 127.0.0.1\r\n\r\n'), 400, 'malformed request line');
  assertProblem(await raw(port, 'POST /policies/evaluate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n'), 400, 'Content-Length with Transfer-Encoding');
  // The same requests, well-formed, reach the routes.
  assert.equal((await raw(port, headersOf(`Bearer ${admin}`))).statusCode, 200);
  const evaluate = await raw(port, `POST /policies/evaluate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${admin}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n`);
  assert.equal(evaluate.statusCode, 200, evaluate.body);
});
