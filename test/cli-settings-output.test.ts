import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readFileSync, statSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { missingCredentialFields } from '../src/cli/credentials.js';
import { waitFor, type TestBroker } from './helpers/broker.js';
import { BIN, startCliBench, type CliBench } from './helpers/cli.js';
import { freePort } from './helpers/ports.js';

// What the CLI does with settings and with what answers it: a server at --url that is not the
// broker, LOG_LEVEL for migrate, a reader that goes away, dev-issuer's --public-url.
let b: TestBroker;
let tmp: string;
let url: string;
let cli: CliBench['cli'];

before(async () => {
  ({ b, home: tmp, url, cli } = await startCliBench('pgcb-cli-settings-'));
});
after(async () => b?.close());

describe('pg-broker settings and answers', () => {
  test('a wrong --url that answers 200 with something else is refused: exec never runs, creds prints nothing; the broker\'s URL works', async () => {
    const token = await b.token({ sub: 'cli:wrong-url' });
    let answer: 'html' | 'json' | 'empty' | 'html-404' | 'text-502' | 'escape-500' = 'html';
    const stranger = http.createServer((_req, res) => {
      if (answer === 'html-404') return void res.writeHead(404, { 'content-type': 'text/html' }).end('<!DOCTYPE html>\n<html>\n<head><title>404</title></head>\n<body>\nNot Found\n</body>\n</html>\n');
      if (answer === 'text-502') return void res.writeHead(502, { 'content-type': 'text/plain', 'retry-after': '7' }).end('Bad Gateway\n');
      if (answer === 'escape-500') return void res.writeHead(500, { 'content-type': 'text/plain' }).end('oops \u001b[2J');
      if (answer === 'json') return void res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
      if (answer === 'empty') return void res.writeHead(200).end();
      res.writeHead(200, { 'content-type': 'text/html' }).end('<html>sign in</html>');
    });
    await new Promise<void>((resolve) => stranger.listen(0, '127.0.0.1', resolve));
    const other = `http://127.0.0.1:${(stranger.address() as AddressInfo).port}`;
    const ran = path.join(tmp, 'wrong-url-ran');
    try {
      const exec = await cli(['exec', '--url', other, '--token', token, '--', process.execPath, '-e', `require('fs').writeFileSync(${JSON.stringify(ran)}, 'x')`]);
      assert.equal(exec.code, 1);
      assert.match(exec.stderr, /answered POST \/credentials with 200 but not with the broker's JSON \(content-type "text\/html"\); is http:\/\/127\.0\.0\.1:\d+ the broker's URL\?/);
      assert.ok(!existsSync(ran), 'the command never ran');
      const creds = await cli(['creds', '--url', other, '--token', token, '--format', 'uri']);
      assert.equal(creds.code, 1);
      assert.equal(creds.stdout, '');
      const list = await cli(['leases', 'list', '--url', other, '--token', await b.adminToken()]);
      assert.equal(list.code, 1);
      assert.match(list.stderr, /not with the broker's JSON/);
      // JSON that is no credential is refused too.
      answer = 'json';
      const json = await cli(['exec', '--url', other, '--token', token, '--', process.execPath, '-e', `require('fs').writeFileSync(${JSON.stringify(ran)}, 'x')`]);
      assert.equal(json.code, 1);
      assert.match(json.stderr, /answered POST \/credentials with 200 but not with a credential \(no valid lease_id, username, password, host, database, expires_at, uri, port\)/);
      assert.ok(!existsSync(ran), 'the command never ran');
      // Nothing at all is no answer either.
      answer = 'empty';
      const empty = await cli(['leases', 'list', '--url', other, '--token', await b.adminToken()]);
      assert.equal(empty.code, 1);
      assert.match(empty.stderr, /answered GET \/leases with 200 and nothing else; is http:\/\/127\.0\.0\.1:\d+ the broker's URL\?/);
      // An error page is not the broker's problem+json either: one line naming the server, not the page.
      answer = 'html-404';
      const notFound = await cli(['creds', '--url', other, '--token', token]);
      assert.equal(notFound.code, 1);
      assert.equal(notFound.stderr, `pg-broker: the server at ${other} answered POST /credentials with 404, not with the broker's problem+json (content-type "text/html"); is ${other} the broker's URL, or a proxy in front of it failing?\n`);
      answer = 'text-502';
      const gateway = await cli(['leases', 'list', '--url', other, '--token', await b.adminToken()]);
      assert.equal(gateway.code, 1);
      assert.equal(gateway.stderr, `pg-broker: the server at ${other} answered GET /leases with 502, not with the broker's problem+json (content-type "text/plain"): Bad Gateway; is ${other} the broker's URL, or a proxy in front of it failing?\n`);
      answer = 'escape-500';
      const escape = await cli(['leases', 'list', '--url', other, '--token', await b.adminToken()]);
      assert.equal(escape.code, 1);
      assert.ok(!escape.stderr.includes('\u001b'), 'a terminal escape from the server is not printed');
      assert.match(escape.stderr, /answered GET \/leases with 500, not with the broker's problem\+json \(content-type "text\/plain"\); is/);
    } finally {
      stranger.closeAllConnections();
      await new Promise((resolve) => stranger.close(resolve));
    }
    // The URL is checked before a token is looked for: here there is none, and the URL is named.
    const noToken = await cli(['creds', '--url', 'ftp://broker']);
    assert.match(noToken.stderr, /^pg-broker: --url must be the broker's http\(s\) URL/);
    // The good input: the broker's own URL.
    const good = await cli(['creds', '--token', token, '--format', 'uri']);
    assert.equal(good.code, 0, good.stderr);
    assert.match(good.stdout, /^postgresql:\/\/lease_/);
    assert.deepEqual(missingCredentialFields(JSON.parse((await cli(['creds', '--token', token, '--format', 'json'])).stdout)), []);
  });

  test('migrate refuses a LOG_LEVEL it does not know as serve does, naming the setting; a known one migrates', async () => {
    const bad = await cli(['migrate'], { LOG_LEVEL: 'bogus', DATABASE_URL: b.pg.brokerUrl });
    assert.equal(bad.code, 1);
    assert.equal(bad.stderr.trim(), 'pg-broker: configuration error: LOG_LEVEL: must be one of fatal, error, warn, info, debug, trace, silent');
    const good = await cli(['migrate'], { LOG_LEVEL: 'WARN', DATABASE_URL: b.pg.brokerUrl });
    assert.equal(good.code, 0, good.stderr);
    assert.equal(good.stdout.trim(), 'database is up to date');
  });

  test('output piped to a reader that has gone (| head -1) ends quietly; read whole, it is all there', async () => {
    const run = (closeEarly: boolean) => new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
      const child = spawn(process.execPath, [BIN, '--help'], { env: { PATH: process.env.PATH!, HOME: tmp }, stdio: ['ignore', 'pipe', 'pipe'] });
      // Closed before the CLI has even started: its first write meets EPIPE.
      if (closeEarly) child.stdout.destroy();
      let out = '';
      let err = '';
      if (!closeEarly) child.stdout.on('data', (d) => (out += d));
      child.stderr.on('data', (d) => (err += d));
      child.on('exit', (code) => resolve({ code, out, err }));
    });
    const gone = await run(true);
    assert.deepEqual([gone.code, gone.err], [0, '']);
    const whole = await run(false);
    assert.equal(whole.code, 0, whole.err);
    assert.match(whole.out, /^Usage: pg-broker /);
  });

  test('creds whose standard output nobody reads revokes the credential and fails; read, it is delivered', async () => {
    const token = await b.token({ sub: 'cli:nobody-reads' });
    /** Runs creds with its stdout (and maybe stderr) on `out`; resolves to its exit code, its stderr and the state of the lease it names. */
    const creds = async (out: 'closed' | number, opts: { stderrToo?: boolean; prefix?: string[]; format?: string } = {}) => {
      const command = [...(opts.prefix ?? []), process.execPath, BIN, 'creds', '--token', token, '--format', opts.format ?? 'env'];
      const child = spawn(command[0], command.slice(1), {
        env: { PATH: process.env.PATH!, HOME: tmp, PG_BROKER_URL: url },
        stdio: ['ignore', out === 'closed' ? 'pipe' : out, opts.stderrToo && out !== 'closed' ? out : 'pipe'],
      });
      if (out === 'closed') child.stdout!.destroy();
      else closeSync(out);
      let err = '';
      child.stderr?.on('data', (d) => (err += d));
      const code = await new Promise((resolve) => child.on('exit', resolve));
      const lease = /^pg-broker: cannot write the credential to standard output: (\w+); lease ([0-9a-f-]{36}) revoked$/m.exec(err);
      const state = lease ? (await b.pg.query('SELECT state FROM broker.leases WHERE id = $1', [lease[2]]))[0].state : null;
      return { code, err, reason: lease?.[1], state };
    };
    // A reader that has gone (a closed pipe).
    assert.deepEqual(await creds('closed').then(({ code, reason, state }) => [code, reason, state]), [1, 'EPIPE', 'revoked']);
    // A write that fails otherwise (a full disk: /dev/full).
    assert.deepEqual(await creds(openSync('/dev/full', 'w')).then(({ code, reason, state }) => [code, reason, state]), [1, 'ENOSPC', 'revoked']);
    // Standard output on /dev/null (or closed, which Node reopens as it): refused before anything is issued.
    const nowhere = await creds(openSync('/dev/null', 'w'));
    assert.equal(nowhere.code, 1, nowhere.err);
    assert.match(nowhere.err, /^pg-broker: standard output goes nowhere \(closed, or \/dev\/null\)/);
    // With standard error on the full disk too (`> file 2>&1`): nothing can be said, but the lease
    // still goes (this identity's three leases so far, all revoked; /dev/null's run issued none).
    assert.equal((await creds(openSync('/dev/full', 'w'), { stderrToo: true })).code, 1);
    const states = await b.pg.query(`SELECT state FROM broker.leases WHERE subject = 'cli:nobody-reads'`);
    assert.deepEqual(states.map((r) => r.state), ['revoked', 'revoked', 'revoked']);
    // A disk that fills up part-way (a 300-byte file size limit): Node's stream would take the
    // short write for success and exit 0 with half a credential in the file.
    const partFile = path.join(tmp, 'part.json');
    const part = await creds(openSync(partFile, 'w'), { prefix: ['prlimit', '--fsize=300'], format: 'json' });
    assert.deepEqual([part.code, part.reason, part.state], [1, 'EFBIG', 'revoked'], part.err);
    assert.equal(statSync(partFile).size, 300, 'the limit cut it');
    // Read, it is delivered.
    const read = await cli(['creds', '--token', token, '--format', 'env']);
    assert.equal(read.code, 0, read.stderr);
    assert.match(read.stdout, /^export PGUSER=/m);
  });

  test('leases list to a file the disk cannot hold all of fails, not exit 0 with a cut-off file; to one it can, the file is whole', async () => {
    const admin = await b.adminToken();
    for (let i = 0; i < 3; i++) assert.equal((await cli(['creds', '--token', await b.token({ sub: `cli:export-${i}` }), '--format', 'uri'])).code, 0);
    const list = (fd: number, prefix: string[] = []) => new Promise<{ code: number | null; err: string }>((resolve) => {
      const command = [...prefix, process.execPath, BIN, 'leases', 'list', '--json', '--token', admin];
      const child = spawn(command[0], command.slice(1), { env: { PATH: process.env.PATH!, HOME: tmp, PG_BROKER_URL: url }, stdio: ['ignore', fd, 'pipe'] });
      closeSync(fd);
      let err = '';
      child.stderr!.on('data', (d) => (err += d));
      child.on('exit', (code) => resolve({ code, err }));
    });
    const file = path.join(tmp, 'leases.json');
    const cut = await list(openSync(file, 'w'), ['prlimit', '--fsize=500']);
    assert.deepEqual([cut.code, cut.err], [1, 'pg-broker: cannot write to standard output: EFBIG\n']);
    assert.equal(statSync(file).size, 500, 'the limit cut it');
    const whole = await list(openSync(file, 'w'));
    assert.equal(whole.code, 0, whole.err);
    const body = JSON.parse(readFileSync(file, 'utf8')) as { items: unknown[] };
    assert.ok(body.items.length >= 3);
  });

  test('dev-issuer refuses a --public-url no broker could name as its issuer; a good one becomes the tokens\' iss', async () => {
    for (const bad of ['not a url', 'ftp://idp.local', 'http://idp.local/?tenant=1', 'http://u:pw@idp.local', 'http://idp.local:70000', 'http:idp.local']) {
      const run = await cli(['dev-issuer', '--port', String(await freePort()), '--public-url', bad]);
      assert.equal(run.code, 1, bad);
      assert.match(run.stderr, /^pg-broker: --public-url must be an http\(s\) URL without a user part, query or fragment/, bad);
      assert.ok(!run.stderr.includes('pw@'), run.stderr);
    }
    const port = await freePort();
    const child = spawn(process.execPath, [BIN, 'dev-issuer', '--port', String(port), '--public-url', 'http://idp.local:9999/dev'], { env: { PATH: process.env.PATH!, HOME: tmp }, stdio: ['ignore', 'pipe', 'pipe'] });
    const exited = new Promise((resolve) => child.on('exit', resolve));
    try {
      let out = '';
      child.stdout.on('data', (d) => (out += d));
      await waitFor('the dev issuer to start', async () => out.includes('issuer http://idp.local:9999/dev'), 30_000);
      const { access_token } = await (await fetch(`http://127.0.0.1:${port}/token`, { method: 'POST', body: '{"sub":"dev:x"}' })).json() as { access_token: string };
      assert.equal(JSON.parse(Buffer.from(access_token.split('.')[1], 'base64url').toString()).iss, 'http://idp.local:9999/dev');
      assert.match(out, /\(JWKS http:\/\/idp\.local:9999\/dev\/jwks\)/);
    } finally {
      child.kill('SIGINT');
      await exited;
    }
  });
});
