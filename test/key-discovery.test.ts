import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { AUDIENCE, startTestBroker, type TestBroker } from './helpers/broker.js';
import { startCountingServer, startIssuer, type TestIssuer } from './helpers/issuer.js';

// Where a broker finds each issuer's keys: OIDC discovery, and what the log says when it cannot.
// Each test starts a broker of its own, configured for the case, on the suite's PostgreSQL.
let b: TestBroker;
let issuer: TestIssuer;
let counting: Awaited<ReturnType<typeof startCountingServer>>;

before(async () => {
  counting = await startCountingServer();
  issuer = await startIssuer({ discovery: false });
  b = await startTestBroker({ issuer });
});

after(async () => {
  await b?.close();
  await issuer?.close();
  await counting?.close();
});

describe('key discovery', () => {
  test('OIDC discovery: a jwks_uri that is no http(s) URL is not fetched, and the log says why', async () => {
    // A data: URL carries its own key set; fetch would take it without asking anyone.
    const smuggler = await startIssuer({ jwksUriFor: (_base, jwks) => `data:application/json,${encodeURIComponent(JSON.stringify(jwks))}` });
    const d = await startTestBroker({ pg: b.pg, issuer: smuggler, env: { BROKER_ISSUERS: smuggler.issuer } });
    try {
      const res = await d.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${await smuggler.sign({ aud: AUDIENCE, sub: 'disc' })}` } });
      assert.equal(res.statusCode, 401, res.body);
      assert.ok(smuggler.requests.includes('/.well-known/openid-configuration'));
      const logged = d.logs.map((l) => JSON.parse(l)).find((l) => l.msg === "could not fetch the issuer's signing keys");
      assert.equal(logged?.issuer, smuggler.issuer);
      assert.match(logged?.err?.message, /names a jwks_uri with scheme data:; only https \(or http, for an http issuer\) is fetched/);
    } finally {
      await d.close();
      await smuggler.close();
    }
  });

  test('a key set that cannot be fetched is logged with the network reason, not only "fetch failed"', async () => {
    // A port that was free a moment ago: nothing listens there.
    const closed = await new Promise<number>((resolve) => {
      const srv = net.createServer().listen(0, '127.0.0.1', () => {
        const { port } = srv.address() as net.AddressInfo;
        srv.close(() => resolve(port));
      });
    });
    const d = await startTestBroker({ pg: b.pg, issuer, env: { BROKER_ISSUERS: JSON.stringify([{ issuer: issuer.issuer, jwks_uri: `http://127.0.0.1:${closed}/jwks` }]) } });
    try {
      const res = await d.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${await issuer.sign({ aud: AUDIENCE, sub: 'nokeys' })}` } });
      assert.equal(res.statusCode, 401, res.body);
      const logged = d.logs.map((l) => JSON.parse(l)).find((l) => l.msg === "could not fetch the issuer's signing keys");
      assert.deepEqual([logged?.issuer, logged?.err?.cause], [issuer.issuer, 'ECONNREFUSED']);
    } finally {
      await d.close();
    }
  });

  test('OIDC discovery: BROKER_ISSUERS as a comma list finds the JWKS through the discovery document', async () => {
    const disc = await startIssuer({ discovery: true });
    const disc2 = await startIssuer({ discovery: true });
    const d = await startTestBroker({ pg: b.pg, issuer: disc, env: { BROKER_ISSUERS: ` ${disc.issuer} ,${disc2.issuer}` } });
    try {
      assert.deepEqual(d.config.issuers, [{ issuer: disc.issuer }, { issuer: disc2.issuer }]);
      for (const [iss, alg] of [[disc, 'RS256'], [disc, 'ES256'], [disc2, 'RS256']] as const) {
        const res = await d.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${await iss.sign({ aud: AUDIENCE, sub: 'disc' }, { alg })}` } });
        assert.equal(res.statusCode, 200, `${alg}: ${res.body}`);
      }
      assert.ok(disc.requests.includes('/.well-known/openid-configuration'), disc.requests.join());
      assert.ok(disc.requests.includes('/jwks'));
      const bad = await d.app.inject({ method: 'POST', url: '/policies/evaluate', headers: { authorization: `Bearer ${await disc.sign({ aud: AUDIENCE, sub: 'disc', iss: counting.url })}` } });
      assert.equal(bad.statusCode, 401);
      assert.deepEqual(counting.requests, []);
    } finally {
      await d.close();
      await disc.close();
      await disc2.close();
    }
  });
});
