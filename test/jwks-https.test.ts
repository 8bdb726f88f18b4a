import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { KeyResolver } from '../src/auth/keys.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';

// An https issuer on 127.0.0.1 (a certificate made here, trusted through the resolver's `ca`),
// whose discovery document or JWKS may be redirected: to plain http, which must be refused,
// or to another https URL, which is fine. The plain-http side is an ordinary test issuer.
let plain: TestIssuer;
let server: https.Server;
// A plain-http hop that sends each request on to its `to`.
let hop: http.Server;
let bouncer = '';
let base = '';
let ca = '';
let mode: 'ok' | 'discovery-to-http' | 'jwks-to-http' | 'jwks-moved' | 'jwks-with-user' | 'discovery-via-http' | 'jwks-via-http' | 'jwks-to-data' | 'jwks-loop' | 'jwks-to-user' | 'jwks-304' = 'ok';

before(async () => {
  plain = await startIssuer({ discovery: true });
  hop = http.createServer((req, res) => res.writeHead(302, { location: new URL(req.url ?? '/', 'http://x').searchParams.get('to') ?? '/' }).end());
  await new Promise<void>((resolve) => hop.listen(0, '127.0.0.1', resolve));
  bouncer = `http://127.0.0.1:${(hop.address() as AddressInfo).port}`;
  const dir = mkdtempSync(path.join(tmpdir(), 'pgcb-tls-'));
  try {
    execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
      '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1',
      '-keyout', path.join(dir, 'k'), '-out', path.join(dir, 'c')], { stdio: 'ignore' });
    ca = readFileSync(path.join(dir, 'c'), 'utf8');
    const key = readFileSync(path.join(dir, 'k'), 'utf8');
    server = https.createServer({ key, cert: ca }, (req, res) => {
      const redirect = (to: string) => res.writeHead(302, { location: to }).end();
      const json = (body: unknown) => res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(body));
      const jwks = { keys: [plain.publicJwk()] };
      if (req.url === '/.well-known/openid-configuration') {
        if (mode === 'discovery-to-http') return redirect(`${plain.issuer}/.well-known/openid-configuration`);
        // Through a plain-http hop and back to https: whoever sits on that hop chooses where it ends.
        if (mode === 'discovery-via-http') return redirect(`${bouncer}/bounce?to=${encodeURIComponent(`${base}/discovery-doc`)}`);
        const port = (server.address() as AddressInfo).port;
        return json({ issuer: base, jwks_uri: mode === 'jwks-with-user' ? `https://u:s3cret-pw@127.0.0.1:${port}/jwks` : `${base}/jwks` });
      }
      if (req.url === '/jwks') {
        if (mode === 'jwks-to-http') return redirect(plain.jwksUri);
        if (mode === 'jwks-moved') return redirect(`${base}/keys/v2`);
        if (mode === 'jwks-via-http') return redirect(`${bouncer}/bounce?to=${encodeURIComponent(`${base}/keys/v2`)}`);
        if (mode === 'jwks-to-data') return redirect(`data:application/json,${encodeURIComponent(JSON.stringify(jwks))}`);
        if (mode === 'jwks-loop') return redirect(`${base}/jwks`);
        if (mode === 'jwks-to-user') return redirect(`https://u:s3cret-pw@127.0.0.1:${(server.address() as AddressInfo).port}/keys/v2`);
        // Not a redirect, Location or not: its body is the answer (here, no key set).
        if (mode === 'jwks-304') return void res.writeHead(304, { location: `${base}/keys/v2` }).end();
        return json(jwks);
      }
      if (req.url === '/keys/v2') return json(jwks);
      if (req.url === '/discovery-doc') return json({ issuer: base, jwks_uri: `${base}/jwks` });
      res.writeHead(404).end();
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(async () => {
  server?.closeAllConnections();
  await new Promise((resolve) => server?.close(resolve));
  await plain?.close();
  await new Promise((resolve) => hop?.close(resolve));
});

/** The first fetch error a fresh resolver for the https issuer meets, and whether the key was found. */
async function lookUp(): Promise<{ pem: string | null; error: string | null }> {
  let error: string | null = null;
  const resolver = new KeyResolver([{ issuer: base }], { ca, fetchTimeoutMs: 2000, onFetchError: (_issuer, err) => (error ??= (err as Error).message) });
  try {
    return { pem: await resolver.publicKeyPem(base, plain.publicJwk().kid as string, 'RS256'), error };
  } catch {
    return { pem: null, error };
  } finally {
    await resolver.close();
  }
}

test('an https issuer\'s keys come through discovery over https, redirects between https URLs included', async () => {
  mode = 'ok';
  const direct = await lookUp();
  assert.match(direct.pem ?? '', /BEGIN PUBLIC KEY/, String(direct.error));
  mode = 'jwks-moved';
  const moved = await lookUp();
  assert.equal(moved.pem, direct.pem, String(moved.error));
});

test('a discovery document or JWKS redirected from https to plain http is refused', async () => {
  mode = 'discovery-to-http';
  assert.deepEqual(await lookUp(), { pem: null, error: 'the discovery request was redirected from https to plain http; refusing its answer' });
  mode = 'jwks-to-http';
  assert.deepEqual(await lookUp(), { pem: null, error: 'the JWKS request was redirected from https to plain http; refusing its answer' });
});

test('a chain that passes through plain http on its way back to https is refused, for discovery and JWKS alike', async () => {
  mode = 'discovery-via-http';
  assert.deepEqual(await lookUp(), { pem: null, error: 'the discovery request was redirected from https to plain http; refusing its answer' });
  mode = 'jwks-via-http';
  assert.deepEqual(await lookUp(), { pem: null, error: 'the JWKS request was redirected from https to plain http; refusing its answer' });
});

test('a redirect to a data: URL, or one that never ends, is refused', async () => {
  mode = 'jwks-to-data';
  assert.deepEqual(await lookUp(), { pem: null, error: 'the JWKS request was redirected to a data: URL; refusing it' });
  mode = 'jwks-loop';
  assert.deepEqual(await lookUp(), { pem: null, error: 'the JWKS request was redirected more than 5 times' });
  // A hop with a user part is refused without naming it (fetch's own error would, password and all).
  mode = 'jwks-to-user';
  assert.deepEqual(await lookUp(), { pem: null, error: 'the JWKS request was redirected to a URL with a user part; refusing it' });
  // A 304 is no redirect: its Location is not followed to the keys there.
  mode = 'jwks-304';
  assert.deepEqual(await lookUp(), { pem: null, error: 'JWKS request failed with 304' });
});

test('a discovered jwks_uri with a user part is not fetched, and its password is not repeated', async () => {
  mode = 'jwks-with-user';
  const { pem, error } = await lookUp();
  assert.equal(pem, null);
  assert.equal(error, `discovery for ${base} names a jwks_uri with a user part, which is not fetched`);
});
