import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { startTestBroker, waitFor, type TestBroker } from './helpers/broker.js';

// Three brokers over one PostgreSQL, each with 3 requests a minute per client IP: one behind a
// proxy on 127.0.0.1 (where the tests connect from), one trusting no proxy, and one trusting
// proxies elsewhere.
const LIMIT = { BROKER_RATE_LIMIT_IP: '3' };
let behindProxy: TestBroker;
let direct: TestBroker;
let proxiedElsewhere: TestBroker;

before(async () => {
  behindProxy = await startTestBroker({ env: { ...LIMIT, BROKER_TRUST_PROXY: '127.0.0.1' } });
  direct = await startTestBroker({ pg: behindProxy.pg, issuer: behindProxy.issuer, env: LIMIT });
  proxiedElsewhere = await startTestBroker({ pg: behindProxy.pg, issuer: behindProxy.issuer, env: { ...LIMIT, BROKER_TRUST_PROXY: '192.0.2.1,10.0.0.0/8' } });
  await behindProxy.putPolicy('proxied', { claims: { sub: 'px:*' }, max_active_leases: 100 });
});
after(async () => {
  await proxiedElsewhere?.close();
  await direct?.close();
  await behindProxy?.close();
});

const unauthenticated = (url: string, forwardedFor: string) => fetch(`${url}/leases`, { headers: { 'x-forwarded-for': forwardedFor } });

async function statuses(url: string, forwardedFor: string[]): Promise<number[]> {
  const seen: number[] = [];
  for (const address of forwardedFor) seen.push((await unauthenticated(url, address)).status);
  return seen;
}

/** client_ip of every audit event a request recorded. */
async function auditedIps(b: TestBroker, requestId: string): Promise<string[]> {
  const rows = await b.pg.query<{ client_ip: string }>('SELECT client_ip FROM broker.audit_events WHERE request_id = $1 ORDER BY id', [requestId]);
  return rows.map((r) => r.client_ip);
}

/** The `ip` of a request's one log line (written as the response finishes, so waited for). */
async function loggedIp(b: TestBroker, requestId: string): Promise<string> {
  const line = await waitFor(`the log line of ${requestId}`, async () => b.logs.map((l) => JSON.parse(l)).find((l) => l.reqId === requestId && 'ip' in l));
  return line.ip;
}

/** POST /credentials over the socket; the lease's client_ip and that of its audit events. */
async function issueThrough(b: TestBroker, url: string, forwardedFor: string): Promise<{ lease: string; audit: string[] }> {
  const res = await fetch(`${url}/credentials`, {
    method: 'POST', body: '{}',
    headers: { authorization: `Bearer ${await b.token({ sub: 'px:app' })}`, 'content-type': 'application/json', 'x-forwarded-for': forwardedFor },
  });
  assert.equal(res.status, 201, await res.clone().text());
  const { lease_id } = await res.json() as { lease_id: string };
  const [lease] = await b.pg.query<{ client_ip: string; request_id: string }>('SELECT client_ip, request_id FROM broker.leases WHERE id = $1', [lease_id]);
  return { lease: lease.client_ip, audit: await auditedIps(b, lease.request_id) };
}

test('behind a listed proxy, each forwarded client has its own per-IP bucket, and the audit and log record the client', async () => {
  const url = await behindProxy.app.listen({ host: '127.0.0.1', port: 0 });
  assert.deepEqual(await statuses(url, ['203.0.113.1', '203.0.113.1', '203.0.113.1', '203.0.113.1']), [401, 401, 401, 429]);
  assert.deepEqual(await statuses(url, ['203.0.113.2']), [401], 'another client behind the same proxy is not limited');

  // A client's own X-Forwarded-For arrives in front of the address the proxy appended; only the
  // appended one is believed, so naming an exhausted (or anyone's) address gains nothing.
  const chained = await unauthenticated(url, '203.0.113.1, 203.0.113.3');
  assert.equal(chained.status, 401, 'counted against 203.0.113.3, not the exhausted 203.0.113.1');
  const { request_id: requestId } = await chained.json() as { request_id: string };
  assert.deepEqual(await auditedIps(behindProxy, requestId), ['203.0.113.3'], 'token.rejected names the client');
  assert.equal(await loggedIp(behindProxy, requestId), '203.0.113.3');

  assert.deepEqual(await issueThrough(behindProxy, url, '203.0.113.4'), { lease: '203.0.113.4', audit: ['203.0.113.4'] });
});

test('with BROKER_TRUST_PROXY unset, X-Forwarded-For is ignored: one bucket for the connection\'s address, which the audit records', async () => {
  const url = await direct.app.listen({ host: '127.0.0.1', port: 0 });
  assert.deepEqual(await issueThrough(direct, url, '203.0.113.4'), { lease: '127.0.0.1', audit: ['127.0.0.1'] });
  const refused = await unauthenticated(url, '203.0.113.5');
  assert.equal(refused.status, 401);
  const { request_id: requestId } = await refused.json() as { request_id: string };
  assert.deepEqual(await auditedIps(direct, requestId), ['127.0.0.1']);
  assert.equal(await loggedIp(direct, requestId), '127.0.0.1');
  // The issuance and the 401 above took two of 127.0.0.1's three, whatever each claimed to be.
  assert.deepEqual(await statuses(url, ['203.0.113.6', '203.0.113.7']), [401, 429]);
});

