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

// Every route but the probes sits behind the per-IP rate limit (app.ts); every route with a path
// parameter validates it before its handler runs. What each answers is shown in contract-statuses.
test('429 is documented on every rate-limited route, 400 on every route with a path parameter', async () => {
  const doc = parse(await generateOpenApi());
  const probes = new Set(['/healthz', '/readyz']);
  let limited = 0;
  let parametrised = 0;
  for (const [path, methods] of Object.entries<Record<string, { responses: Record<string, unknown> }>>(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const where = `${method} ${path}`;
      if (probes.has(path)) {
        assert.equal(op.responses['429'], undefined, `${where}: probes are exempt from rate limits`);
        continue;
      }
      limited++;
      assert.ok(op.responses['429'], `${where} documents 429`);
      if (path.includes('{')) {
        parametrised++;
        assert.ok(op.responses['400'], `${where} documents 400`);
      }
    }
  }
  assert.equal(limited, 12);
  assert.equal(parametrised, 6);
  // A revocation of an ended lease answers 200 with the lease as it ended; no path answers 409.
  assert.equal(doc.paths['/leases/{id}'].delete.responses['409'], undefined);
});
