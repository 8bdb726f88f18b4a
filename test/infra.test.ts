import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import pg from 'pg';
import { createRemoteJWKSet, decodeProtectedHeader, jwtVerify } from 'jose';
import { startLocalPostgres } from '../src/dev/embedded-postgres.js';
import { addGroupRole, startPostgres, waitForLog, type TestPostgres } from './helpers/postgres.js';
import { startCountingServer, startIssuer, unsignedToken } from './helpers/issuer.js';

async function connect(url: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined); // a terminated session must not crash the test process
  await client.connect();
  return client;
}

async function loginError(url: string): Promise<string | undefined> {
  const client = new pg.Client({ connectionString: url });
  client.on('error', () => undefined);
  try {
    await client.connect();
    await client.end();
    return undefined;
  } catch (e) {
    return (e as { code?: string }).code;
  }
}

/** The checks every flavor must pass: roles, grants, auth and logging are what the broker tests rely on. */
async function basicChecks(db: TestPostgres): Promise<void> {
  const broker = await connect(db.brokerUrl);
  try {
    const { rows } = await broker.query('SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user');
    assert.deepEqual(rows, [{ rolsuper: false, rolcreaterole: true }]);
    // The broker must be able to hand out the groups: this is what ADMIN OPTION (16+) is for.
    await addGroupRole(db, 'app_extra');
    await broker.query("CREATE ROLE infra_lease LOGIN PASSWORD 'lease-pw-1' IN ROLE app_readers, app_extra");
  } finally {
    await broker.end();
  }

  const rows = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM public.widgets');
  assert.equal(rows[0].n, 3);
  const lease = await connect(`postgres://infra_lease:lease-pw-1@${db.host}:${db.port}/${db.database}`);
  assert.equal((await lease.query('SELECT name FROM public.widgets WHERE id = 1')).rows[0].name, 'sprocket');
  await lease.end();

  const wrong = db.brokerUrl.replace(/:[^:@/]+@/, ':definitely-wrong@');
  assert.equal(await loginError(wrong), '28P01');
  await waitForLog(db, /password authentication failed for user "broker"/);

  await db.query("SELECT 'infra-marker-42' AS marker", [], 'otherdb');
  assert.match(await waitForLog(db, "infra-marker-42"), /postgres@otherdb .*statement: SELECT 'infra-marker-42'/);
  // Setup ran with log_statement=none, so the broker's plaintext password never reaches the log.
  const brokerPw = new URL(db.brokerUrl).password;
  assert.ok(!db.logLines().some((l) => l.includes(brokerPw)), 'broker password leaked into server log');
}

test('embedded postgres: non-superuser broker, fixtures, auth, logs, restart', async (t) => {
  const started = Date.now();
  const db = await startPostgres();
  t.diagnostic(`startPostgres() took ${Date.now() - started} ms (PostgreSQL ${db.version}, port ${db.port})`);
  t.after(() => db.stop());
  assert.ok(db.version >= 16, `expected PostgreSQL 16+, got ${db.version}`);
  await basicChecks(db);

  const victim = await connect(db.brokerUrl);
  const killed = new Promise((resolve) => victim.once('error', resolve));
  await db.restart();
  await killed; // sessions do not survive an outage
  assert.equal((await db.query<{ n: number }>('SELECT count(*)::int AS n FROM public.widgets'))[0].n, 3);
  await victim.end().catch(() => undefined);
});

test('pg15 flavor (Debian binaries)', async (t) => {
  if (!fs.existsSync('/usr/lib/postgresql/15/bin/initdb')) {
    t.skip('/usr/lib/postgresql/15/bin/initdb not installed (apt-get install postgresql-15)');
    return;
  }
  const db = await startPostgres({ flavor: 'pg15' });
  t.after(() => db.stop());
  assert.equal(db.version, 15);
  await basicChecks(db);
});

