import assert from 'node:assert/strict';
import { test } from 'node:test';
import type pg from 'pg';
import { commitBatch, sessionSettings } from '../../src/postgres/pool.js';

const poolWith = (options: pg.PoolConfig) => ({ options }) as unknown as pg.Pool;

test('the pool cancels on the server first and gives up on a silent server 2 s later; other connections only give up', () => {
  assert.deepEqual(sessionSettings({ lockTimeoutSeconds: 10, queryTimeoutSeconds: 30 }, true),
    { connectionTimeoutMillis: 5000, lock_timeout: 10_000, statement_timeout: 30_000, query_timeout: 32_000 });
  assert.deepEqual(sessionSettings({ lockTimeoutSeconds: 10, queryTimeoutSeconds: 30 }, false),
    { connectionTimeoutMillis: 5000, lock_timeout: 10_000, query_timeout: 30_000 });
  assert.deepEqual(sessionSettings({ lockTimeoutSeconds: 0, queryTimeoutSeconds: 0 }, true), { connectionTimeoutMillis: 5000 });
});

test('the batch that commits waits for two statement timeouts (the work and the COMMIT) before giving up on the server', () => {
  const batch = commitBatch(poolWith({ statement_timeout: 1000 }), 'CREATE ROLE x;\nCOMMENT ON ROLE x IS $$y$$') as { text: string; query_timeout?: number };
  assert.deepEqual([batch.text, batch.query_timeout], ['CREATE ROLE x;\nCOMMENT ON ROLE x IS $$y$$;\nCOMMIT', 4000]);
  // Without a statement timeout, the pool's own setting (if any) applies unchanged.
  assert.equal((commitBatch(poolWith({}), 'SELECT 1') as { query_timeout?: number }).query_timeout, undefined);
});
