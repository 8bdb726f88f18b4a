import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, test } from 'node:test';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '40', BROKER_RATE_LIMIT_IDENTITY: '5' } });
  await b.putPolicy('rl', { claims: { sub: 'rl:*' }, max_active_leases: 100 });
});
after(async () => b?.close());

const evaluate = (token: string, ip = '127.0.0.1') =>
  b.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${token}` }, remoteAddress: ip });

test('one identity gets BROKER_RATE_LIMIT_IDENTITY requests a minute, then 429 with Retry-After; others are unaffected', async () => {
  const alice = await b.token({ sub: 'rl:alice' });
  const statuses: number[] = [];
  for (let i = 0; i < 7; i++) statuses.push((await evaluate(alice, `10.0.0.${i + 1}`)).statusCode);
  assert.deepEqual(statuses, [200, 200, 200, 200, 200, 429, 429], 'the limit follows the identity across client IPs');
  const limited = await evaluate(alice, '10.0.0.99');
  assert.equal(limited.json().code, 'RATE_LIMITED');
  assert.ok(Number(limited.headers['retry-after']) > 0);
  assert.equal((await evaluate(await b.token({ sub: 'rl:bob' }), '10.0.0.1')).statusCode, 200, 'another identity still passes');
});

test('admins are exempt from the per-identity limit, except when minting credentials', async () => {
  await b.putPolicy('rl-admin', { claims: { sub: 'admin:*' }, max_active_leases: 100 });
  const admin = await b.adminToken();
  const evaluations: number[] = [];
  for (let i = 0; i < 7; i++) evaluations.push((await evaluate(admin, `10.1.0.${i + 1}`)).statusCode);
  assert.deepEqual(evaluations, [200, 200, 200, 200, 200, 200, 200]);
  const issued: number[] = [];
  for (let i = 0; i < 6; i++) {
    const res = await b.app.inject({ method: 'POST', url: '/credentials', headers: { authorization: `Bearer ${admin}` }, remoteAddress: `10.1.1.${i + 1}`, payload: {} });
    issued.push(res.statusCode);
  }
  assert.deepEqual(issued, [201, 201, 201, 201, 201, 429]);
});

test('one client IP gets BROKER_RATE_LIMIT_IP requests a minute before authentication; health probes are exempt', async () => {
  const statuses: number[] = [];
  for (let i = 0; i < 45; i++) {
    const res = await b.app.inject({ method: 'GET', url: '/leases', remoteAddress: '192.0.2.7' });
    statuses.push(res.statusCode);
  }
  assert.equal(statuses.filter((s) => s === 401).length, 40, 'unauthenticated requests count against the IP');
  assert.equal(statuses.filter((s) => s === 429).length, 5);
  const limited = await b.app.inject({ method: 'GET', url: '/leases', remoteAddress: '192.0.2.7' });
  assert.ok(Number(limited.headers['retry-after']) > 0);
  assert.match(String(limited.headers['content-type']), /problem\+json/);
  assert.equal(limited.json().code, 'RATE_LIMITED', 'the same code as the per-identity limit');
  assert.match(limited.json().detail, /^More than 40 requests a minute from this address; retry in \d+ s$/);
  assert.equal((await b.app.inject({ method: 'GET', url: '/healthz', remoteAddress: '192.0.2.7' })).statusCode, 200);
  assert.equal((await b.app.inject({ method: 'GET', url: '/leases', remoteAddress: '192.0.2.8' })).statusCode, 401, 'another IP is not limited');
});

// @fastify/rate-limit's own key (11.x): an IPv6 address's /64, an IPv4-mapped one as IPv4.
test('IPv6 clients are limited by their /64: new addresses in it get no fresh allowance, another /64 does', async () => {
  const statuses: number[] = [];
  // Each request from another address of the same /64, as a host rotating its addresses would.
  for (let i = 0; i < 42; i++) statuses.push((await b.app.inject({ method: 'GET', url: '/leases', remoteAddress: `2001:db8:7:7::${(i + 1).toString(16)}` })).statusCode);
  assert.deepEqual([statuses.filter((s) => s === 401).length, statuses.filter((s) => s === 429).length], [40, 2]);
  const limited = await b.app.inject({ method: 'GET', url: '/leases', remoteAddress: '2001:db8:7:7::ffff' });
  assert.match(limited.json().detail, /^More than 40 requests a minute from this address's \/64; retry in \d+ s$/);
  assert.equal((await b.app.inject({ method: 'GET', url: '/leases', remoteAddress: '2001:db8:7:8::1' })).statusCode, 401, 'the next /64 is not limited');
});

// The timeout: a connection left waiting for an unread body would otherwise hang the test.
test('oversized headers and bodies are refused', { timeout: 60_000 }, async () => {
  const post = (payload: string, token?: string) => b.app.inject({
    method: 'POST', url: '/credentials', remoteAddress: '198.51.100.1',
    headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) }, payload,
  });
  const oversized = JSON.stringify({ ttl: 60, pad: 'x'.repeat(70 * 1024) });
  // The token is checked before the body is read: without one, 401 and the body is never parsed.
  assert.equal((await post(oversized)).statusCode, 401);
  const big = await post(oversized, await b.token({ sub: 'rl:big' }));
  assert.equal(big.statusCode, 413);
  assert.equal(big.json().code, 'BODY_TOO_LARGE');
  assert.equal((await post(JSON.stringify({ ttl: 60 }), await b.token({ sub: 'rl:small' }))).statusCode, 201, 'the same request with a small body');
  const url = await b.app.listen({ host: '127.0.0.1', port: 0 });
  const huge = await fetch(`${url}/healthz`, { headers: { 'x-padding': 'x'.repeat(40 * 1024) } });
  assert.equal(huge.status, 431, 'a 40 KB header is refused by the HTTP parser');
  const fine = await fetch(`${url}/healthz`, { headers: { 'x-padding': 'x'.repeat(20 * 1024) } });
  assert.equal(fine.status, 200, 'a 20 KB header (room for a 16 KB token) is accepted');

  // Over a real kept-alive socket, a refused request whose large body is never read must not
  // leave the connection waiting for it: the answer closes the connection.
  const { port } = new URL(url);
  for (const [label, token] of [['no token', undefined], ['a valid token', await b.token({ sub: 'rl:socket' })]] as const) {
    const socket = net.connect(Number(port), '127.0.0.1');
    const closed = new Promise<void>((resolve) => socket.on('close', () => resolve()));
    let answer = '';
    socket.on('data', (chunk: Buffer) => (answer += chunk.toString('latin1')));
    socket.on('error', () => undefined);
    socket.write(`POST /credentials HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${8 * 1024 * 1024}\r\n`
      + `Connection: keep-alive\r\n${token ? `Authorization: Bearer ${token}\r\n` : ''}\r\n`);
    socket.write(Buffer.alloc(256 * 1024, 'x'));
    await closed;
    const head = answer.split('\r\n\r\n')[0];
    assert.match(head, token ? /^HTTP\/1\.1 413 / : /^HTTP\/1\.1 401 /, `${label}: ${head}`);
    assert.match(head, /\r\nconnection: close\r\n/i, `${label}: ${head}`);
  }
});