test('startLocalPostgres: a persistent dir survives restarts and a killed server; a taken port fails clearly', async (t) => {
  // mkdtemp is mode 700, so as root the postgres user cannot reach it: this also covers the relocation.
  const parent = fs.mkdtempSync(path.join(os.tmpdir(), 'pgcb-infra-'));
  const dir = path.join(parent, 'project', '.pg-broker', 'postgres');
  const cleanup: string[] = [parent];
  t.after(() => { for (const d of cleanup) fs.rmSync(d, { recursive: true, force: true }); });
  const select = async (url: string, sql: string) => {
    const client = await connect(url);
    try { return (await client.query(sql)).rows; } finally { await client.end(); }
  };

  const first = await startLocalPostgres({ dir });
  cleanup.push(path.dirname(first.dataDir));
  assert.equal(first.relocated, process.getuid?.() === 0);
  assert.equal(path.basename(first.dataDir), 'data');
  await select(first.superuserUrl(), "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')");
  const settings = await select(first.superuserUrl(), "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'log_statement', 'unix_socket_directories')");
  assert.deepEqual(Object.fromEntries(settings.map((r) => [r.name, r.setting])), { fsync: 'on', log_statement: 'none', unix_socket_directories: '' });
  // A second stop() made while the first runs returns only once the server is down, as the first does.
  const stops = [first.stop(), first.stop()];
  await stops[1];
  assert.equal(fs.existsSync(path.join(first.dataDir, 'postmaster.pid')), false, 'the server has shut down when a second stop() returns');
  await stops[0];
  assert.ok(fs.existsSync(path.join(first.dataDir, 'PG_VERSION')), 'stop() must keep a persistent cluster');

  const second = await startLocalPostgres({ dir });
  assert.equal(second.dataDir, first.dataDir);
  assert.equal(second.superuserPassword, first.superuserPassword);
  // A server that dies without shutting down leaves postmaster.pid behind.
  const pid = Number(fs.readFileSync(path.join(second.dataDir, 'postmaster.pid'), 'utf8').split('\n')[0]);
  process.kill(pid, 'SIGKILL');
  const running = () => { try { process.kill(pid, 0); return true; } catch { return false; } };
  while (running()) await new Promise((r) => setTimeout(r, 20));
  await second.stop();
  assert.ok(fs.existsSync(path.join(second.dataDir, 'postmaster.pid')));

  const blocker = net.createServer().listen(0, '127.0.0.1');
  await once(blocker, 'listening');
  t.after(() => blocker.close());
  const taken = (blocker.address() as net.AddressInfo).port;
  await assert.rejects(startLocalPostgres({ dir, port: taken }), new RegExp(`port ${taken} on 127.0.0.1 is already in use`));

  const third = await startLocalPostgres({ dir });
  t.after(() => third.stop());
  assert.deepEqual(await select(third.superuserUrl(), 'SELECT v FROM kept'), [{ v: 'survives' }]);
});

test('issuer: signs tokens that verify against its JWKS, and records fetches', async (t) => {
  const issuer = await startIssuer();
  t.after(() => issuer.close());
  const jwks = createRemoteJWKSet(new URL(issuer.jwksUri));

  const rs = await issuer.sign({ sub: 'alice', aud: 'broker' });
  const { payload, protectedHeader } = await jwtVerify(rs, jwks, { issuer: issuer.issuer, audience: 'broker' });
  assert.equal(payload.sub, 'alice');
  assert.equal(protectedHeader.alg, 'RS256');
  assert.deepEqual(issuer.requests, ['/jwks']);

  const es = await issuer.sign({ sub: 'bob' }, { alg: 'ES256' });
  assert.equal((await jwtVerify(es, jwks)).protectedHeader.alg, 'ES256');

  const discovery = (await (await fetch(`${issuer.issuer}/.well-known/openid-configuration`)).json()) as Record<string, unknown>;
  assert.equal(discovery.issuer, issuer.issuer);
  assert.equal(discovery.jwks_uri, issuer.jwksUri);

  // A rotated-out key is no longer published, but can still sign (for "unknown kid" tests).
  const old = decodeProtectedHeader(rs).kid!;
  const fresh = await issuer.addKey();
  issuer.removeKey(old);
  const keys = ((await (await fetch(issuer.jwksUri)).json()) as { keys: { kid: string }[] }).keys.map((k) => k.kid);
  assert.ok(keys.includes(fresh) && !keys.includes(old));
  assert.equal(decodeProtectedHeader(await issuer.sign({}, { kid: old })).kid, old);

  issuer.mode = 'down';
  assert.equal((await fetch(issuer.jwksUri)).status, 503);
  issuer.mode = 'hang';
  const hung = fetch(issuer.jwksUri).catch((e: Error) => e); // close() must end it
  await new Promise((r) => setTimeout(r, 50));

  // The attack tests' alg=none token: a JOSE header and payload as given, and no signature.
  const none = unsignedToken({ alg: 'none' }, { sub: 'mallory' });
  const [noneHeader, nonePayload, noneSignature] = none.split('.');
  assert.deepEqual(decodeProtectedHeader(none), { alg: 'none' });
  assert.deepEqual(JSON.parse(Buffer.from(nonePayload, 'base64url').toString()), { sub: 'mallory' });
  assert.deepEqual([noneHeader.length > 0, noneSignature], [true, '']);

  const counting = await startCountingServer();
  assert.equal((await fetch(`${counting.url}/jwks`)).status, 200);
  assert.deepEqual(counting.requests, ['/jwks']);
  await counting.close();
  await issuer.close();
  assert.ok((await hung) instanceof Error);
});
