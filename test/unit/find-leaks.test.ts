import assert from 'node:assert/strict';
import { test } from 'node:test';
import { findLeaks } from '../helpers/broker.js';

// The secrets check every integration suite ends with; it must see a planted secret, else every
// suite's "nothing leaked" would pass without looking.
const token = `eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.${'s'.repeat(40)}`;
const password = 'pW-0123456789abcdefghijklmnopqrstuvwxyzABCD';

test('findLeaks finds a planted token, its signature alone, and a password, in either log', () => {
  const secrets = new Set([token, password]);
  assert.deepEqual(findLeaks(secrets, ['{"msg":"ok"}'], ['LOG: statement: SELECT 1']), [], 'clean logs');
  assert.deepEqual(findLeaks(secrets, [`{"auth":"${token}"}`], []), [`broker log holds ${token.slice(0, 8)}…`, `broker log holds ssssssss…`]);
  assert.deepEqual(findLeaks(secrets, [], [`LOG: sig ${'s'.repeat(40)}`]), ['server log holds ssssssss…']);
  assert.deepEqual(findLeaks(secrets, [], [`CREATE ROLE x PASSWORD '${password}'`]), [`server log holds ${password.slice(0, 8)}…`]);
});
