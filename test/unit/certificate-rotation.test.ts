import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, test } from 'node:test';
import pg from 'pg';
import { connectionConfig } from '../../src/postgres/pool.js';

// DATABASE_URL's sslrootcert, sslcert and sslkey name files that get rotated on disk; a running
// broker's new connections must use what the files hold then, as pg's own URL handling did.
// The server here is a loopback stand-in for PostgreSQL's TLS start: it answers pg's SSLRequest
// with 'S', completes a real handshake (asking for a client certificate), notes what it saw and
// hangs up, so pg's side of TLS runs for real.

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgcb-certs-'));
function selfSigned(name: string): { cert: string; key: string } {
  const [keyFile, certFile] = [path.join(dir, `${name}.key`), path.join(dir, `${name}.crt`)];
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-days', '1',
    '-subj', `/CN=${name}`, '-addext', 'subjectAltName=IP:127.0.0.1', '-keyout', keyFile, '-out', certFile], { stdio: 'ignore' });
  return { cert: fs.readFileSync(certFile, 'utf8'), key: fs.readFileSync(keyFile, 'utf8') };
}

const seen: Array<{ handshake: boolean; clientCert: string | null }> = [];
let server: net.Server;
let port = 0;
let serverCert: { cert: string; key: string };

before(async () => {
  server = net.createServer((socket) => {
    socket.once('data', () => {
      socket.write('S');
      const secure = new tls.TLSSocket(socket, {
        isServer: true, ...serverCert, requestCert: true, rejectUnauthorized: false,
      });
      let done = false;
      const note = (handshake: boolean, clientCert: string | null) => {
        if (!done) seen.push({ handshake, clientCert });
        done = true;
        secure.destroy();
      };
      secure.on('secure', () => {
        const peer = secure.getPeerCertificate();
        note(true, peer?.raw ? `CN=${peer.subject.CN}` : null);
      });
      // A client that refuses the server's certificate may send an alert or just hang up.
      secure.on('error', () => note(false, null));
      secure.on('close', () => note(false, null));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  port = (server.address() as net.AddressInfo).port;
});
after(() => { server?.close(); fs.rmSync(dir, { recursive: true, force: true }); });

/** One connection attempt through the pool; what the server saw of it. */
async function attempt(pool: pg.Pool): Promise<{ handshake: boolean; clientCert: string | null }> {
  const before = seen.length;
  await pool.connect().then((c) => c.release(true), () => undefined);
  for (let i = 0; i < 200 && seen.length === before; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(seen.length, before + 1, 'the server saw the attempt');
  return seen[seen.length - 1];
}

test('a rotated sslrootcert, sslcert and sslkey are read again for each new connection of a running pool', async () => {
  const [serverA, serverB, clientA, clientB] = ['server-a', 'server-b', 'client-a', 'client-b'].map(selfSigned);
  const files = { ca: path.join(dir, 'root.crt'), cert: path.join(dir, 'client.crt'), key: path.join(dir, 'client.key') };
  fs.writeFileSync(files.ca, serverA.cert);
  fs.writeFileSync(files.cert, clientA.cert);
  fs.writeFileSync(files.key, clientA.key);
  const url = `postgres://broker@127.0.0.1:${port}/broker?sslmode=verify-full&sslrootcert=${files.ca}&sslcert=${files.cert}&sslkey=${files.key}`;
  const config = connectionConfig(url, { connectionTimeoutMillis: 2000 });
  assert.equal(Object.keys(config.ssl as object).includes('key'), false, 'the key is not enumerable, as pg keeps it');
  const pool = new pg.Pool(config);
  pool.on('error', () => undefined);
  try {
    serverCert = serverA;
    assert.deepEqual(await attempt(pool), { handshake: true, clientCert: 'CN=client-a' }, 'the files as they were at start');

    // The server's certificate changes before the root file does: refused, as verify-full must.
    serverCert = serverB;
    assert.equal((await attempt(pool)).handshake, false);

    // Both rotated on disk: the same pool trusts the new root and presents the new client pair.
    fs.writeFileSync(files.ca, serverB.cert);
    fs.writeFileSync(files.cert, clientB.cert);
    fs.writeFileSync(files.key, clientB.key);
    assert.deepEqual(await attempt(pool), { handshake: true, clientCert: 'CN=client-b' });

    // Files missing for a moment (a rotation that is not one rename): the last contents read are
    // used. pg reads them in a socket handler, where a throw would have ended the process.
    for (const file of Object.values(files)) fs.rmSync(file);
    assert.deepEqual(await attempt(pool), { handshake: true, clientCert: 'CN=client-b' });
  } finally {
    await pool.end();
  }
});
