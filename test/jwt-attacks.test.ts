import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { KeyLookupError, KeyResolver } from '../src/auth/keys.js';
import { AUDIENCE, startTestBroker, type TestBroker } from './helpers/broker.js';
import { foreignSigner, hmacToken, startCountingServer, startIssuer, unsignedToken, type TestIssuer } from './helpers/issuer.js';

// Every token here is hostile or malformed. Each must be refused with a 401 carrying a Bearer
// challenge, and none may make the broker talk to a host outside BROKER_ISSUERS.

let b: TestBroker;
let other: TestIssuer;
let counting: Awaited<ReturnType<typeof startCountingServer>>;

const SUB = 'repo:octo-org/attack:ref:refs/heads/main';
const b64 = (value: unknown) => Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
const now = () => Math.floor(Date.now() / 1000);

function claims(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { iss: b.issuer.issuer, aud: AUDIENCE, sub: SUB, iat: now(), exp: now() + 300, ...extra };
}

async function post(token: string) {
  const res = await b.app.inject({ method: 'POST', url: '/credentials', headers: { authorization: `Bearer ${token}` }, payload: {} });
  return { status: res.statusCode, headers: res.headers, body: res.body };
}

function assertRejected(res: Awaited<ReturnType<typeof post>>, name: string): void {
  assert.equal(res.status, 401, `${name}: expected 401, got ${res.status} ${res.body}`);
  assert.match(String(res.headers['www-authenticate']), /^Bearer .*error="invalid_token"/, `${name}: WWW-Authenticate`);
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/, `${name}: content-type`);
  const body = JSON.parse(res.body);
  assert.equal(body.status, 401);
  assert.equal(body.code, 'INVALID_TOKEN', name);
}

interface Case {
  name: string;
  /** What error_description must say, so a case cannot pass by failing for an unrelated reason. */
  reason: RegExp;
  token: () => Promise<string>;
}

let issuer: TestIssuer;
before(async () => {
  counting = await startCountingServer();
  other = await startIssuer();
  issuer = await startIssuer({ discovery: false });
  b = await startTestBroker({
    issuer,
    env: {
      BROKER_ISSUERS: JSON.stringify([
        { issuer: issuer.issuer, jwks_uri: issuer.jwksUri },
        { issuer: other.issuer, jwks_uri: other.jwksUri },
      ]),
    },
  });
  await b.putPolicy('attack-control', { claims: { sub: 'repo:octo-org/*' }, max_active_leases: 100 });
});

after(async () => {
  await b?.close();
  await issuer?.close();
  await other?.close();
  await counting?.close();
});