test('X-Forwarded-For from a peer outside BROKER_TRUST_PROXY is not believed; from a listed proxy it is', async () => {
  const from = async (remoteAddress: string, forwardedFor: string) => {
    const res = await proxiedElsewhere.app.inject({ method: 'GET', url: '/leases', remoteAddress, headers: { 'x-forwarded-for': forwardedFor } });
    return { status: res.statusCode, ips: await auditedIps(proxiedElsewhere, res.json().request_id) };
  };
  const spoofed = [];
  for (const address of ['203.0.113.11', '203.0.113.12', '203.0.113.13', '203.0.113.14']) spoofed.push(await from('127.0.0.1', address));
  assert.deepEqual(spoofed.map((r) => r.status), [401, 401, 401, 429], 'one bucket for 127.0.0.1, whatever it claims');
  assert.deepEqual(spoofed[0].ips, ['127.0.0.1']);

  assert.deepEqual(await from('192.0.2.1', '203.0.113.15'), { status: 401, ips: ['203.0.113.15'] }, 'a listed address');
  assert.deepEqual(await from('10.20.30.40', '203.0.113.16'), { status: 401, ips: ['203.0.113.16'] }, 'an address in a listed block');
});

// proxy-addr returns the entry at the client's position whatever it holds, so a listed proxy that
// passes a client's own header on (rather than appending) would let it write any text there.
test('an X-Forwarded-For entry that is no IP address is not recorded nor counted: the nearest hop that is one stands in', async () => {
  const from = async (peer: string, forwardedFor: string, token?: string) => {
    const res = await proxiedElsewhere.app.inject({
      method: token ? 'POST' : 'GET', url: token ? '/credentials' : '/leases', remoteAddress: peer,
      headers: { 'x-forwarded-for': forwardedFor, ...(token ? { authorization: `Bearer ${token}` } : {}) }, ...(token ? { payload: {} } : {}),
    });
    const body = res.json();
    const [lease] = token ? await proxiedElsewhere.pg.query('SELECT client_ip, request_id FROM broker.leases WHERE id = $1', [body.lease_id]) : [];
    const requestId = lease?.request_id ?? body.request_id;
    return { status: res.statusCode, audit: await auditedIps(proxiedElsewhere, requestId), log: await loggedIp(proxiedElsewhere, requestId), lease: lease?.client_ip };
  };
  // Whatever text follows, it is the listed proxy 192.0.2.1 that is recorded, and its one
  // allowance of 3 a minute that is spent: new text buys no new allowance.
  const texts = ['unknown', '<script>alert(1)</script>', '203.0.113.30:51234', '[2001:db8::30]', 'x'.repeat(2000)];
  const answers = [];
  for (const text of texts) answers.push(await from('192.0.2.1', text));
  assert.deepEqual(answers.map((a) => [a.status, a.log]), [[401, '192.0.2.1'], [401, '192.0.2.1'], [401, '192.0.2.1'], [429, '192.0.2.1'], [429, '192.0.2.1']]);
  assert.deepEqual(answers.slice(0, 3).map((a) => a.audit), [['192.0.2.1'], ['192.0.2.1'], ['192.0.2.1']]);
  assert.deepEqual(await from('10.20.30.41', 'unknown', await proxiedElsewhere.token({ sub: 'px:garbled' })), { status: 201, audit: ['10.20.30.41'], log: '10.20.30.41', lease: '10.20.30.41' });
  // Behind two listed proxies, the one that passed the text on is the nearest address.
  assert.deepEqual(await from('10.20.30.42', 'not an address, 10.1.2.3'), { status: 401, audit: ['10.1.2.3'], log: '10.1.2.3', lease: undefined });
  // An address there is still believed, IPv4, IPv6 or IPv4-mapped.
  for (const client of ['203.0.113.31', '2001:db8::31', '::ffff:203.0.113.32']) {
    assert.deepEqual(await from('10.20.30.43', client), { status: 401, audit: [client], log: client, lease: undefined }, client);
  }
  assert.deepEqual(await from('10.20.30.43', '203.0.113.33', await proxiedElsewhere.token({ sub: 'px:plain' })), { status: 201, audit: ['203.0.113.33'], log: '203.0.113.33', lease: '203.0.113.33' });
});

// Node's isIP takes an IPv6 zone id (`%` and any run of letters, digits, '.', '-' and ':'), so an
// address with one passed for an address: a client behind a proxy that passes its header on could
// still write kilobytes of its own text into client_ip. A zone names an interface of the host that
// wrote it, nothing of the client's: the address is recorded without it.
test('an X-Forwarded-For IPv6 address with a zone id is recorded without it', async () => {
  const zoned = `2001:db8::40%${'unknown.'.repeat(500)}`;
  const res = await proxiedElsewhere.app.inject({ method: 'GET', url: '/leases', remoteAddress: '10.20.30.50', headers: { 'x-forwarded-for': zoned } });
  assert.equal(res.statusCode, 401);
  const requestId = res.json().request_id;
  assert.deepEqual(await auditedIps(proxiedElsewhere, requestId), ['2001:db8::40']);
  assert.equal(await loggedIp(proxiedElsewhere, requestId), '2001:db8::40');
});
