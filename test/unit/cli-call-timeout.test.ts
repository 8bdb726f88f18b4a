import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { callBroker, CliError, undiciTimedOut } from '../../src/cli/client.js';
import { isFinalRenewFailure } from '../../src/cli/renew-schedule.js';

// A broker that got the request but has not answered yet may still carry it out: the CLI must
// say so rather than call it unreachable (a slow DELETE used to read "cannot reach the broker").
describe('callBroker deadline', () => {
  let server: http.Server;
  let base: string;
  const stalled: http.ServerResponse[] = [];
  before(async () => {
    server = http.createServer((req, res) => {
      if (req.url === '/fast') return void res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
      if (req.url === '/half') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.write('{"ok":');
      }
      stalled.push(res);
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    base = `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  });
  after(async () => {
    for (const res of stalled) res.destroy();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  });

  const failure = (p: Promise<unknown>) => p.then(() => assert.fail('expected a failure'), (err: unknown) => {
    assert.ok(err instanceof CliError, String(err));
    return err;
  });

  test('an answer within the deadline is returned', async () => {
    const { status, body, serverClock } = await callBroker(base, 't', 'DELETE', '/fast', undefined, 2000);
    assert.deepEqual({ status, body }, { status: 200, body: { ok: true } });
    assert.ok(serverClock !== null, 'the answer\'s Date header was read');
  });

  test('no answer, or half an answer, within the deadline: it may still complete, and a renewal is retried', async () => {
    for (const path of ['/never', '/half']) {
      const err = await failure(callBroker(base, 't', 'DELETE', path, undefined, 300));
      assert.equal(err.message, `the broker at ${base} did not answer DELETE ${path} within 0.3 s; it may still complete there`);
      assert.equal(isFinalRenewFailure(err), false);
    }
  });

  test('a closed port is still reported as unreachable', async () => {
    const closed = await new Promise<number>((r) => {
      const s = net.createServer().listen(0, '127.0.0.1', () => {
        const port = (s.address() as net.AddressInfo).port;
        s.close(() => r(port));
      });
    });
    const err = await failure(callBroker(`http://127.0.0.1:${closed}`, 't', 'DELETE', '/fast', undefined, 2000));
    assert.match(err.message, /^cannot reach the broker at /);
  });
});

// fetch (undici) has header and body timeouts of its own, 300 s each, as long as a revocation's
// deadline: whichever fires first, the answer did not come in time.
test('fetch\'s own header and body timeouts count as no answer; other failures do not', () => {
  const failed = (code: string) => Object.assign(new TypeError('fetch failed'), { cause: Object.assign(new Error(code), { code }) });
  assert.equal(undiciTimedOut(failed('UND_ERR_HEADERS_TIMEOUT')), true);
  assert.equal(undiciTimedOut(failed('UND_ERR_BODY_TIMEOUT')), true);
  assert.equal(undiciTimedOut(failed('ECONNREFUSED')), false);
  assert.equal(undiciTimedOut(new Error('no cause')), false);
  assert.equal(undiciTimedOut(undefined), false);
});
