import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fetchFailure } from '../src/cli/client.js';
import type { TestBroker } from './helpers/broker.js';
import { startCliBench, type CliBench } from './helpers/cli.js';

let b: TestBroker;
let url: string;
let home: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, url, home, cli } = await startCliBench('pgcb-cli-client-'));
});
after(async () => b?.close());

function closedPort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

describe('pg-broker says why the broker cannot be reached', () => {
  test('a refused connection, an unknown host and a TLS failure are each named; the broker\'s own URL is answered', async () => {
    const admin = await b.adminToken();
    const port = await closedPort();
    const refused = await cli(['leases', 'list', '--url', `http://127.0.0.1:${port}`, '--token', admin]);
    assert.equal(refused.code, 1);
    assert.equal(refused.stderr, `pg-broker: cannot reach the broker at http://127.0.0.1:${port}: fetch failed (connect ECONNREFUSED 127.0.0.1:${port})\n`);
    const unknown = await cli(['leases', 'list', '--url', 'https://pg-broker.invalid', '--token', admin]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /^pg-broker: cannot reach the broker at https:\/\/pg-broker\.invalid: fetch failed \(getaddrinfo (ENOTFOUND|EAI_AGAIN) pg-broker\.invalid\)\n$/);
    // https to a port that speaks plain http: the TLS handshake fails.
    const tls = await cli(['leases', 'list', '--url', url.replace(/^http:/, 'https:'), '--token', admin]);
    assert.equal(tls.code, 1);
    assert.match(tls.stderr, /^pg-broker: cannot reach the broker at https:\/\/127\.0\.0\.1:\d+: fetch failed \(ERR_SSL_WRONG_VERSION_NUMBER: .*wrong version number/);
    const reached = await cli(['leases', 'list', '--url', url, '--token', admin]);
    assert.equal(reached.code, 0, reached.stderr);
    for (const run of [refused, unknown, tls]) assert.ok(!run.stderr.includes(admin), 'no token in the error');
  });

  test('a header fetch refuses, which it quotes whole, is reported without the token in it', async () => {
    const secret = 'eyJhbGciOi.secret-part\nsecond-line';
    const err = await fetch(`${url}/healthz`, { headers: { authorization: `Bearer ${secret}` } }).then(() => null, (e: unknown) => e);
    assert.ok(err instanceof Error && err.message.includes(secret), 'fetch quotes the header value');
    const reported = fetchFailure(err, secret);
    assert.ok(!reported.includes('secret-part'), reported);
    assert.match(reported, /"Bearer \[token\]" is an invalid header value/);
    // Without a secret to cut, the same text: nothing else is lost.
    assert.equal(fetchFailure(err), err.message);
  });
});

describe('pg-broker takes a token copied with its scheme', () => {
  test('one leading "Bearer " is dropped from --token, $PG_BROKER_TOKEN and a token file, in any case; the bare token works as before', async () => {
    const token = await b.token({ sub: 'cli:scheme' });
    const file = path.join(home, 'scheme.jwt');
    await writeFile(file, `Bearer ${token}\n`);
    const runs = {
      bare: await cli(['policy', 'evaluate', '--token', token]),
      flag: await cli(['policy', 'evaluate', '--token', `Bearer ${token}`]),
      variable: await cli(['policy', 'evaluate'], { PG_BROKER_TOKEN: `bearer  ${token}` }),
      file: await cli(['policy', 'evaluate', '--token-file', file]),
    };
    for (const [how, run] of Object.entries(runs)) {
      assert.equal(run.code, 0, `${how}: ${run.stderr}`);
      assert.match(run.stdout, /^token: iss \S+, sub cli:scheme\n✓ admitted cli\n/, how);
    }
    // Only one: what follows is taken as the token, and "Bearer eyJ…" is none.
    const twice = await cli(['policy', 'evaluate', '--token', `Bearer Bearer ${token}`]);
    assert.equal(twice.code, 1);
    assert.match(twice.stderr, /^pg-broker: --token is no bearer token: /);
    const schemeOnly = await cli(['policy', 'evaluate'], { PG_BROKER_TOKEN: 'Bearer ' });
    assert.deepEqual([schemeOnly.code, schemeOnly.stderr], [1, 'pg-broker: PG_BROKER_TOKEN holds the word Bearer and no token after it\n']);
    for (const run of [...Object.values(runs), twice]) assert.ok(!run.stderr.includes(token), 'no token on stderr');
  });

  test('a token with a space, line break or quote inside is refused without being quoted; the same token alone works', async () => {
    const token = await b.token({ sub: 'cli:inside' });
    const file = path.join(home, 'two.jwt');
    await writeFile(file, `${token}\n${token}\n`);
    const runs = [
      await cli(['policy', 'evaluate', '--token-file', file]),
      await cli(['policy', 'evaluate', '--token', `"${token}"`]),
      await cli(['policy', 'evaluate'], { PG_BROKER_TOKEN: `${token} ${token}` }),
    ];
    assert.deepEqual(runs.map((r) => [r.code, r.stderr.replace(/^pg-broker: (.*) is no bearer token: .*\n$/, '$1')]),
      [[1, `token file ${file}`], [1, '--token'], [1, 'PG_BROKER_TOKEN']]);
    for (const run of runs) assert.ok(!run.stderr.includes(token.slice(-20)), run.stderr);
    await writeFile(file, `${token}\n`);
    const one = await cli(['policy', 'evaluate', '--token-file', file]);
    assert.equal(one.code, 0, one.stderr);
  });
});
