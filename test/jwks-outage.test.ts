import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { KeyLookupError, KeyResolver } from '../src/auth/keys.js';
import { AUDIENCE, startTestBroker, type TestBroker } from './helpers/broker.js';
import { startIssuer, type TestIssuer } from './helpers/issuer.js';

// No test here times its requests: against a hanging JWKS a request that waited on the server
// would never answer, and the per-test timeout below (well above the resolver's 3 s fetch
// timeout) turns that into a failure. What is asserted is order and fetch counts.
const HANG_GUARD = { timeout: 60_000 };

async function until(check: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + 10_000;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting until ${what}`);
    await sleep(10);
  }
}

let b: TestBroker;
let issuer: TestIssuer;
let disc: TestIssuer;
// Used by one test only, so its fetch budget is untouched by the others.
let quiet: TestIssuer;

const kidOf = (token: string) => JSON.parse(Buffer.from(token.split('.')[0], 'base64url').toString()).kid as string;

async function evaluate(token: string): Promise<{ status: number; challenge: string }> {
  const res = await b.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${token}` } });
  return { status: res.statusCode, challenge: String(res.headers['www-authenticate'] ?? '') };
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
    test('cached keys keep verifying, a new kid gets a 401, and recovery needs no restart', HANG_GUARD, async () => {
      const rs = await issuer.sign({ aud: AUDIENCE, sub: 'svc' });
      const es = await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { alg: 'ES256' });
      assert.equal((await evaluate(rs)).status, 200);
      assert.equal((await evaluate(es)).status, 200);

      issuer.mode = mode;
      try {
        const newKid = await issuer.addKey('RS256');
        const fresh = await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { kid: newKid });
        const fetchesBefore = issuer.requests.length;
        let rejectedSettled = false;
        const pending = evaluate(fresh).finally(() => (rejectedSettled = true));
        // Once the fetch for the new kid has reached the JWKS server, tokens with cached keys are
        // sent. Against a hanging server they must be answered while that fetch is still stuck.
        await until(() => issuer.requests.length > fetchesBefore, 'the fetch for the new kid reached the JWKS server');
        const cachedRs = await evaluate(await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { kid: kidOf(rs) }));
        const cachedEs = await evaluate(await issuer.sign({ aud: AUDIENCE, sub: 'svc' }, { alg: 'ES256' }));
        const answeredDuringFetch = !rejectedSettled;
        const rejected = await pending;
        assert.equal(rejected.status, 401);
        assert.match(rejected.challenge, /error="invalid_token"/);
        assert.match(rejected.challenge, /could not fetch the issuer JWKS/);
        assert.equal(cachedRs.status, 200);
        assert.equal(cachedEs.status, 200);
        if (mode === 'hang') assert.ok(answeredDuringFetch, 'cached keys were answered while the fetch for the new kid hung');
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
  test('a new kid is refused after the fetch timeout and works once the issuer answers', HANG_GUARD, async () => {
    const warm = await evaluate(await disc.sign({ aud: AUDIENCE, sub: 'disc' }));
    assert.equal(warm.status, 200);
    disc.mode = 'hang';
    try {
      const kid = await disc.addKey('RS256');
      const token = await disc.sign({ aud: AUDIENCE, sub: 'disc' }, { kid });
      const res = await evaluate(token);
      assert.equal(res.status, 401);
      disc.mode = 'ok';
      assert.equal((await evaluate(token)).status, 200);
    } finally {
      disc.mode = 'ok';
    }
  });
});

describe('key cache past its lifetime during an outage', () => {
  test('a known key is served from the last good copy, and later requests do not wait on the dead JWKS again', HANG_GUARD, async () => {
    const kid = await issuer.addKey('RS256');
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { cacheTtlMs: 200, unknownKidCooldownMs: 2000, fetchTimeoutMs: 1000 });
    try {
      await resolver.publicKeyPem(issuer.issuer, kid, 'RS256');
      await sleep(300);
      issuer.mode = 'hang';
      const fetches = issuer.requests.length;
      // The first lookup waits for the one fetch to time out, then serves the last good copy.
      assert.match(await resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), /BEGIN PUBLIC KEY/);
      assert.equal(issuer.requests.length, fetches + 1, 'one fetch attempt');
      // The rest are served from that copy without another attempt: nothing to wait on.
      for (let i = 0; i < 20; i++) assert.match(await resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), /BEGIN PUBLIC KEY/);
      assert.equal(issuer.requests.length, fetches + 1, 'one fetch attempt for the whole burst');
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, 'never-seen', 'RS256'), (err: unknown) => err instanceof KeyLookupError && err.fetchFailed);
    } finally {
      issuer.mode = 'ok';
      await resolver.close();
    }
  });
});

