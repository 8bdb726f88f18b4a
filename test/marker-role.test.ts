import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { createLogger } from '../src/logger.js';
import pg from 'pg';
import { claimMarker } from '../src/postgres/marker.js';
import { migrate } from '../src/postgres/migrate.js';
import { roleExists, startTestBroker, type TestBroker } from './helpers/broker.js';

// A marker role is cluster-wide; each deployment's orphan sweep drops its members that have no
// lease in that deployment's database. These tests cover the claim that keeps two deployments
// in different databases from sharing one (src/postgres/marker.ts).
let b: TestBroker;

before(async () => {
  b = await startTestBroker();
});
after(async () => b?.close());

describe('one marker role per deployment', () => {
  const claimOf = async (role: string) =>
    (await b.pg.query(`SELECT shobj_description(oid, 'pg_authid') AS c FROM pg_roles WHERE rolname = $1`, [role]))[0]?.c as string | undefined;
  const sweep = async () => (await b.reaper.reap()).orphans;

  test('a deployment in another database is refused the marker role another claimed, before it records anything', async () => {
    await b.pg.query('CREATE DATABASE broker3 OWNER broker', [], 'postgres');
    const third = b.config.databaseUrl.replace(/\/broker$/, '/broker3');
    const logger = createLogger('silent');
    assert.equal(await claimOf('credential_broker_managed'), 'pg-credential-broker: marker role of the deployment in database "broker"');
    await assert.rejects(migrate(third, 'credential_broker_managed', logger),
      /BROKER_MANAGED_ROLE credential_broker_managed belongs to the deployment in database "broker": give each deployment its own BROKER_MANAGED_ROLE/);
    assert.deepEqual(await b.pg.query('SELECT managed_role FROM broker.deployment', [], 'broker3'), [], 'the schema was not bound to it');
    // With a marker role of its own it migrates, binds and claims as usual.
    await migrate(third, 'third_broker_managed', logger);
    assert.deepEqual(await b.pg.query('SELECT managed_role FROM broker.deployment', [], 'broker3'), [{ managed_role: 'third_broker_managed' }]);
    assert.equal(await claimOf('third_broker_managed'), 'pg-credential-broker: marker role of the deployment in database "broker3"');
  });

  test('a broker role that can neither create nor claim the marker role is told what it needs', async () => {
    await b.pg.query(`CREATE ROLE weak_broker LOGIN PASSWORD 'weak-pw'`, [], 'postgres');
    await b.pg.query('CREATE DATABASE broker4 OWNER weak_broker', [], 'postgres');
    const url = new URL(b.config.databaseUrl);
    Object.assign(url, { username: 'weak_broker', password: 'weak-pw', pathname: '/broker4' });
    const logger = createLogger('silent');
    await assert.rejects(migrate(url.href, 'fourth_managed', logger),
      /^Error: cannot create the marker role fourth_managed \(BROKER_MANAGED_ROLE\): permission denied to create role.*; the broker's role needs CREATEROLE/);
    await b.pg.query('CREATE ROLE fourth_managed NOLOGIN', [], 'postgres');
    await assert.rejects(migrate(url.href, 'fourth_managed', logger),
      /^Error: cannot record this deployment on its marker role fourth_managed \(BROKER_MANAGED_ROLE\): .*; the broker's role needs CREATEROLE, and on PostgreSQL 16\+ also fourth_managed granted to it WITH ADMIN OPTION/);
    // With what the messages ask for, it goes through.
    await b.pg.query('ALTER ROLE weak_broker CREATEROLE', [], 'postgres');
    await b.pg.query(`GRANT fourth_managed TO weak_broker WITH ADMIN OPTION`, [], 'postgres');
    await migrate(url.href, 'fourth_managed', logger);
    assert.equal(await claimOf('fourth_managed'), 'pg-credential-broker: marker role of the deployment in database "broker4"');
  });

  test('a sweep whose claim another database took drops nothing; a cleared claim is taken back', async () => {
    await b.app.db.query('CREATE ROLE claim_orphan LOGIN IN ROLE credential_broker_managed ROLE broker');
    await b.pg.query(`COMMENT ON ROLE credential_broker_managed IS 'pg-credential-broker: marker role of the deployment in database "elsewhere"'`, [], 'postgres');
    try {
      assert.equal(await sweep(), 0);
      assert.equal(await roleExists(b.pg, 'claim_orphan'), true, 'left alone: it may be the other deployment\'s live role');
      assert.ok(b.logs.some((l) => l.includes('orphan sweep skipped') && l.includes('database \\"elsewhere\\"')), 'the reason is logged');
    } finally {
      await b.pg.query('COMMENT ON ROLE credential_broker_managed IS NULL', [], 'postgres');
    }
    assert.equal(await sweep(), 1);
    assert.equal(await roleExists(b.pg, 'claim_orphan'), false);
    assert.equal(await claimOf('credential_broker_managed'), 'pg-credential-broker: marker role of the deployment in database "broker"');
  });
  test('claims made at the same moment from two databases: exactly one wins, and the other names it', async () => {
    for (const db of ['claim_a', 'claim_b']) await b.pg.query(`CREATE DATABASE ${db}`, [], 'postgres');
    const clients = await Promise.all(['claim_a', 'claim_b'].map(async (db) => {
      const c = new pg.Client({ connectionString: b.config.databaseUrl.replace(/\/broker$/, `/${db}`) });
      await c.connect();
      return c;
    }));
    try {
      for (let round = 0; round < 10; round++) {
        const role = `claim_race_${round}`;
        await b.pg.query(`CREATE ROLE ${role} NOLOGIN`, [], 'postgres');
        await b.pg.query(`GRANT ${role} TO broker WITH ADMIN OPTION`, [], 'postgres');
        const outcomes = await Promise.allSettled(clients.map((c) => claimMarker(c, role)));
        const won = outcomes.findIndex((o) => o.status === 'fulfilled');
        assert.deepEqual(outcomes.map((o) => o.status).sort(), ['fulfilled', 'rejected'], `round ${round}: ${outcomes.map((o) => o.status === 'rejected' ? String(o.reason) : 'ok').join(' | ')}`);
        const winner = ['claim_a', 'claim_b'][won];
        assert.match(String((outcomes[1 - won] as PromiseRejectedResult).reason), new RegExp(`belongs to the deployment in database "${winner}"`));
        assert.equal(await claimOf(role), `pg-credential-broker: marker role of the deployment in database "${winner}"`);
      }
    } finally {
      await Promise.all(clients.map((c) => c.end()));
    }
  });

  test('two first start-ups in two databases racing for one marker role: one claims it, the other is refused and left unbound', async () => {
    const logger = createLogger('silent');
    for (let round = 0; round < 5; round++) {
      const role = `race_managed_${round}`;
      const dbs = [`race_${round}_a`, `race_${round}_b`];
      for (const db of dbs) await b.pg.query(`CREATE DATABASE ${db} OWNER broker`, [], 'postgres');
      const urls = dbs.map((db) => b.config.databaseUrl.replace(/\/broker$/, `/${db}`));
      const outcomes = await Promise.allSettled(urls.map((url) => migrate(url, role, logger)));
      const won = outcomes.findIndex((o) => o.status === 'fulfilled');
      assert.deepEqual(outcomes.map((o) => o.status).sort(), ['fulfilled', 'rejected'], `round ${round}: ${outcomes.map((o) => o.status === 'rejected' ? String(o.reason) : 'ok').join(' | ')}`);
      const lost = outcomes[1 - won] as PromiseRejectedResult;
      assert.match(String(lost.reason), new RegExp(`BROKER_MANAGED_ROLE ${role} belongs to the deployment in database "${dbs[won]}"`));
      assert.equal(await claimOf(role), `pg-credential-broker: marker role of the deployment in database "${dbs[won]}"`);
      assert.deepEqual(await b.pg.query('SELECT managed_role FROM broker.deployment', [], dbs[1 - won]), [], 'the loser can start again with its own marker role');
      assert.deepEqual(await b.pg.query('SELECT managed_role FROM broker.deployment', [], dbs[won]), [{ managed_role: role }]);
    }
  });
});
