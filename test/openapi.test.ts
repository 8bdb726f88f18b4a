import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { test } from 'node:test';
import { parse } from 'yaml';
import { generateOpenApi, OPENAPI_PATH } from '../src/openapi.js';

test('openapi.yaml is exactly what the route schemas generate (run `npm run openapi` after changing a route)', async () => {
  const generated = await generateOpenApi();
  const committed = await readFile(OPENAPI_PATH, 'utf8');
  assert.equal(committed, generated);
});

test('the document describes the contract routes with snake_case fields', async () => {
  const doc = parse(await generateOpenApi());
  for (const path of ['/credentials', '/leases', '/leases/{id}', '/leases/{id}/renew', '/leases/revoke', '/policies', '/policies/{name}', '/policies/evaluate', '/audit', '/healthz', '/readyz']) {
    assert.ok(doc.paths[path], `documents ${path}`);
  }
  const credential = doc.paths['/credentials'].post.responses['201'].content['application/json'].schema;
  assert.deepEqual(Object.keys(credential.properties).sort(), ['database', 'expires_at', 'grant_role', 'host', 'lease_id', 'max_expires_at', 'password', 'policy', 'port', 'uri', 'username']);
  assert.ok(doc.paths['/credentials'].post.responses['403'], 'denials are documented');
  // Both take no body at all as "no options"; a body is still required where it carries the request.
  assert.equal(doc.paths['/credentials'].post.requestBody.required, false);
  assert.equal(doc.paths['/leases/{id}/renew'].post.requestBody.required, false);
  assert.equal(doc.paths['/leases/revoke'].post.requestBody.required, true);
});

test('error answers are documented as problem+json, with the headers the broker sends with them', async () => {
  const doc = parse(await generateOpenApi());
  let errors = 0;
  for (const [path, methods] of Object.entries<Record<string, { responses: Record<string, any> }>>(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      for (const [status, response] of Object.entries(op.responses)) {
        if (Number(status) < 400 || path === '/readyz') continue;
        errors++;
        const where = `${method} ${path} ${status}`;
        assert.deepEqual(Object.keys(response.content), ['application/problem+json'], where);
        assert.ok(response.content['application/problem+json'].schema.required.includes('code'), where);
        if (status === '429' || status === '503') assert.equal(response.headers?.['Retry-After']?.schema.type, 'integer', where);
        if (status === '401') assert.ok(response.headers?.['WWW-Authenticate'], where);
      }
    }
  }
  assert.ok(errors > 30, `${errors} error answers`);
  // Success answers and the readiness probe's plain JSON stay application/json.
  assert.ok(doc.paths['/readyz'].get.responses['503'].content['application/json']);
  assert.ok(doc.paths['/credentials'].post.responses['201'].content['application/json']);
});