describe('a JWKS that answers too slowly', () => {
  test('a discovery document trickling in is given up on too: a new kid is refused, and works once the issuer answers', HANG_GUARD, async () => {
    disc.mode = 'drip';
    try {
      const kid = await disc.addKey('RS256');
      const token = await disc.sign({ aud: AUDIENCE, sub: 'disc' }, { kid });
      assert.equal((await evaluate(token)).status, 401);
      disc.mode = 'ok';
      assert.equal((await evaluate(token)).status, 200);
    } finally {
      disc.mode = 'ok';
    }
  });

  test('a body trickling in byte by byte is given up on after the fetch timeout, not after each byte\'s', HANG_GUARD, async () => {
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { fetchTimeoutMs: 1000 });
    try {
      const kid = await issuer.addKey('RS256');
      issuer.mode = 'drip';
      // Each byte arrives well within the timeout, so only a bound on the whole fetch ends it.
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), (err: unknown) => err instanceof KeyLookupError && err.fetchFailed);
      issuer.mode = 'ok';
      assert.match(await resolver.publicKeyPem(issuer.issuer, kid, 'RS256'), /BEGIN PUBLIC KEY/, 'and the same key once it answers');
    } finally {
      issuer.mode = 'ok';
      await resolver.close();
    }
  });
});

describe('the last good key set during an outage', () => {
  test('a key the JWKS stopped listing stays refused through a later outage', HANG_GUARD, async () => {
    const [gone, kept] = [await issuer.addKey('RS256'), await issuer.addKey('RS256')];
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { cacheTtlMs: 200, fetchTimeoutMs: 1000 });
    try {
      assert.match(await resolver.publicKeyPem(issuer.issuer, gone, 'RS256'), /BEGIN PUBLIC KEY/);
      issuer.removeKey(gone);
      await sleep(300);
      // A fetch for another key brings the set without it.
      assert.match(await resolver.publicKeyPem(issuer.issuer, kept, 'RS256'), /BEGIN PUBLIC KEY/);
      issuer.mode = 'down';
      await sleep(300);
      // Refused, not served from an older copy: the last set that answered did not list it.
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, gone, 'RS256'), KeyLookupError);
      assert.match(await resolver.publicKeyPem(issuer.issuer, kept, 'RS256'), /BEGIN PUBLIC KEY/, 'the listed key rides out the outage');
    } finally {
      issuer.mode = 'ok';
      await resolver.close();
    }
  });

  test('a key that came in with another key\'s fetch rides out an outage too', HANG_GUARD, async () => {
    const [asked, alongside] = [await issuer.addKey('RS256'), await issuer.addKey('ES256')];
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { cacheTtlMs: 2000, fetchTimeoutMs: 1000 });
    try {
      await resolver.publicKeyPem(issuer.issuer, asked, 'RS256');
      const fetches = issuer.requests.length;
      assert.match(await resolver.publicKeyPem(issuer.issuer, alongside, 'ES256'), /BEGIN PUBLIC KEY/);
      assert.equal(issuer.requests.length, fetches, 'served from the set the first fetch brought');
      await sleep(2100);
      issuer.mode = 'down';
      assert.match(await resolver.publicKeyPem(issuer.issuer, alongside, 'ES256'), /BEGIN PUBLIC KEY/);
    } finally {
      issuer.mode = 'ok';
      await resolver.close();
    }
  });
});

