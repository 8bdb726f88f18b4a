import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { loadConfig } from '../src/config.js';
import { clientConfigForDatabase } from '../src/leases/per-database-handover.js';
import { createLogger } from '../src/logger.js';
import { startBroker } from '../src/server.js';
import { api, brokerEnv, connectAs, leaseRow, roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';

/**
 * An issued role that may create in a schema on a session's search_path can define a function
 * whose argument types match a call the broker makes more exactly than the built-in does, and
 * the broker would run it with its own rights (CVE-2018-1058's pattern). The test fixture leaves
 * `public` writable to everyone in both databases, as clusters from before PostgreSQL 15 do.
 */
let b: TestBroker;

before(async () => {
  b = await startTestBroker({ env: { BROKER_RATE_LIMIT_IP: '100000', BROKER_RATE_LIMIT_IDENTITY: '100000' } });
  await b.putPolicy('ci', { claims: { sub: 'repo:octo-org/*' } });
});
after(async () => b?.close());

/** SQL for a function `name(args)` in `schema` that records who ran it, then does what the built-in does. */
function trojan(schema: string, signature: string, returns: string, body: string): string {
  return `CREATE FUNCTION ${schema}.${signature} RETURNS ${returns} LANGUAGE plpgsql AS $f$
    BEGIN INSERT INTO public.trojan_ran VALUES (current_user); ${body} END $f$`;
}

describe('functions an issued role plants under built-in names', () => {
  test('never run in the broker\'s place, in issuance or in teardown; the teardown still hands the role\'s schema over', async () => {
    for (const database of ['broker', 'otherdb']) {
      await b.pg.query('CREATE TABLE public.trojan_ran (who text); GRANT INSERT ON public.trojan_ran TO PUBLIC', [], database);
    }
    const token = await b.token({ sub: 'repo:octo-org/planter:ref:refs/heads/main' });
    const cred = (await b.issue(token)).body;
    // In the broker's database, where every issuance calls hashtextextended(text, 0).
    const here = await connectAs(b.pg, cred);
    await here.query(trojan('public', 'hashtextextended(text, integer)', 'bigint', 'RETURN pg_catalog.hashtextextended($1, $2::bigint);'));
    await here.end();
    // In another database, where owning a schema makes teardown hand it over with format().
    // "$user", the default path's first entry, is the creator role (16+) or the broker (15):
    // names anyone can read from pg_roles.
    const there = await connectAs(b.pg, { ...cred, database: 'otherdb' });
    await there.query('CREATE SCHEMA bait');
    const actors = (await there.query<{ rolname: string }>(`SELECT rolname FROM pg_roles WHERE rolname LIKE '%\\_managed\\_c%' OR rolname = 'broker'`)).rows.map((r) => r.rolname);
    assert.ok(actors.includes('broker'), actors.join());
    for (const schema of ['public', ...actors.map((a) => `"${a}"`)]) {
      if (schema !== 'public') await there.query(`CREATE SCHEMA ${schema}; GRANT USAGE ON SCHEMA ${schema} TO PUBLIC`);
      await there.query(trojan(schema, 'format(text, name, text)', 'text', 'RETURN pg_catalog.format($1, $2, $3);'));
    }
    await there.end();

    assert.equal((await b.issue(await b.token({ sub: 'repo:octo-org/victim:ref:refs/heads/main' }))).status, 201);
    const revoked = await api(b, 'DELETE', `/leases/${cred.lease_id}`, token);
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    assert.equal((await leaseRow(b.pg, cred.lease_id)).state, 'revoked');
    assert.equal(await roleExists(b.pg, cred.username), false);
    const [{ owner }] = await b.pg.query(`SELECT nspowner::regrole::text AS owner FROM pg_namespace WHERE nspname = 'bait'`, [], 'otherdb');
    assert.equal(owner, 'app_readers', 'the teardown handed the schema over');
    for (const database of ['broker', 'otherdb']) {
      assert.deepEqual(await b.pg.query('SELECT who FROM public.trojan_ran', [], database), [], `nothing ran in ${database}`);
    }
    // The planted functions are real: called as the broker used to call them, on the default path, they run.
    await b.pg.query(`SELECT hashtextextended('k', 0)`);
    await b.pg.query(`SELECT format('%I', 'x'::name, 'y')`, [], 'otherdb');
    for (const database of ['broker', 'otherdb']) {
      assert.equal((await b.pg.query('SELECT who FROM public.trojan_ran', [], database)).length, 1, `the default search_path finds the planted function in ${database}`);
    }
  });

  test('every connection the broker opens searches pg_catalog alone, whatever the URL\'s own options say', async () => {
    const [{ search_path }] = (await b.app.db.query('SHOW search_path')).rows;
    assert.equal(search_path, 'pg_catalog,pg_temp');
    const url = new URL(b.pg.brokerUrl);
    url.searchParams.set('options', '-c search_path=public -c work_mem=5MB');
    const client = new pg.Client(clientConfigForDatabase(url.href, 'otherdb'));
    await client.connect();
    try {
      const { rows: [row] } = await client.query(`SELECT current_setting('search_path') AS path, current_setting('work_mem') AS mem, current_database() AS db`);
      assert.deepEqual(row, { path: 'pg_catalog,pg_temp', mem: '5MB', db: 'otherdb' }, 'the URL\'s other options still apply');
    } finally {
      await client.end();
    }
  });

  test('a broker whose sessions search anything else (a pooler dropped the option) refuses to start, saying why', async () => {
    const config = loadConfig(brokerEnv(b.pg, b.issuer, { HOST: '127.0.0.1', PORT: '0' }));
    const logger = createLogger('silent');
    const plain = new pg.Pool({ connectionString: b.pg.brokerUrl, max: 2 });
    try {
      await assert.rejects(startBroker(config, { logger, pool: plain, migrate: false }),
        /sessions search ""\$user", public", not "pg_catalog, pg_temp".*track_extra_parameters/);
    } finally {
      await plain.end();
    }
    const served = await startBroker(config, { logger, migrate: false });
    await served.close();
  });

  test('a DBA\'s datestyle for the broker\'s role changes nothing: its sessions read timestamps as ISO', async () => {
    await b.pg.query(`ALTER ROLE broker SET datestyle = 'SQL, DMY'`);
    // Only sessions opened from now on take it: a broker of its own.
    const fresh = await startTestBroker({ pg: b.pg, issuer: b.issuer });
    try {
      const [{ DateStyle }] = (await fresh.app.db.query('SHOW datestyle')).rows;
      assert.equal(DateStyle.split(',')[0].trim(), 'ISO');
      const token = await fresh.token({ sub: 'repo:octo-org/datestyle' });
      const issued = await fresh.issue(token, { ttl: 60 });
      assert.equal(issued.status, 201, JSON.stringify(issued.body));
      const renewed = await api(fresh, 'POST', `/leases/${issued.body.lease_id}/renew`, token, { ttl: 120 });
      assert.equal(renewed.status, 200, JSON.stringify(renewed.body));
      const [role] = await b.pg.query<{ until: Date }>('SELECT rolvaliduntil AS until FROM pg_roles WHERE rolname = $1', [issued.body.username]);
      assert.equal(role.until.toISOString(), renewed.body.expires_at);
    } finally {
      await fresh.close();
      await b.pg.query('ALTER ROLE broker RESET datestyle');
    }
  });
});
