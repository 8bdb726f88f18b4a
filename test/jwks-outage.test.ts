import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { KeyLookupError, KeyResolver } from '../src/auth/keys.js';
import { AUDIENCE, startTestBroker, type TestBroker } from './helpers/broker.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';

// The resolver's fetch timeout is 3 s; anything near this bound means a request waited on a
// JWKS server that never answered.
const PROMPT_MS = 10_000;

let b: TestBroker;
let issuer: TestIssuer;
let disc: TestIssuer;
// Used by one test only, so its fetch budget is untouched by the others.
let quiet: TestIssuer;

const kidOf = (token: string) => JSON.parse(Buffer.from(token.split('.')[0], 'base64url').toString()).kid as string;

async function evaluate(token: string): Promise<{ status: number; ms: number; challenge: string }> {
  const started = Date.now();
  const res = await b.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${token}` } });
  return { status: res.statusCode, ms: Date.now() - started, challenge: String(res.headers['www-authenticate'] ?? '') };
}

before(async () => {
  issuer = await startIssuer({ discovery: false });
  disc = await startIssuer({ discovery: true });
  quiet = await startIssuer({ discovery: false });
  b = await startTestBroker({
    issuer,
    env: {
      BROKER_ISSUERS: JSON.stringify([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }, { issuer: disc.issuer }, { issuer: quiet.issuer, jwks_uri: quiet.jwksUri }]),
      // The floods here are aimed at the JWKS layer; the per-IP limit in front is tested elsewhere.
      BROKER_RATE_LIMIT_IP: '1000000',
      BROKER_RATE_LIMIT_IDENTITY: '1000000',
    },
  });
});

after(async () => {
  issuer.mode = 'ok';
  disc.mode = 'ok';
  await b?.close();
  await issuer?.close();
  await disc?.close();
  await quiet?.close();
});

for (const mode of ['down', 'hang'] as const) {
  describe(`JWKS endpoint ${mode}`, () => {
    test('cached keys keep verifying, a new kid gets a prompt 401, and recovery needs no restart', async () => {
      const rs = await issuer.sign({ aud: AUDIENCE, sub: 'svc' });
      const es = await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { alg: 'ES256' });
      assert.equal((await evaluate(rs)).status, 200);
      assert.equal((await evaluate(es)).status, 200);

      issuer.mode = mode;
      try {
        const newKid = await issuer.addKey('RS256');
        const fresh = await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { kid: newKid });
        const fetchesBefore = issuer.requests.length;
        // Cached keys must not queue behind a fetch that is stuck.
        const [rejected, cachedRs, cachedEs] = await Promise.all([
          evaluate(fresh),
          sleep(200).then(async () => evaluate(await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { kid: kidOf(rs) }))),
          sleep(200).then(async () => evaluate(await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { alg: 'ES256' }))),
        ]);
        assert.equal(rejected.status, 401);
        assert.match(rejected.challenge, /error="invalid_token"/);
        assert.match(rejected.challenge, /could not fetch the issuer JWKS/);
        assert.ok(rejected.ms < PROMPT_MS, `new kid answered in ${rejected.ms} ms`);
        assert.equal(cachedRs.status, 200);
        assert.equal(cachedEs.status, 200);
        assert.ok(cachedRs.ms < 1500 && cachedEs.ms < 1500, `cached keys answered in ${cachedRs.ms}/${cachedEs.ms} ms`);
        assert.equal(issuer.requests.length, fetchesBefore + 1, 'one fetch attempt');

        issuer.mode = 'ok';
        const recovered = await evaluate(fresh);
        assert.equal(recovered.status, 200, `the same token works once the JWKS is back: ${recovered.challenge}`);
      } finally {
        issuer.mode = 'ok';
      }
    });
  });
}

describe('OIDC discovery endpoint hanging', () => {
  test('a new kid is refused within the fetch timeout and works once the issuer answers', async () => {
    const warm = await evaluate(await disc.sign({ aud: AUDIENCE, sub: 'disc' }));
    assert.equal(warm.status, 200);
    disc.mode = 'hang';
    try {
      const kid = await disc.addKey('RS256');
      const token = await disc.sign({ aud: AUDIENCE, sub: 'disc' }, { kid });
      const res = await evaluate(token);
      assert.equal(res.status, 401);
      assert.ok(res.ms < PROMPT_MS, `${res.ms} ms`);
      disc.mode = 'ok';
      assert.equal((await evaluate(token)).status, 200);
    } finally {
      disc.mode = 'ok';
    }
  });
});

describe('key cache past its lifetime during an outage', () => {
  test('a known key is served from the last good copy, and later requests do not wait on the dead JWKS again', async () => {
    const kid = await issuer.addKey('RS256');
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { cacheTtlMs: 200, unknownKidCooldownMs: 2000, fetchTimeoutMs: 1000 });
    try {
      await resolver.publicKeyPem(issuer.issuer, kid, 'RS256');
      await sleep(300);
      issuer.mode = 'hang';
      const fetches = issuer.requests.length;
      let started = Date.now();
      assert.match(await resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), /BEGIN PUBLIC KEY/);
      assert.ok(Date.now() - started < 3000, 'bounded by the fetch timeout');
      started = Date.now();
      for (let i = 0; i < 20; i++) await resolver.publicKeyPem(issuer.issuer, kid, 'RS256');
      assert.ok(Date.now() - started < 500, `20 lookups took ${Date.now() - started} ms`);
      assert.equal(issuer.requests.length, fetches + 1, 'one fetch attempt for the whole burst');
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, 'never-seen', 'RS256'), (err: unknown) => err instanceof KeyLookupError && err.fetchFailed);
    } finally {
      issuer.mode = 'ok';
      await resolver.close();
    }
  });
});

describe('unknown kid flood', () => {
  const token = (kid: string) => issuer.sign({ aud: AUDIENCE, sub: 'flood' }, { header: { kid } });

  test('200 tokens with random kids, all at once, cause a bounded number of JWKS fetches', async () => {
    const fetches = issuer.requests.length;
    const tokens = await Promise.all(Array.from({ length: 200 }, () => token(`rnd-${randomUUID()}`)));
    const results = await Promise.all(tokens.map(evaluate));
    assert.ok(results.every((r) => r.status === 401), 'all refused');
    const made = issuer.requests.length - fetches;
    assert.ok(made >= 1 && made <= 10, `${made} JWKS fetches`);
  });

  test('the same unknown kid sent 200 times in a row causes a bounded number of fetches', async () => {
    const t = await quiet.sign({ aud: AUDIENCE, sub: 'flood' }, { header: { kid: `same-${randomUUID()}` } });
    for (let i = 0; i < 200; i++) assert.equal((await evaluate(t)).status, 401);
    assert.ok(quiet.requests.length >= 1 && quiet.requests.length <= 2, `${quiet.requests.length} JWKS fetches`);
  });

  test('a flood against a hanging JWKS is refused promptly and ties up only a few fetches', async () => {
    await sleep(5100); // a full fetch budget: the worst case
    issuer.mode = 'hang';
    try {
      const fetches = issuer.requests.length;
      const tokens = await Promise.all(Array.from({ length: 200 }, () => token(`hang-${randomUUID()}`)));
      const started = Date.now();
      const results = await Promise.all(tokens.map(evaluate));
      assert.ok(Date.now() - started < PROMPT_MS, `flood took ${Date.now() - started} ms`);
      assert.ok(results.every((r) => r.status === 401));
      assert.ok(issuer.requests.length - fetches <= 10, `${issuer.requests.length - fetches} fetch attempts`);
    } finally {
      issuer.mode = 'ok';
    }
  });

  test('once a flood stops, a genuinely rotated key is picked up within about one refill interval', async () => {
    const tokens = await Promise.all(Array.from({ length: 100 }, () => token(`rnd-${randomUUID()}`)));
    await Promise.all(tokens.map(evaluate));
    const kid = await issuer.addKey('RS256');
    const t = await issuer.sign({ aud: AUDIENCE, sub: 'rotated' }, { kid });
    const started = Date.now();
    let status = 0;
    while (Date.now() - started < 7000 && (status = (await evaluate(t)).status) !== 200) await sleep(100);
    assert.equal(status, 200);
    assert.ok(Date.now() - started < 2500, `accepted after ${Date.now() - started} ms`);
  });
});
