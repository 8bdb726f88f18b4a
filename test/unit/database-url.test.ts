import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { describeDatabase } from '../../src/database-url.js';
import { env, rejects, SECRET } from './config-env.js';
import pg from 'pg';
import { clientConfigForDatabase } from '../../src/leases/per-database-handover.js';
import { connectionConfig } from '../../src/postgres/pool.js';

test('the reaper reaches other databases with the broker\'s settings, socket URLs included', () => {
  const tcp = clientConfigForDatabase('postgres://broker:p%40ss%2Fw@db.example:6543/broker', 'otherdb');
  assert.deepEqual({ host: tcp.host, port: tcp.port, user: tcp.user, password: tcp.password, database: tcp.database },
    { host: 'db.example', port: 6543, user: 'broker', password: 'p@ss/w', database: 'otherdb' });
  // libpq's socket form, which DATABASE_URL accepts and WHATWG URL refuses.
  const url = 'postgres://broker@/broker?host=/run/postgresql';
  assert.throws(() => new URL(url));
  assert.equal(loadConfig({ DATABASE_URL: url, BROKER_ISSUERS: 'https://issuer.example', BROKER_AUDIENCE: 'pg-broker', BROKER_PUBLIC_PG_HOST: 'db.example' }).databaseUrl, url);
  const socket = clientConfigForDatabase(url, 'app db');
  assert.deepEqual({ host: socket.host, user: socket.user, database: socket.database }, { host: '/run/postgresql', user: 'broker', database: 'app db' });
});

test('start-up names where DATABASE_URL points, and keeps its password out of error texts', () => {
  const tcp = describeDatabase('postgres://broker:p%40ss%2Fw@db.example:6543/broker');
  assert.equal(tcp.address, 'db.example:6543');
  assert.equal(tcp.label, 'user broker at db.example:6543, database broker');
  assert.equal(tcp.withoutPassword('said p@ss/w and p%40ss%2Fw'), 'said [REDACTED] and [REDACTED]');
  assert.equal(describeDatabase('postgres://u@[2001:db8::5]/app').address, '[2001:db8::5]:5432');
  // ?user= wins over the user part, as in pg.
  assert.equal(describeDatabase('postgres://u@h/app?user=other').label, 'user other at h:5432, database app');
  assert.equal(describeDatabase('postgres://h').label, 'user (the default) at h:5432, database (the default)');
  for (const url of ['postgres://broker@/broker?host=/run/postgresql&port=5433', 'postgres://broker@%2Frun%2Fpostgresql:5433/broker']) {
    assert.equal(describeDatabase(url).address, '/run/postgresql/.s.PGSQL.5433', url);
  }
  assert.equal(describeDatabase('postgres://u@h/db').withoutPassword('nothing to hide'), 'nothing to hide');
  // A short password is cut out where it stands alone, not out of the words that hold it.
  const short = describeDatabase('postgres://u:p@h/db');
  assert.equal(short.withoutPassword("could not open '/nonexistent' for postgres://u:p@h/db, password \"p\""), "could not open '/nonexistent' for postgres://u:[REDACTED]@h/db, password \"[REDACTED]\"");
  assert.equal(describeDatabase('postgres://u:a.b*c@h/db').withoutPassword('a.b*c axbxc a.b*cd'), '[REDACTED] axbxc a.b*cd');
  assert.equal(describeDatabase('postgres://u:-pw-@h/db').withoutPassword('x-pw-y'), 'x[REDACTED]y');
  // A word is letters and digits of any script, and _.
  assert.equal(short.withoutPassword('p_x ép p.'), 'p_x ép [REDACTED].');
});

