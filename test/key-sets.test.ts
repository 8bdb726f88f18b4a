import assert from 'node:assert/strict';
import { createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { MAX_KEY_DOCUMENT_BYTES } from '../src/auth/key-source.js';
import { KeyLookupError, KeyResolver } from '../src/auth/keys.js';

/**
 * The key resolver against a JWKS server on 127.0.0.1 that serves whatever key set a test sets,
 * including what real issuers' sets can hold: kids shared by several keys, encryption keys, and
 * many keys at once.
 */

let server: http.Server;
let jwksUri = '';
let keys: object[] = [];
/** When set, the server answers this text instead of `{ keys }`. */
let rawAnswer: string | null = null;
/** Send answers in 64 KiB writes without a Content-Length (chunked), as a streaming server would. */
let chunked = false;
/** Extra members padding the discovery document. */
let discoveryPadding = '';
let fetches = 0;
/** The `issuer` the discovery document at /.well-known/openid-configuration names; the server's own URL when null. */
let documentIssuer: string | null = null;
let base = '';

const jwk = (key: KeyObject, extra: Record<string, unknown>) => ({ ...key.export({ format: 'jwk' }), ...extra });
const rsa = () => generateKeyPairSync('rsa', { modulusLength: 2048 }).publicKey;
const ec = () => generateKeyPairSync('ec', { namedCurve: 'P-256' }).publicKey;
const pemOf = (key: KeyObject) => key.export({ type: 'spki', format: 'pem' }).toString();
const resolver = (options = {}) => new KeyResolver([{ issuer: 'https://issuer.example', jwks_uri: jwksUri }], options);

before(async () => {
  server = http.createServer((req, res) => {
    res.setHeader('content-type', 'application/json');
    const send = (text: string) => {
      if (!chunked) return void res.end(text);
      for (let i = 0; i < text.length; i += 65_536) res.write(text.slice(i, i + 65_536));
      res.end();
    };
    if (req.url === '/.well-known/openid-configuration') return send(JSON.stringify({ issuer: documentIssuer ?? base, jwks_uri: jwksUri, padding: discoveryPadding }));
    fetches++;
    send(rawAnswer ?? JSON.stringify({ keys }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  jwksUri = `${base}/jwks.json`;
});
after(() => new Promise<void>((resolve) => server.close(() => resolve())));

describe('key sets as issuers publish them', () => {
  test('a kid shared by an EC and an RSA key serves each algorithm its own key, every time', async () => {
    const [e, r] = [ec(), rsa()];
    keys = [jwk(e, { kid: 'dup' }), jwk(r, { kid: 'dup' })];
    const keyResolver = resolver();
    try {
      for (let i = 0; i < 2; i++) {
        assert.equal(await keyResolver.publicKeyPem('https://issuer.example', 'dup', 'RS256'), pemOf(r));
        assert.equal(await keyResolver.publicKeyPem('https://issuer.example', 'dup', 'ES256'), pemOf(e));
      }
      await assert.rejects(keyResolver.publicKeyPem('https://issuer.example', 'dup', 'ES384'), /does not fit the token algorithm/);
    } finally {
      await keyResolver.close();
    }
  });

  test('an encryption key sharing a kid with a signing key is never used to verify', async () => {
    const [enc, sig, only] = [rsa(), rsa(), rsa()];
    keys = [jwk(enc, { kid: 'mixed', use: 'enc' }), jwk(sig, { kid: 'mixed', use: 'sig' }), jwk(only, { kid: 'enc-only', use: 'enc' })];
    const keyResolver = resolver();
    try {
      for (let i = 0; i < 2; i++) assert.equal(await keyResolver.publicKeyPem('https://issuer.example', 'mixed', 'RS256'), pemOf(sig));
      await assert.rejects(keyResolver.publicKeyPem('https://issuer.example', 'enc-only', 'RS256'), /not meant for signatures/);
    } finally {
      await keyResolver.close();
    }
  });

  test('a set of 80 keys is fetched once for lookups of many of them, with a fetch budget of one', async () => {
    const published = Array.from({ length: 80 }, (_, i) => ({ kid: `k${i}`, key: ec() }));
    keys = published.map(({ kid, key }) => jwk(key, { kid }));
    const keyResolver = resolver({ missFetchBurst: 1, missFetchIntervalMs: 3_600_000 });
    try {
      const before = fetches;
      for (const { kid, key } of published.filter((_, i) => i % 8 === 0)) {
        assert.equal(await keyResolver.publicKeyPem('https://issuer.example', kid, 'ES256'), pemOf(key));
      }
      assert.equal(fetches, before + 1);
      // The budget is spent: a kid the set does not list is refused without another fetch.
      await assert.rejects(keyResolver.publicKeyPem('https://issuer.example', 'unlisted', 'ES256'), (err: unknown) => err instanceof KeyLookupError && /cooling down/.test(err.message));
      assert.equal(fetches, before + 1);
    } finally {
      await keyResolver.close();
    }
  });

  test('an answer with no "keys" array fails the fetch: the last good set stays in use, and a fresh resolver refuses', async () => {
    const key = rsa();
    keys = [jwk(key, { kid: 'kept' })];
    const errors: unknown[] = [];
    // No cache and no cooldown: every lookup asks the JWKS again.
    const keyResolver = resolver({ cacheTtlMs: 0, unknownKidCooldownMs: 0, onFetchError: (_issuer: string, err: unknown) => errors.push(err) });
    try {
      assert.equal(await keyResolver.publicKeyPem('https://issuer.example', 'kept', 'RS256'), pemOf(key));
      for (const answer of ['null', '{}', '[]', '"keys"', '{"keys":null}', '{"keys":"x"}']) {
        rawAnswer = answer;
        const [before, failures] = [fetches, errors.length];
        assert.equal(await keyResolver.publicKeyPem('https://issuer.example', 'kept', 'RS256'), pemOf(key), answer);
        assert.equal(fetches, before + 1, `${answer} was fetched`);
        assert.equal(errors.length, failures + 1, `${answer} counts as a failed fetch`);
        assert.match(String((errors.at(-1) as Error).message), /not a JSON object with a "keys" array/, answer);
        const fresh = resolver();
        try {
          await assert.rejects(fresh.publicKeyPem('https://issuer.example', 'kept', 'RS256'), /could not fetch the issuer JWKS/, answer);
        } finally {
          await fresh.close();
        }
      }
      // An empty "keys" array is an answer: the key it no longer lists is gone.
      rawAnswer = '{"keys":[]}';
      await assert.rejects(keyResolver.publicKeyPem('https://issuer.example', 'kept', 'RS256'), /signing key not found/);
    } finally {
      rawAnswer = null;
      await keyResolver.close();
    }
  });

  test('a key set or discovery document over 1 MiB fails the fetch, sized or streamed, and one at the limit is read', async () => {
    const key = rsa();
    const listed = jwk(key, { kid: 'big' });
    /** A key set of exactly `bytes` bytes (ASCII), listing the key and one filler key. */
    const setOf = (bytes: number) => {
      const bare = JSON.stringify({ keys: [listed, { kid: 'filler', kty: 'oct', k: '' }] });
      return bare.replace('"k":""', `"k":"${'A'.repeat(bytes - bare.length)}"`);
    };
    const errors: unknown[] = [];
    const keyResolver = resolver({ cacheTtlMs: 0, unknownKidCooldownMs: 0, onFetchError: (_issuer: string, err: unknown) => errors.push(err) });
    try {
      for (const streamed of [false, true]) {
        chunked = streamed;
        rawAnswer = setOf(MAX_KEY_DOCUMENT_BYTES);
        assert.equal(rawAnswer.length, MAX_KEY_DOCUMENT_BYTES);
        assert.equal(await keyResolver.publicKeyPem('https://issuer.example', 'big', 'RS256'), pemOf(key), `a set at the limit (streamed: ${streamed})`);
        rawAnswer = setOf(MAX_KEY_DOCUMENT_BYTES + 1);
        const failures = errors.length;
        // The last good set stays in use; a resolver that never had one refuses.
        assert.equal(await keyResolver.publicKeyPem('https://issuer.example', 'big', 'RS256'), pemOf(key));
        assert.equal(errors.length, failures + 1, `one byte over is a failed fetch (streamed: ${streamed})`);
        assert.equal((errors.at(-1) as Error).message, `the JWKS answer is larger than ${MAX_KEY_DOCUMENT_BYTES} bytes; refusing it`);
        const fresh = resolver();
        try {
          await assert.rejects(fresh.publicKeyPem('https://issuer.example', 'big', 'RS256'), /could not fetch the issuer JWKS/);
        } finally {
          await fresh.close();
        }
      }
      rawAnswer = null;
      keys = [listed];
      for (const streamed of [false, true]) {
        chunked = streamed;
        discoveryPadding = 'x'.repeat(MAX_KEY_DOCUMENT_BYTES);
        const discovering = new KeyResolver([{ issuer: base }], { onFetchError: (_issuer: string, err: unknown) => errors.push(err) });
        try {
          await assert.rejects(discovering.publicKeyPem(base, 'big', 'RS256'), /could not fetch the issuer JWKS/);
          assert.equal((errors.at(-1) as Error).message, `the discovery answer is larger than ${MAX_KEY_DOCUMENT_BYTES} bytes; refusing it`);
          discoveryPadding = 'x'.repeat(MAX_KEY_DOCUMENT_BYTES / 2);
          assert.equal(await discovering.publicKeyPem(base, 'big', 'RS256'), pemOf(key), `a large discovery document under the limit (streamed: ${streamed})`);
        } finally {
          await discovering.close();
        }
      }
    } finally {
      rawAnswer = null;
      chunked = false;
      discoveryPadding = '';
      await keyResolver.close();
    }
  });

  test('a discovery document naming another issuer chooses no keys; one naming this issuer does', async () => {
    const key = ec();
    keys = [jwk(key, { kid: 'disc' })];
    const errors: unknown[] = [];
    for (const other of [`${base}/`, 'https://other.example', '']) {
      documentIssuer = other;
      const keyResolver = new KeyResolver([{ issuer: base }], { onFetchError: (_issuer: string, err: unknown) => errors.push(err) });
      try {
        await assert.rejects(keyResolver.publicKeyPem(base, 'disc', 'ES256'), /could not fetch the issuer JWKS/, other);
        assert.equal(String((errors.at(-1) as Error).message), `the discovery document is for issuer ${JSON.stringify(other)}, not ${JSON.stringify(base)}`);
      } finally {
        await keyResolver.close();
      }
    }
    documentIssuer = null;
    const keyResolver = new KeyResolver([{ issuer: base }]);
    try {
      assert.equal(await keyResolver.publicKeyPem(base, 'disc', 'ES256'), pemOf(key));
    } finally {
      await keyResolver.close();
    }
  });

  test('a JWK converts to the same PEM as node:crypto makes of the key', async () => {
    const key = rsa();
    keys = [jwk(key, { kid: 'plain', alg: 'RS256' })];
    const keyResolver = resolver();
    try {
      const pem = await keyResolver.publicKeyPem('https://issuer.example', 'plain', 'RS256');
      assert.equal(createPublicKey(pem).export({ format: 'jwk' }).n, key.export({ format: 'jwk' }).n);
      await assert.rejects(keyResolver.publicKeyPem('https://issuer.example', 'plain', 'PS256'), /does not fit/, 'its alg pins it to RS256');
    } finally {
      await keyResolver.close();
    }
  });
});
