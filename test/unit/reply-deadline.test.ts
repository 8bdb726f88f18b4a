import assert from 'node:assert/strict';
import { test } from 'node:test';
import type pg from 'pg';
import { sessionSettings, statements } from '../../src/postgres/pool.js';

const poolWith = (options: pg.PoolConfig) => ({ options }) as unknown as pg.Pool;

test('the pool cancels on the server first and gives up on a silent server 2 s later; other connections only give up', () => {
  assert.deepEqual(sessionSettings({ lockTimeoutSeconds: 10, queryTimeoutSeconds: 30 }, true),
    { connectionTimeoutMillis: 5000, lock_timeout: 10_000, statement_timeout: 30_000, query_timeout: 32_000 });
  assert.deepEqual(sessionSettings({ lockTimeoutSeconds: 10, queryTimeoutSeconds: 30 }, false),
    { connectionTimeoutMillis: 5000, lock_timeout: 10_000, query_timeout: 30_000 });
  assert.deepEqual(sessionSettings({ lockTimeoutSeconds: 0, queryTimeoutSeconds: 0 }, true), { connectionTimeoutMillis: 5000 });
});

test('a multi-statement string waits one statement_timeout per statement before giving up on the server', () => {
  const pool = poolWith({ statement_timeout: 1000 });
  assert.equal((statements(pool, 'SELECT 1') as { query_timeout?: number }).query_timeout, 3000);
  assert.equal((statements(pool, 'BEGIN;\nSELECT 1;\nSELECT 2') as { query_timeout?: number }).query_timeout, 5000);
  const withValues = statements(pool, 'SELECT $1', [1]);
  assert.deepEqual([withValues.text, withValues.values], ['SELECT $1', [1]]);
  // Without a statement timeout, the pool's own setting (if any) applies unchanged.
  assert.equal((statements(poolWith({}), 'BEGIN;\nSELECT 1') as { query_timeout?: number }).query_timeout, undefined);
});
