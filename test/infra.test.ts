import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import pg from 'pg';
import { createRemoteJWKSet, decodeProtectedHeader, jwtVerify } from 'jose';
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

  const discovery = await (await fetch(`${issuer.issuer}/.well-known/openid-configuration`)).json();
  assert.deepEqual({ ...discovery, id_token_signing_alg_values_supported: undefined },
    { issuer: issuer.issuer, jwks_uri: issuer.jwksUri, id_token_signing_alg_values_supported: undefined });

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

  const none = unsignedToken({ alg: 'none' }, { sub: 'mallory' });
  assert.equal(none.split('.').length, 3);
  assert.ok(none.endsWith('.'));

  const counting = await startCountingServer();
  assert.equal((await fetch(`${counting.url}/jwks`)).status, 200);
  assert.deepEqual(counting.requests, ['/jwks']);
  await counting.close();
  await issuer.close();
  assert.ok((await hung) instanceof Error);
});
