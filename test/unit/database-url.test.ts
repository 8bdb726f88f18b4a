import assert from 'node:assert/strict';
import { test } from 'node:test';
import { loadConfig } from '../../src/config.js';
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
