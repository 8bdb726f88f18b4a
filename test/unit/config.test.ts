import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { audienceFor, ConfigError, loadConfig, managedRoleFrom } from '../../src/config.js';
import { env, GOOD, rejects, SECRET } from './config-env.js';

describe('loadConfig: good values', () => {
  test('minimal environment: defaults, and the public host/port come from DATABASE_URL', () => {
    const c = loadConfig(env({}));
    assert.equal(c.databaseUrl, GOOD.DATABASE_URL);
    assert.deepEqual(c.issuers, [{ issuer: 'https://token.actions.githubusercontent.com' }]);
    assert.equal(c.audience, 'pg-broker');
    assert.deepEqual(c.admins, []);
    assert.equal(c.publicPgHost, 'db.internal');
    assert.equal(c.publicPgPort, 5433);
    assert.equal(c.reaperIntervalSeconds, 10);
    assert.equal(c.grantRecheckSeconds, 60);
    assert.equal(c.managedRole, 'credential_broker_managed');
    assert.equal(c.metricsPort, undefined);
    assert.ok(!('metricsPort' in c));
    assert.equal(c.rateLimitIp, 600);
    assert.equal(c.rateLimitIdentity, 120);
    assert.equal(c.dbPoolSize, 10);
    assert.equal(c.lockTimeoutSeconds, 10);
    assert.equal(c.queryTimeoutSeconds, 30);
    assert.equal(c.host, '0.0.0.0');
    assert.equal(c.port, 8080);
    assert.equal(c.logLevel, 'info');
  });

  test('DATABASE_URL without a port means 5432; postgresql:// works; an IPv6 host loses its brackets', () => {
    assert.equal(loadConfig(env({ DATABASE_URL: 'postgresql://broker@db/broker' })).publicPgPort, 5432);
    const v6 = loadConfig(env({ DATABASE_URL: `postgres://broker:${SECRET}@[::1]:6543/broker` }));
    assert.equal(v6.publicPgHost, '::1');
    assert.equal(v6.publicPgPort, 6543);
  });

  test('DATABASE_URL with the host in the query string (libpq style)', () => {
    assert.equal(loadConfig(env({ DATABASE_URL: 'postgres://broker@/broker?host=db.example.com' })).publicPgHost, 'db.example.com');
    // No host at all is pg's default: localhost over TCP.
    assert.equal(loadConfig(env({ DATABASE_URL: 'postgres://broker@/broker' })).publicPgHost, 'localhost');
  });

  test('comma-list BROKER_ISSUERS (discovery) with spaces and an empty item', () => {
    const c = loadConfig(env({ BROKER_ISSUERS: ' https://a.example , https://b.example/realms/x,, ' }));
    assert.deepEqual(c.issuers, [{ issuer: 'https://a.example' }, { issuer: 'https://b.example/realms/x' }]);
  });

  test('JSON BROKER_ISSUERS with jwks_uri and a per-issuer audience', () => {
    const issuers = [
      { issuer: 'https://a.example', jwks_uri: 'https://keys.a.example/jwks.json?x=1' },
      { issuer: 'https://b.example', audience: 'b-aud' },
    ];
    const c = loadConfig(env({ BROKER_ISSUERS: JSON.stringify(issuers) }));
    assert.deepEqual(c.issuers, issuers);
    assert.equal(audienceFor(c, 'https://a.example'), 'pg-broker');
    assert.equal(audienceFor(c, 'https://b.example'), 'b-aud');
  });

  test('BROKER_ADMINS, overrides and explicit values parse', () => {
    const c = loadConfig(env({
      BROKER_ADMINS: JSON.stringify([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: 'repo:org/admin:*', '/groups/0': ['dba', 'sre'] } }]),
      BROKER_PUBLIC_PG_HOST: 'pg.example.com',
      BROKER_PUBLIC_PG_PORT: '6432',
      BROKER_REAPER_INTERVAL: '3',
      BROKER_GRANT_RECHECK_INTERVAL: '0',
      BROKER_MANAGED_ROLE: 'broker_prod_managed',
      BROKER_METRICS_PORT: '9464',
      BROKER_RATE_LIMIT_IP: '50',
      BROKER_RATE_LIMIT_IDENTITY: '5',
      BROKER_DB_POOL_SIZE: '4',
      BROKER_LOCK_TIMEOUT: '0',
      BROKER_QUERY_TIMEOUT: '5',
      HOST: '127.0.0.1',
      PORT: ' 9000 ',
      LOG_LEVEL: 'debug',
    }));
    assert.equal(c.admins.length, 1);
    assert.deepEqual(c.admins[0].claims['/groups/0'], ['dba', 'sre']);
    assert.equal(c.publicPgHost, 'pg.example.com');
    assert.equal(c.publicPgPort, 6432);
    assert.equal(c.reaperIntervalSeconds, 3);
    assert.equal(c.grantRecheckSeconds, 0);
    assert.equal(c.managedRole, 'broker_prod_managed');
    assert.equal(c.metricsPort, 9464);
    assert.equal(c.rateLimitIp, 50);
    assert.equal(c.rateLimitIdentity, 5);
    assert.equal(c.dbPoolSize, 4);
    assert.equal(c.lockTimeoutSeconds, 0, '0 turns the bound off');
    assert.equal(c.queryTimeoutSeconds, 5, 'any query timeout goes with unbounded lock waits');
    assert.equal(c.host, '127.0.0.1');
    assert.equal(c.port, 9000);
    assert.equal(c.logLevel, 'debug');
  });

  test('BROKER_PUBLIC_PG_HOST: a name, localhost, IPv4 or IPv6 (brackets dropped) is what clients get', () => {
    const host = (value: string) => loadConfig(env({ BROKER_PUBLIC_PG_HOST: value })).publicPgHost;
    assert.equal(host('db.example.com'), 'db.example.com');
    assert.equal(host(' pg-1.eu-west.example.internal '), 'pg-1.eu-west.example.internal');
    assert.equal(host('localhost'), 'localhost');
    assert.equal(host('203.0.113.7'), '203.0.113.7');
    assert.equal(host('2001:db8::5'), '2001:db8::5');
    assert.equal(host('::1'), '::1');
    assert.equal(host('[2001:db8::5]'), '2001:db8::5');
    // A compose service name, and the same taken from DATABASE_URL.
    assert.equal(host('my_db'), 'my_db');
    // A fully qualified name ending in the root's dot, as given.
    assert.equal(host('db.example.com.'), 'db.example.com.');
    assert.equal(loadConfig(env({ DATABASE_URL: 'postgres://broker@pg.prod.svc.cluster.local.:5432/broker' })).publicPgHost, 'pg.prod.svc.cluster.local.');
    assert.equal(loadConfig(env({ DATABASE_URL: 'postgres://broker@pg_primary:5432/broker' })).publicPgHost, 'pg_primary');
  });

  test('LOG_LEVEL is case-insensitive', () => {
    assert.equal(loadConfig(env({ LOG_LEVEL: 'WARN' })).logLevel, 'warn');
  });
});