describe('unknown kid flood', () => {
  const token = (kid: string) => issuer.sign({ aud: AUDIENCE, sub: 'flood' }, { header: { kid } });

  test('made-up kids that use up the fetch budget do not lock out a real key the JWKS lists', async () => {
    // A broker that has just started knows no key. Its budget here never refills during the test.
    const resolver = new KeyResolver([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }], { missFetchBurst: 2, missFetchIntervalMs: 3_600_000 });
    try {
      const realKid = kidOf(await issuer.sign({ aud: AUDIENCE, sub: 'svc' }));
      const fetches = issuer.requests.length;
      // Concurrent misses share one fetch.
      const first = await Promise.allSettled(Array.from({ length: 10 }, () => resolver.publicKeyPem(issuer.issuer, `rnd-${randomUUID()}`, 'RS256')));
      assert.ok(first.every((r) => r.status === 'rejected' && r.reason instanceof KeyLookupError));
      assert.equal(issuer.requests.length, fetches + 1, 'one fetch for ten concurrent misses');
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, `rnd-${randomUUID()}`, 'RS256'), /signing key not found/);
      await assert.rejects(resolver.publicKeyPem(issuer.issuer, `rnd-${randomUUID()}`, 'RS256'), /refetch cooling down/, 'the budget is used up');
      // The flood's fetches brought in the whole set: the real key needs no fetch of its own.
      assert.match(await resolver.publicKeyPem(issuer.issuer, realKid, 'RS256'), /BEGIN PUBLIC KEY/);
      assert.equal(issuer.requests.length, fetches + 2);
    } finally {
      await resolver.close();
    }
  });

  test('200 tokens with random kids, all at once, cause a bounded number of JWKS fetches', async () => {
    const fetches = issuer.requests.length;
    const tokens = await Promise.all(Array.from({ length: 200 }, () => token(`rnd-${randomUUID()}`)));
    const results = await Promise.all(tokens.map(evaluate));
    assert.ok(results.every((r) => r.status === 401), 'all refused');
    const made = issuer.requests.length - fetches;
    assert.ok(made >= 1 && made <= 10, `${made} JWKS fetches`);
    // All at once, they mostly share fetches in flight. One at a time, each after the last one's
    // fetch is over, only the per-issuer budget (a burst of 5, then 1 a second) holds them back.
    const before = issuer.requests.length;
    const started = Date.now();
    for (let i = 0; i < 20; i++) assert.equal((await evaluate(await token(`seq-${randomUUID()}`))).status, 401);
    const sequential = issuer.requests.length - before;
    // What the budget allows in the time they took (it refills at one a second), however slow the machine.
    const allowed = 5 + Math.ceil((Date.now() - started) / 1000) + 1;
    assert.ok(sequential <= allowed && sequential < 20, `${sequential} JWKS fetches for 20 unknown kids one at a time (budget: ${allowed})`);
    // And the key the JWKS lists still verifies, right after the flood.
    assert.equal((await evaluate(await issuer.sign({ aud: AUDIENCE, sub: 'flood:real' }))).status, 200);
  });

  test('the same unknown kid sent 200 times in a row causes a bounded number of fetches', async () => {
    const t = await quiet.sign({ aud: AUDIENCE, sub: 'flood' }, { header: { kid: `same-${randomUUID()}` } });
    for (let i = 0; i < 200; i++) assert.equal((await evaluate(t)).status, 401);
    assert.ok(quiet.requests.length >= 1 && quiet.requests.length <= 2, `${quiet.requests.length} JWKS fetches`);
  });

  test('a flood against a hanging JWKS is refused and ties up only a few fetches', HANG_GUARD, async () => {
    await sleep(5100); // a full fetch budget: the worst case
    issuer.mode = 'hang';
    try {
      const fetches = issuer.requests.length;
      const tokens = await Promise.all(Array.from({ length: 200 }, () => token(`hang-${randomUUID()}`)));
      const results = await Promise.all(tokens.map(evaluate));
      assert.ok(results.every((r) => r.status === 401));
      assert.ok(issuer.requests.length - fetches <= 10, `${issuer.requests.length - fetches} fetch attempts`);
    } finally {
      issuer.mode = 'ok';
    }
  });

  test('once a flood stops, a genuinely rotated key is picked up at the next refill, well before any cooldown', HANG_GUARD, async () => {
    // Refill every 3 s, cooldown 60 s: only a working refill lets the rotated key in within the
    // deadline below; a budget that never refilled would keep refusing it for the whole test.
    const resolver = new KeyResolver([{ issuer: quiet.issuer, jwks_uri: quiet.jwksUri }], { missFetchBurst: 2, missFetchIntervalMs: 3000, unknownKidCooldownMs: 60_000 });
    try {
      await Promise.allSettled(Array.from({ length: 50 }, (_, i) => resolver.publicKeyPem(quiet.issuer, `flood-${i}-${randomUUID()}`, 'RS256')));
      for (let i = 0; i < 3; i++) await resolver.publicKeyPem(quiet.issuer, `flood-more-${randomUUID()}`, 'RS256').catch(() => undefined);
      await assert.rejects(resolver.publicKeyPem(quiet.issuer, `flood-last-${randomUUID()}`, 'RS256'), /cooling down/, 'the flood used up the budget');
      // Published after the flood's last fetch, so only a fetch of its own can bring it in.
      const kid = await quiet.addKey('ES256');
      let pem: string | undefined;
      for (const deadline = Date.now() + 20_000; !pem && Date.now() < deadline; await sleep(50)) {
        pem = await resolver.publicKeyPem(quiet.issuer, kid, 'ES256').catch(() => undefined);
      }
      assert.match(pem ?? 'refused', /BEGIN PUBLIC KEY/, 'the rotated key was accepted without a restart');
    } finally {
      await resolver.close();
    }
  });
});