describe('loadConfig: what DATABASE_URL may be', () => {
  test('DATABASE_URL: a port out of range or several hosts are said as such, never quoting the URL', () => {
    const PORT = 'DATABASE_URL: its port must be a whole number from 1 to 65535';
    const SEVERAL = 'DATABASE_URL: names several hosts, but the broker connects to one: give the primary\'s address, or one in front of the cluster';
    const cases: Array<[string, string]> = [
      [`postgres://broker:${SECRET}@db:99999/broker`, PORT],
      [`postgres://broker:${SECRET}@[2001:db8::5]:99999/broker`, PORT],
      [`postgres://broker:${SECRET}@db/broker?port=99999`, PORT],
      [`postgres://broker:${SECRET}@db1:5432,db2:5432/broker`, SEVERAL],
      [`postgres://broker:${SECRET}@db1,db2/broker`, SEVERAL],
      [`postgres://broker:${SECRET}@/broker?host=db1,db2`, SEVERAL],
      // An unescaped / in the password ends the authority early: what follows is no host or port.
      ['postgres://broker:s3cr3t/pw:1@db/broker', 'DATABASE_URL: is not a valid URL: a / ? # @ : or % in the user or password, and an @ anywhere after the host, must be percent-encoded'],
      ['postgres://broker:s3#cr3t@db/broker', 'DATABASE_URL: is not a valid URL: a / ? # @ : or % in the user or password, and an @ anywhere after the host, must be percent-encoded'],
      // ...and when the part before the / looks like host:port, the URL parses: the user would be
      // taken for the host, and the rest of the password printed as the database.
      ['postgres://broker:4711/Zx9@db.internal:5432/broker', 'DATABASE_URL: is not a valid URL: a / ? # @ : or % in the user or password, and an @ anywhere after the host, must be percent-encoded'],
      ['postgres://broker:4711?Zx9@db.internal:5432/broker', 'DATABASE_URL: is not a valid URL: a / ? # @ : or % in the user or password, and an @ anywhere after the host, must be percent-encoded'],
      ['postgres://broker:4711#Zx9@db.internal:5432/broker', 'DATABASE_URL: is not a valid URL: a / ? # @ : or % in the user or password, and an @ anywhere after the host, must be percent-encoded'],
    ];
    for (const [url, message] of cases) assert.equal(rejects({ DATABASE_URL: url }, 'DATABASE_URL').message, message, url);
    // The password part never shows, whatever it holds; each of these is refused but one, which
    // is a valid URL ('a,b' needs no encoding).
    for (const [secret, refused] of [['s3cr3t/pw', true], ['pw#99999', true], ['a,b', false], ['4711/Zx9', true], ['4711?Zx9', true]] as const) {
      let caught: unknown;
      try {
        loadConfig(env({ DATABASE_URL: `postgres://broker:${secret}@db:1/broker` }));
      } catch (err) {
        caught = err;
      }
      assert.equal(caught !== undefined, refused, secret);
      if (caught) assert.ok(!(caught as Error).message.includes(secret), (caught as Error).message);
    }
    assert.equal(loadConfig(env({ DATABASE_URL: `postgres://broker:${SECRET}@db:65535/broker` })).publicPgPort, 65535);
    assert.equal(loadConfig(env({ DATABASE_URL: `postgres://broker:${encodeURIComponent('s3cr3t/pw#,@')}@db:1/broker` })).publicPgPort, 1);
  });

  test('DATABASE_URL through a Unix socket, with BROKER_PUBLIC_PG_HOST saying where clients go', () => {
    for (const url of [
      `postgres://broker:${SECRET}@/broker?host=/var/run/postgresql`,
      // The same directory percent-encoded in the host part, as pg also reads it.
      `postgres://broker:${SECRET}@%2Fvar%2Frun%2Fpostgresql/broker`,
      'postgresql://broker@%2frun%2fpostgresql:5433/broker',
    ]) {
      const c = loadConfig(env({ DATABASE_URL: url, BROKER_PUBLIC_PG_HOST: 'db.example.com' }));
      assert.equal(c.databaseUrl, url);
      assert.equal(c.publicPgHost, 'db.example.com');
    }
  });

  test('a Unix-socket DATABASE_URL needs BROKER_PUBLIC_PG_HOST: a socket directory is no address for clients', () => {
    for (const url of [
      `postgres://broker:${SECRET}@/broker?host=/run/postgresql`,
      `postgres://broker:${SECRET}@%2Frun%2Fpostgresql/broker`,
      `postgres://broker:${SECRET}@localhost/broker?host=/run/postgresql`,
    ]) {
      rejects({ DATABASE_URL: url }, 'BROKER_PUBLIC_PG_HOST', /is required when DATABASE_URL connects through a Unix socket/);
    }
  });
});

test('the broker reads DATABASE_URL as pg does, adding only its search_path to the options', () => {
  const cases = [
    'postgres://broker:p%40ss%2Fw@db.example:6543/broker',
    'postgres://broker@/broker?host=/run/postgresql',
    'postgres://broker@db.example/broker?sslmode=verify-full',
    'postgres://broker@db.example/broker?ssl=no-verify',
    'postgres://broker@db.example/broker?ssl=true&application_name=mine&connect_timeout=7',
    'postgres://broker@db.example/broker?options=-c%20work_mem%3D5MB',
  ];
  const fields = ['host', 'port', 'user', 'password', 'database', 'ssl', 'application_name', 'connect_timeout'] as const;
  const seen = (config: pg.ClientConfig) => {
    const p = (new pg.Client(config) as unknown as { connectionParameters: Record<string, unknown> }).connectionParameters;
    return Object.fromEntries(fields.map((f) => [f, p[f]]));
  };
  for (const url of cases) {
    const mine = connectionConfig(url, { application_name: 'pg-credential-broker' });
    const theirs = seen({ connectionString: url, application_name: 'pg-credential-broker' });
    assert.deepEqual(seen(mine), theirs, url);
    assert.equal(mine.options, url.includes('options=') ? '-c work_mem=5MB -c search_path=pg_catalog,pg_temp -c datestyle=ISO' : '-c search_path=pg_catalog,pg_temp -c datestyle=ISO', url);
  }
  assert.equal(connectionConfig(cases[4]).application_name, 'mine', 'the URL\'s own settings win, as in pg');
  // A query key that is no connection setting sizes no pool, as in pg.
  const pool = connectionConfig('postgres://broker@db.example/broker?max=1&idleTimeoutMillis=0&connectionTimeoutMillis=0', { max: 10, idleTimeoutMillis: 30_000, connectionTimeoutMillis: 5000 });
  assert.deepEqual([pool.max, pool.idleTimeoutMillis, pool.connectionTimeoutMillis], [10, 30_000, 5000]);
  assert.equal(connectionConfig(cases[0], {}, 'otherdb').database, 'otherdb');
  const saved = process.env.PGOPTIONS;
  process.env.PGOPTIONS = '-c geqo=off';
  try {
    assert.equal(connectionConfig(cases[0]).options, '-c geqo=off -c search_path=pg_catalog,pg_temp -c datestyle=ISO', 'PGOPTIONS is kept when the URL has none');
    assert.equal(connectionConfig(cases[5]).options, '-c work_mem=5MB -c search_path=pg_catalog,pg_temp -c datestyle=ISO', 'the URL\'s options win over PGOPTIONS, as in pg');
    assert.equal(connectionConfig(`${cases[0]}?options=`).options, '-c geqo=off -c search_path=pg_catalog,pg_temp -c datestyle=ISO', 'an empty options leaves PGOPTIONS, as in pg');
  } finally {
    if (saved === undefined) delete process.env.PGOPTIONS;
    else process.env.PGOPTIONS = saved;
  }
});
