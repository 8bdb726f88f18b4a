import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { imageEnv } from '../../bench/lib/settings.js';

test('the bench reads the Docker image\'s ENV values, quoted or not', () => {
  const dockerfile = 'ENV HOST=0.0.0.0 \\\n    NODE_OPTIONS="--max-semi-space-size=4 --max-old-space-size=256" \\\n    UV_THREADPOOL_SIZE=1\n';
  assert.equal(imageEnv('NODE_OPTIONS', dockerfile), '--max-semi-space-size=4 --max-old-space-size=256');
  assert.equal(imageEnv('UV_THREADPOOL_SIZE', dockerfile), '1');
  assert.equal(imageEnv('HOST', dockerfile), '0.0.0.0');
  assert.equal(imageEnv('PORT', dockerfile), '', 'a variable the image does not set');
});

test('the real Dockerfile caps the old generation and sets the libuv pool', () => {
  const dockerfile = readFileSync(new URL('../../Dockerfile', import.meta.url), 'utf8');
  assert.match(imageEnv('NODE_OPTIONS', dockerfile), /(^| )--max-old-space-size=\d+( |$)/);
  assert.match(imageEnv('UV_THREADPOOL_SIZE', dockerfile), /^\d+$/);
});
