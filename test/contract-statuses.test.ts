import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, test } from 'node:test';
import { parse } from 'yaml';
import { generateOpenApi } from '../src/openapi.js';
import { startTestBroker, type TestBroker } from './helpers/broker.js';

// What openapi.yaml promises, checked against what the routes answer. One request per client IP
// is allowed, so each case below comes from an address of its own unless it wants the limit.
let b: TestBroker;
let doc: { paths: Record<string, Record<string, { responses: Record<string, unknown> }>> };
let nextIp = 0;
const freshIp = () => `198.51.100.${++nextIp}`;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '1' } });
  doc = parse(await generateOpenApi());
});
after(async () => b?.close());

type Method = 'GET' | 'POST' | 'PUT' | 'DELETE';

function documented(method: Method, path: string, status: number): boolean {
  return doc.paths[path]?.[method.toLowerCase()]?.responses[String(status)] !== undefined;
}

test('every route but the probes answers 429 past BROKER_RATE_LIMIT_IP, and documents it', async () => {
  let routes = 0;
  for (const [path, methods] of Object.entries(doc.paths)) {
    const url = path.replace('{id}', randomUUID()).replace('{name}', 'some-policy');
    for (const method of Object.keys(methods).map((m) => m.toUpperCase() as Method)) {
      const ip = freshIp();
      const send = () => b.app.inject({ method, url, remoteAddress: ip });
      const first = await send();
      const second = await send();
      if (path === '/healthz' || path === '/readyz') {
        assert.notEqual(second.statusCode, 429, `${method} ${path} is a probe, exempt from rate limits`);
        continue;
      }
      routes++;
      assert.ok(documented(method, path, first.statusCode), `${method} ${path} answered ${first.statusCode} without a token, which it does not document`);
      assert.notEqual(first.statusCode, 429, `${method} ${path}: the first request is within the limit`);
      assert.equal(second.statusCode, 429, `${method} ${path}: ${second.body}`);
      assert.ok(documented(method, path, 429), `${method} ${path} answered 429, which it does not document`);
    }
  }
  assert.equal(routes, 12);
});

test('a malformed path parameter answers 400 on every route that takes one, and it is documented', async () => {
  const admin = await b.adminToken();
  const policy = { issuer: b.issuer.issuer, claims: { sub: 'x' }, grant_role: 'app_readers', database: b.pg.database };
  const cases: Array<[Method, string, string, unknown?]> = [
    ['GET', '/leases/{id}', '/leases/not-a-uuid'],
    ['DELETE', '/leases/{id}', '/leases/not-a-uuid'],
    ['POST', '/leases/{id}/renew', '/leases/not-a-uuid/renew'],
    ['GET', '/policies/{name}', '/policies/bad%20name'],
    ['PUT', '/policies/{name}', '/policies/bad%20name', policy],
    ['DELETE', '/policies/{name}', '/policies/bad%20name'],
  ];
  for (const [method, path, url, payload] of cases) {
    const res = await b.app.inject({ method, url, payload: payload as object | undefined, headers: { authorization: `Bearer ${admin}` }, remoteAddress: freshIp() });
    assert.equal(res.statusCode, 400, `${method} ${url}: ${res.body}`);
    assert.equal(res.json().code, 'BAD_REQUEST');
    assert.ok(documented(method, path, 400), `${method} ${path} answered 400, which it does not document`);
  }
});

test('revoking a lease that has already ended answers 200 with it, not the 409 once documented', async () => {
  await b.putPolicy('statuses', { claims: { sub: 'statuses:*' } });
  const token = await b.token({ sub: 'statuses:alice' });
  const issued = await b.app.inject({ method: 'POST', url: '/credentials', payload: {}, headers: { authorization: `Bearer ${token}` }, remoteAddress: freshIp() });
  assert.equal(issued.statusCode, 201, issued.body);
  const revoke = () => b.app.inject({ method: 'DELETE', url: `/leases/${issued.json().lease_id}`, headers: { authorization: `Bearer ${token}` }, remoteAddress: freshIp() });
  assert.equal((await revoke()).statusCode, 200);
  const again = await revoke();
  assert.equal(again.statusCode, 200, again.body);
  assert.equal(again.json().state, 'revoked');
  assert.ok(!documented('DELETE', '/leases/{id}', 409));
});

// Fastify reads the body of every method but GET and HEAD, whether or not the route declares one.
test('every route that reads a body answers 400 for malformed JSON, 413 past 64 KB and 415 for another type, and documents them', async () => {
  const admin = await b.adminToken();
  let routes = 0;
  for (const [path, methods] of Object.entries(doc.paths)) {
    const url = path.replace('{id}', randomUUID()).replace('{name}', 'some-policy');
    for (const method of Object.keys(methods).map((m) => m.toUpperCase() as Method).filter((m) => m !== 'GET')) {
      routes++;
      const send = (contentType: string, payload: string) => b.app.inject({
        method, url, payload, headers: { authorization: `Bearer ${admin}`, 'content-type': contentType }, remoteAddress: freshIp(),
      });
      const answers: Array<[number, string, string]> = [
        [400, 'application/json', '{"ttl":'],
        [413, 'application/json', JSON.stringify({ pad: 'x'.repeat(70 * 1024) })],
        [415, 'application/xml', '<ttl/>'],
      ];
      for (const [status, contentType, payload] of answers) {
        const res = await send(contentType, payload);
        assert.equal(res.statusCode, status, `${method} ${path} with ${contentType} ${payload.slice(0, 10)}: ${res.body}`);
        if (status === 400) assert.match(res.json().detail, /not valid JSON/, `${method} ${path}`);
        assert.ok(documented(method, path, status), `${method} ${path} answered ${status}, which it does not document`);
      }
      // A small, well-formed JSON body is read: whatever the route says of it, it is none of those.
      const fine = await send('application/json', '{}');
      assert.ok(![413, 415].includes(fine.statusCode) && !/not valid JSON/.test(fine.body), `${method} ${path} with {}: ${fine.body}`);
    }
  }
  assert.equal(routes, 7);
});