describe('JWT attack battery', () => {
  test('a key unpublished before the broker ever saw it is refused after a real JWKS lookup', async () => {
    const removed = await issuer.addKey('RS256');
    issuer.removeKey(removed);
    await issuer.addKey('RS256'); // later tokens must not be signed with the removed key
    const fetches = issuer.requests.length;
    const res = await post(await issuer.sign(claims(), { kid: removed }));
    assertRejected(res, 'removed key');
    assert.match(String(res.headers['www-authenticate']), /error_description="signing key not found in the issuer JWKS"/);
    assert.equal(issuer.requests.length, fetches + 1, 'the JWKS was asked, not a cooldown answer');
  });

  test('every hostile token is a 401 with a Bearer challenge, no unlisted host is contacted, and a control token passes', async () => {
    const attacker = await foreignSigner('RS256');
    const otherToken = await other.sign({ aud: AUDIENCE, sub: SUB });
    const otherKid = JSON.parse(Buffer.from(otherToken.split('.')[0], 'base64url').toString()).kid as string;
    // A key that was published once and removed before the broker ever saw it.
    const removedKid = await issuer.addKey('RS256');
    issuer.removeKey(removedKid);
    const goodKid = await issuer.addKey('RS256');
    // The key the control token uses, so the broker has it cached when attacks reuse its kid.
    const rsKid = goodKid;
    const pem = issuer.publicPem(rsKid);
    const jwkJson = JSON.stringify(issuer.publicJwk(rsKid));

    const control = () => issuer.sign(claims(), { kid: goodKid });
    // The other issuer is genuine: its own tokens work, which puts its key in the broker's cache.
    const otherRes = await b.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${otherToken}` } });
    assert.equal(otherRes.statusCode, 200, otherRes.body);
    const first = await post(await control());
    assert.equal(first.status, 201, first.body);

    const ALG = /algorithm is not allowed/;
    const KEY = /signing key not found|signature is invalid/;
    const MALFORMED = /malformed/;
    const cases: Case[] = [
      ...['none', 'None', 'NONE', 'nOnE'].map((alg) => ({
        name: `alg ${alg}`, reason: ALG,
        token: async () => unsignedToken({ alg, typ: 'JWT', kid: rsKid }, claims()),
      })),
      { name: 'alg none with a signature copied from a real token', reason: ALG, token: async () => unsignedToken({ alg: 'none', kid: rsKid }, claims(), (await control()).split('.')[2]) },
      { name: 'alg missing', reason: ALG, token: async () => unsignedToken({ typ: 'JWT', kid: rsKid }, claims(), 'c2ln') },
      ...(['HS256', 'HS384', 'HS512'] as const).flatMap((alg) => [
        { name: `${alg} keyed with the issuer public key as PEM`, reason: ALG, token: () => hmacToken(alg, { kid: rsKid }, claims(), pem) },
        { name: `${alg} keyed with the issuer public key as JWK`, reason: ALG, token: () => hmacToken(alg, { kid: rsKid }, claims(), jwkJson) },
      ]),
      { name: 'RS256 with the kid of another trusted issuer\'s key', reason: KEY, token: () => other.sign(claims(), { kid: otherKid }) },
      { name: 'signed with our key, claiming the other trusted issuer', reason: KEY, token: () => issuer.sign(claims({ iss: other.issuer }), { kid: goodKid }) },
      { name: 'jku header pointing at an unlisted host', reason: KEY, token: () => attacker.sign({ jku: `${counting.url}/jwks.json` }, claims()) },
      { name: 'x5u header pointing at an unlisted host', reason: KEY, token: () => attacker.sign({ x5u: `${counting.url}/cert.pem` }, claims()) },
      { name: 'embedded jwk header (attacker key, attacker kid)', reason: KEY, token: () => attacker.sign({ jwk: attacker.publicJwk }, claims()) },
      { name: 'embedded jwk header (attacker key, our kid)', reason: /signature is invalid/, token: () => attacker.sign({ kid: rsKid, jwk: { ...attacker.publicJwk, kid: rsKid } }, claims()) },
      { name: 'jku with our kid, signed by the attacker', reason: /signature is invalid/, token: () => attacker.sign({ kid: rsKid, jku: `${counting.url}/jwks.json` }, claims()) },
      { name: 'kid is a URL on an unlisted host', reason: KEY, token: () => issuer.sign(claims(), { kid: goodKid, header: { kid: `${counting.url}/key` } }) },
      { name: 'kid with path traversal', reason: KEY, token: () => issuer.sign(claims(), { kid: goodKid, header: { kid: '../../../../../../etc/passwd' } }) },
      { name: 'kid with SQL', reason: KEY, token: () => issuer.sign(claims(), { kid: goodKid, header: { kid: "x' OR '1'='1'; DROP TABLE broker.leases; --" } }) },
      { name: 'kid that is not a string', reason: /kid/, token: () => issuer.sign(claims(), { kid: goodKid, header: { kid: 12345 } }) },
      { name: 'kid of 10 KB', reason: /kid/, token: () => issuer.sign(claims(), { kid: goodKid, header: { kid: 'k'.repeat(10_000) } }) },
      { name: 'crit naming an extension we do not implement', reason: /critical/, token: () => issuer.sign(claims(), { kid: goodKid, header: { crit: ['x-must-check'], 'x-must-check': true }, crit: { 'x-must-check': true } }) },
      { name: 'crit b64 (RFC 7797), not supported', reason: /critical/, token: () => issuer.sign(claims(), { kid: goodKid, header: { crit: ['b64'], b64: true } }) },
      { name: 'crit with CR/LF in the extension name', reason: /critical/, token: () => issuer.sign(claims(), { kid: goodKid, header: { crit: ['x\r\nSet-Cookie: a=b'], 'x\r\nSet-Cookie: a=b': 1 }, crit: { 'x\r\nSet-Cookie: a=b': true } }) },
      { name: 'sub missing', reason: /sub/, token: () => issuer.sign(claims({ sub: undefined }), { kid: goodKid }) },
      { name: 'sub a number', reason: /sub/, token: () => issuer.sign(claims({ sub: 12345 }), { kid: goodKid }) },
      { name: 'sub an array', reason: /sub/, token: () => issuer.sign(claims({ sub: [SUB] }), { kid: goodKid }) },
      { name: 'sub an object', reason: /sub/, token: () => issuer.sign(claims({ sub: { id: SUB } }), { kid: goodKid }) },
      { name: 'sub empty', reason: /sub/, token: () => issuer.sign(claims({ sub: '' }), { kid: goodKid }) },
      { name: 'sub with a NUL', reason: /token sub holds a NUL character/, token: () => issuer.sign(claims({ sub: `${SUB}\u0000x` }), { kid: goodKid }) },
      { name: 'sub over 1024 code units', reason: /token sub is longer than 1024 UTF-16 code units/, token: () => issuer.sign(claims({ sub: `${SUB}:${'x'.repeat(1024)}` }), { kid: goodKid }) },
      { name: 'sub with a lone surrogate', reason: /token sub holds an unpaired UTF-16 surrogate/, token: () => issuer.sign(claims({ sub: `${SUB}\uD800` }), { kid: goodKid }) },
      { name: 'aud an array lacking ours', reason: /audience/, token: () => issuer.sign(claims({ aud: ['someone-else', 'pg-broker-evil'] }), { kid: goodKid }) },
      { name: 'aud a prefix of ours', reason: /audience/, token: () => issuer.sign(claims({ aud: AUDIENCE.slice(0, -1) }), { kid: goodKid }) },
      { name: 'aud missing', reason: /aud/, token: () => issuer.sign(claims({ aud: undefined }), { kid: goodKid }) },
      { name: 'iss with a trailing slash', reason: /issuer is not allowed: it differs from an issuer in BROKER_ISSUERS only by a trailing slash/, token: () => issuer.sign(claims({ iss: `${issuer.issuer}/` }), { kid: goodKid }) },
      { name: 'iss in a different case', reason: /issuer is not allowed: it differs from an issuer in BROKER_ISSUERS only by a trailing slash/, token: () => issuer.sign(claims({ iss: issuer.issuer.toUpperCase() }), { kid: goodKid }) },
      { name: 'iss missing', reason: /issuer|iss/, token: () => issuer.sign(claims({ iss: undefined }), { kid: goodKid }) },
      { name: 'iss an unlisted host that serves discovery', reason: /issuer is not allowed"/, token: () => issuer.sign(claims({ iss: counting.url }), { kid: goodKid }) },
      { name: 'exp as a string', reason: /exp/, token: () => issuer.sign(claims({ exp: String(now() + 300) }), { kid: goodKid }) },
      { name: 'exp missing', reason: /exp/, token: () => issuer.sign(claims({ exp: undefined }), { kid: goodKid }) },
      { name: 'nbf as a string', reason: /nbf/, token: () => issuer.sign(claims({ nbf: String(now() - 60) }), { kid: goodKid }) },
      { name: 'iat an hour in the future', reason: /iat/, token: () => issuer.sign(claims({ iat: now() + 3600 }), { kid: goodKid }) },
      { name: 'iat as a string', reason: /iat/, token: () => issuer.sign(claims({ iat: String(now()) }), { kid: goodKid }) },
      { name: 'nbf an hour in the future', reason: /nbf/, token: () => issuer.sign(claims({ nbf: now() + 3600 }), { kid: goodKid }) },
      { name: 'exp long past', reason: /expired/, token: () => issuer.sign(claims({ exp: now() - 3600 }), { kid: goodKid }) },
      { name: 'huge token (over 16 KB), validly signed', reason: /too large/, token: () => issuer.sign(claims({ pad: 'x'.repeat(17 * 1024) }), { kid: goodKid }) },
      { name: 'many segments', reason: MALFORMED, token: async () => `${await control()}.${b64('x')}.${b64('y')}` },
      { name: 'two segments', reason: MALFORMED, token: async () => (await control()).split('.').slice(0, 2).join('.') },
      { name: 'signature of a different token', reason: /signature is invalid/, token: async () => { const [h, p] = (await control()).split('.'); return `${h}.${p}.${otherToken.split('.')[2]}`; } },
      { name: 'payload swapped after signing', reason: /signature is invalid/, token: async () => { const [h, , s] = (await control()).split('.'); return `${h}.${b64(claims({ sub: 'admin:root' }))}.${s}`; } },
      { name: 'invalid base64url in the header', reason: MALFORMED, token: async () => `%%%***.${b64(claims())}.c2ln` },
      { name: 'invalid base64url in the payload', reason: MALFORMED, token: async () => `${b64({ alg: 'RS256', kid: goodKid })}.@@@###.c2ln` },
      { name: 'invalid JSON in the header', reason: MALFORMED, token: async () => `${b64('{"alg":"RS256","kid":')}.${b64(claims())}.c2ln` },
      { name: 'invalid JSON in the payload', reason: MALFORMED, token: async () => `${b64({ alg: 'RS256', kid: goodKid })}.${b64('{"sub":')}.c2ln` },
      { name: 'payload that is a JSON array', reason: MALFORMED, token: async () => `${b64({ alg: 'RS256', kid: goodKid })}.${b64('[1,2]')}.c2ln` },
      { name: 'key removed from the JWKS before the broker ever saw it', reason: /signing key not found/, token: () => issuer.sign(claims(), { kid: removedKid }) },
      { name: 'ES256 header with the RSA kid', reason: /signing key does not fit the token algorithm/, token: async () => unsignedToken({ alg: 'ES256', kid: goodKid }, claims(), 'c2ln') },
    ];
    assert.ok(cases.length >= 25, `${cases.length} cases`);

    const outcomes: string[] = [];
    for (const c of cases) {
      const res = await post(await c.token());
      try {
        assertRejected(res, c.name);
        assert.match(String(res.headers['www-authenticate']), c.reason, `${c.name}: reason`);
      } catch (err) {
        outcomes.push((err as Error).message.split('\n')[0]);
      }
    }
    assert.deepEqual(outcomes, [], 'every case is rejected');
    const last = await post(await control());
    assert.equal(last.status, 201, `control after the battery: ${last.body}`);
    assert.deepEqual(counting.requests, [], 'no request reached the unlisted host');
    const jwksHosts = new Set([...issuer.requests, ...other.requests]);
    assert.ok([...jwksHosts].every((path) => path === '/jwks'), `only configured JWKS paths were fetched: ${[...jwksHosts]}`);
  });

  test('each rejection leaves an unverified token.rejected audit event', async () => {
    const token = await issuer.sign(claims({ sub: 'audit-me', exp: now() - 3600 }));
    assertRejected(await post(token), 'expired');
    const rows = await b.pg.query(`SELECT issuer, subject, actor_verified, reason FROM broker.audit_events WHERE type = 'token.rejected' AND subject = 'audit-me'`);
    assert.equal(rows.length, 1);
    assert.equal(rows[0].issuer, issuer.issuer);
    assert.equal(rows[0].actor_verified, false);
  });
});