describe('loadConfig: every bad or missing setting names its variable', () => {
  test('DATABASE_URL missing, blank, not postgres, not a URL', () => {
    rejects({ DATABASE_URL: undefined }, 'DATABASE_URL', /required/);
    rejects({ DATABASE_URL: '   ' }, 'DATABASE_URL', /required/);
    rejects({ DATABASE_URL: `mysql://broker:${SECRET}@db/broker` }, 'DATABASE_URL');
    rejects({ DATABASE_URL: `postgres://broker:${SECRET}@db:notaport/broker` }, 'DATABASE_URL');
    rejects({ DATABASE_URL: 'db.internal:5432' }, 'DATABASE_URL');
  });

  test('BROKER_ISSUERS missing, bad JSON, not a list, empty, bad URL, unknown field, duplicate', () => {
    rejects({ BROKER_ISSUERS: undefined }, 'BROKER_ISSUERS', /required/);
    rejects({ BROKER_ISSUERS: '[{"issuer": "https://a.example",]' }, 'BROKER_ISSUERS', /JSON/);
    rejects({ BROKER_ISSUERS: '{"issuer": "https://a.example"}' }, 'BROKER_ISSUERS', /array|list/);
    rejects({ BROKER_ISSUERS: '[]' }, 'BROKER_ISSUERS');
    rejects({ BROKER_ISSUERS: ' , ' }, 'BROKER_ISSUERS');
    rejects({ BROKER_ISSUERS: 'token.actions.githubusercontent.com' }, 'BROKER_ISSUERS', /URL/);
    rejects({ BROKER_ISSUERS: 'ftp://a.example' }, 'BROKER_ISSUERS', /URL/);
    rejects({ BROKER_ISSUERS: 'https://[::1' }, 'BROKER_ISSUERS', /URL/);
    // Discovery could never work for these (the same without the extra part is accepted above).
    for (const issuer of ['https://b.example/realms/x?tenant=1', 'https://b.example/realms/x#main', 'https://user@b.example/realms/x', 'https://b.example/x?']) {
      rejects({ BROKER_ISSUERS: issuer }, 'BROKER_ISSUERS', /no query, fragment or user part/);
    }
    // An @ in the path is part of the identifier, not a user.
    assert.deepEqual(loadConfig(env({ BROKER_ISSUERS: 'https://idp.example/tenant@x/v2.0' })).issuers, [{ issuer: 'https://idp.example/tenant@x/v2.0' }]);
    rejects({ BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example', jwks_uri: 'not a url' }]) }, 'BROKER_ISSUERS', /jwks_uri/);
    rejects({ BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example', jwks_uri: 'https://[bad' }]) }, 'BROKER_ISSUERS', /jwks_uri/);
    // fetch refuses credentials in a URL, and its error would carry them into the log; the message
    // here does not. An @ in the path or query is no user part (accepted above and here).
    for (const jwks_uri of ['https://u:s3cret-pw@keys.a.example/jwks', 'https://u@keys.a.example/jwks']) {
      const err = rejects({ BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example', jwks_uri }]) }, 'BROKER_ISSUERS', /jwks_uri must have no user part/);
      assert.ok(!err.message.includes('s3cret'), err.message);
    }
    assert.equal(loadConfig(env({ BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example', jwks_uri: 'https://keys.a.example/t@x/jwks?a=@' }]) })).issuers[0].jwks_uri, 'https://keys.a.example/t@x/jwks?a=@');
    rejects({ BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example', jwksUri: 'https://a.example/jwks' }]) }, 'BROKER_ISSUERS', /jwksUri/);
    rejects({ BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example', audience: '' }]) }, 'BROKER_ISSUERS', /audience/);
    rejects({ BROKER_ISSUERS: JSON.stringify(['https://a.example']) }, 'BROKER_ISSUERS');
    rejects({ BROKER_ISSUERS: 'https://a.example,https://a.example' }, 'BROKER_ISSUERS', /twice/);
    rejects({ BROKER_ISSUERS: JSON.stringify([{ issuer: 'https://a.example' }, { issuer: 'https://a.example', audience: 'x' }]) }, 'BROKER_ISSUERS', /twice/);
  });

  test('BROKER_AUDIENCE missing or blank', () => {
    rejects({ BROKER_AUDIENCE: undefined }, 'BROKER_AUDIENCE', /required/);
    rejects({ BROKER_AUDIENCE: ' ' }, 'BROKER_AUDIENCE', /required/);
  });

  test('BROKER_ADMINS bad JSON, unlisted issuer, no claims, bad patterns', () => {
    const admins = (value: unknown) => ({ BROKER_ADMINS: JSON.stringify(value) });
    rejects({ BROKER_ADMINS: '[{' }, 'BROKER_ADMINS', /JSON/);
    rejects(admins({ issuer: GOOD.BROKER_ISSUERS, claims: { sub: 'x' } }), 'BROKER_ADMINS');
    rejects(admins([{ issuer: 'https://evil.example', claims: { sub: 'admin' } }]), 'BROKER_ADMINS', /BROKER_ISSUERS/);
    rejects(admins([{ issuer: 'not a url', claims: { sub: 'admin' } }]), 'BROKER_ADMINS');
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: {} }]), 'BROKER_ADMINS', /claim/);
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS }]), 'BROKER_ADMINS');
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: 5 } }]), 'BROKER_ADMINS');
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: [] } }]), 'BROKER_ADMINS');
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { '/a~2': 'x' } }]), 'BROKER_ADMINS', /pointer/);
    // Typos that would make a rule no token ever matches.
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: '' } }]), 'BROKER_ADMINS', /^BROKER_ADMINS: entry 1: claim "sub" has an empty pattern, which matches no real value$/);
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: ['alice', ''] } }]), 'BROKER_ADMINS', /claim "sub" has an empty pattern/);
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: 'alice' } }, { issuer: GOOD.BROKER_ISSUERS, claims: { 'sub ': 'bob' } }]), 'BROKER_ADMINS',
      /^BROKER_ADMINS: entry 2: claim name "sub " has a space at its start or end, so no token would carry that claim$/);
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { ' /groups/0': 'dba' } }]), 'BROKER_ADMINS', /claim name " \/groups\/0"/);
    // The same rules, met: a pattern list, and a pattern with spaces inside, which claims can have.
    assert.deepEqual(loadConfig(env(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: ['alice', 'bob'], name: 'Ada Lovelace' } }]))).admins[0].claims,
      { sub: ['alice', 'bob'], name: 'Ada Lovelace' });
    // An admin rule every token of the issuer meets would make anyone with such a token an admin.
    rejects(admins([{ issuer: GOOD.BROKER_ISSUERS, claims: { sub: '*' } }]), 'BROKER_ADMINS', /every token of the issuer/);
  });

  test('ports and counts that are not whole numbers in range', () => {
    rejects({ PORT: 'eighty' }, 'PORT', /whole number/);
    rejects({ PORT: '80.5' }, 'PORT');
    rejects({ PORT: '70000' }, 'PORT');
    rejects({ PORT: '-1' }, 'PORT');
    rejects({ BROKER_PUBLIC_PG_PORT: '0' }, 'BROKER_PUBLIC_PG_PORT');
    rejects({ BROKER_PUBLIC_PG_PORT: '5432x' }, 'BROKER_PUBLIC_PG_PORT');
    rejects({ BROKER_METRICS_PORT: '65536' }, 'BROKER_METRICS_PORT');
    rejects({ BROKER_METRICS_PORT: '8080' }, 'BROKER_METRICS_PORT', /PORT/);
    rejects({ BROKER_REAPER_INTERVAL: '0' }, 'BROKER_REAPER_INTERVAL');
    rejects({ BROKER_REAPER_INTERVAL: '1e3' }, 'BROKER_REAPER_INTERVAL');
    rejects({ BROKER_GRANT_RECHECK_INTERVAL: '-1' }, 'BROKER_GRANT_RECHECK_INTERVAL');
    rejects({ BROKER_GRANT_RECHECK_INTERVAL: '3601' }, 'BROKER_GRANT_RECHECK_INTERVAL');
    rejects({ BROKER_RATE_LIMIT_IP: '0' }, 'BROKER_RATE_LIMIT_IP');
    rejects({ BROKER_RATE_LIMIT_IDENTITY: 'lots' }, 'BROKER_RATE_LIMIT_IDENTITY');
    rejects({ BROKER_DB_POOL_SIZE: '0' }, 'BROKER_DB_POOL_SIZE');
    rejects({ BROKER_DB_POOL_SIZE: '2.5' }, 'BROKER_DB_POOL_SIZE');
    rejects({ BROKER_DB_POOL_SIZE: '1001' }, 'BROKER_DB_POOL_SIZE');
    rejects({ BROKER_SCRAM_ITERATIONS: '0' }, 'BROKER_SCRAM_ITERATIONS');
    rejects({ BROKER_LOCK_TIMEOUT: '-1' }, 'BROKER_LOCK_TIMEOUT');
    rejects({ BROKER_LOCK_TIMEOUT: '1.5' }, 'BROKER_LOCK_TIMEOUT');
    rejects({ BROKER_LOCK_TIMEOUT: '3601' }, 'BROKER_LOCK_TIMEOUT');
    rejects({ BROKER_QUERY_TIMEOUT: '-1' }, 'BROKER_QUERY_TIMEOUT');
    rejects({ BROKER_QUERY_TIMEOUT: '3601' }, 'BROKER_QUERY_TIMEOUT');
    // A query timeout must leave lock waits room to end as DATABASE_BUSY.
    rejects({ BROKER_QUERY_TIMEOUT: '10' }, 'BROKER_QUERY_TIMEOUT', /longer than BROKER_LOCK_TIMEOUT \(10 s\)/);
    rejects({ BROKER_QUERY_TIMEOUT: '5', BROKER_LOCK_TIMEOUT: '20' }, 'BROKER_QUERY_TIMEOUT');
    assert.equal(loadConfig(env({ BROKER_QUERY_TIMEOUT: '11' })).queryTimeoutSeconds, 11);
    assert.equal(loadConfig(env({ BROKER_QUERY_TIMEOUT: '0', BROKER_LOCK_TIMEOUT: '20' })).queryTimeoutSeconds, 0);
  });

  test('BROKER_PUBLIC_PG_HOST: a port, scheme, path, user, space or malformed address is refused', () => {
    const bad = [
      'db.example.com:6432', 'https://db', 'a b/c@d', `broker:${SECRET}@db`, 'db/broker', 'db?x=1',
      '[db.example.com]', '[2001:db8::5]:5432', '2001:db8::g', 'fe80::1%eth0', '10.0.0.256', '1.2.3',
      '-db.example.com', 'db-.example.com', 'db..example.com', `${'a'.repeat(64)}.example.com`,
    ];
    for (const value of bad) rejects({ BROKER_PUBLIC_PG_HOST: value }, 'BROKER_PUBLIC_PG_HOST', /host name/);
    // Taken from DATABASE_URL, a host that cannot be handed on names DATABASE_URL and the way out.
    rejects({ DATABASE_URL: 'postgres://broker@/broker?host=db!1' }, 'DATABASE_URL', /BROKER_PUBLIC_PG_HOST/);
    assert.equal(loadConfig(env({ DATABASE_URL: 'postgres://broker@/broker?host=db!1', BROKER_PUBLIC_PG_HOST: 'db.example.com' })).publicPgHost, 'db.example.com');
  });

  test('a bad port inside DATABASE_URL names DATABASE_URL, not BROKER_PUBLIC_PG_PORT', () => {
    rejects({ DATABASE_URL: `postgres://u:${SECRET}@h/db?port=abc` }, 'DATABASE_URL', /port/);
    rejects({ DATABASE_URL: `postgres://u:${SECRET}@h/db?port=70000` }, 'DATABASE_URL', /port/);
    rejects({ DATABASE_URL: `postgres://u:${SECRET}@h:0/db` }, 'DATABASE_URL', /port/);
    // Even when the public port is set apart: the broker's own connection would use it.
    rejects({ DATABASE_URL: `postgres://u:${SECRET}@h/db?port=abc`, BROKER_PUBLIC_PG_PORT: '6432' }, 'DATABASE_URL', /port/);
    assert.equal(loadConfig(env({ DATABASE_URL: 'postgres://u@h/db?port=6432' })).publicPgPort, 6432);
  });

  test('BROKER_MANAGED_ROLE must be a plain identifier outside the reserved pg_ namespace', () => {
    rejects({ BROKER_MANAGED_ROLE: 'pg_broker' }, 'BROKER_MANAGED_ROLE', /pg_/);
    rejects({ BROKER_MANAGED_ROLE: 'Broker' }, 'BROKER_MANAGED_ROLE');
    rejects({ BROKER_MANAGED_ROLE: 'broker"; DROP ROLE x; --' }, 'BROKER_MANAGED_ROLE');
    rejects({ BROKER_MANAGED_ROLE: 'r'.repeat(64) }, 'BROKER_MANAGED_ROLE');
    rejects({ BROKER_MANAGED_ROLE: '1broker' }, 'BROKER_MANAGED_ROLE');
  });

  test('LOG_LEVEL must be a pino level', () => {
    rejects({ LOG_LEVEL: 'verbose' }, 'LOG_LEVEL', /info/);
  });

  test('a ConfigError message is the one line the CLI prints', () => {
    const err = rejects({ PORT: 'x' }, 'PORT');
    assert.equal(err.name, 'ConfigError');
  });
});

test('BROKER_MANAGED_ROLE alone is checked as loadConfig checks it (pg-broker migrate)', () => {
  assert.equal(managedRoleFrom({}), 'credential_broker_managed');
  assert.equal(managedRoleFrom({ BROKER_MANAGED_ROLE: ' team_a_managed ' }), 'team_a_managed');
  for (const bad of ['Managed', 'pg_managed', 'a-b', 'x'.repeat(60)]) {
    assert.throws(() => managedRoleFrom({ BROKER_MANAGED_ROLE: bad }), (e: unknown) => e instanceof ConfigError && e.variable === 'BROKER_MANAGED_ROLE', bad);
  }
});
