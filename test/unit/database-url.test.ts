import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { describeDatabase } from '../../src/database-url.js';
import { clientConfigForDatabase } from '../../src/leases/per-database-handover.js';

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
});