describe('key removal and the key cache', () => {
  // Documented behaviour: a key the broker has fetched stays trusted for the cache lifetime
  // (10 minutes in production) even if the issuer unpublishes it; after that a JWKS that no
  // longer lists it ends its use. Only a JWKS that cannot be fetched keeps an expired key alive.
  test('a cached key keeps working until the cache expires, then a JWKS without it is final', async () => {
    const kid = await issuer.addKey('RS256');
    // Long enough that the "still cached" lookup cannot outlive it on a loaded machine.
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { cacheTtlMs: 2000, unknownKidCooldownMs: 50 });
    try {
      assert.match(await resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), /BEGIN PUBLIC KEY/);
      issuer.removeKey(kid);
      assert.match(await resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), /BEGIN PUBLIC KEY/, 'still cached');
      await sleep(2100);
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), KeyLookupError, 'refetched JWKS no longer lists it');
      await sleep(100);
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), KeyLookupError, 'and stays refused');
    } finally {
      await resolver.close();
    }
  });

  test('an expired cached key is only kept while the JWKS cannot be fetched', async () => {
    const kid = await issuer.addKey('RS256');
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { cacheTtlMs: 300, unknownKidCooldownMs: 50 });
    try {
      await resolver.publicKeyPem(issuer.issuer, kid, 'RS256');
      await sleep(400);
      issuer.mode = 'down';
      assert.match(await resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), /BEGIN PUBLIC KEY/, 'served from the last good copy');
      issuer.mode = 'ok';
      issuer.removeKey(kid);
      await sleep(100);
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), KeyLookupError);
    } finally {
      issuer.mode = 'ok';
      await resolver.close();
    }
  });
});
