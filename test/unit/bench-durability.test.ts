import assert from 'node:assert/strict';
import { test } from 'node:test';
import { durability } from '../../bench/lib/report/overview.js';

// The report's sentence on commit cost is built from the settings the server reported.
test('the durability sentence names exactly the settings that are off', () => {
  assert.equal(
    durability({ fsync: 'off', synchronous_commit: 'off', full_page_writes: 'off' }),
    'with **fsync=off, synchronous_commit=off and full_page_writes=off**: commits wait for no disk flush here, for the floor and the broker alike, so both numbers are CPU-bound upper bounds a durable server will not reach.',
  );
  assert.equal(durability({ fsync: 'on', synchronous_commit: 'on', full_page_writes: 'on' }), 'with durable commits (fsync and synchronous_commit on).');
  assert.equal(durability({ fsync: 'on', synchronous_commit: 'on', full_page_writes: 'off' }), 'with **full_page_writes=off**.');
  assert.match(durability({ fsync: 'on', synchronous_commit: 'off', full_page_writes: 'on' }), /^with \*\*synchronous_commit=off\*\*: commits wait for no disk flush/);
});
