import assert from 'node:assert/strict';
import { ConfigError, loadConfig } from '../../src/config.js';

// The environment the loadConfig tests start from, and the check every refusal must pass.

export const SECRET = 's3cr3t-pw';
export const GOOD: Record<string, string> = {
  DATABASE_URL: `postgres://broker:${SECRET}@db.internal:5433/broker`,
  BROKER_ISSUERS: 'https://token.actions.githubusercontent.com',
  BROKER_AUDIENCE: 'pg-broker',
};

export function env(overrides: Record<string, string | undefined>): Record<string, string | undefined> {
  return { ...GOOD, ...overrides };
}

/** loadConfig must throw a ConfigError naming `variable` (in the error and its message), never leaking the password. */
export function rejects(overrides: Record<string, string | undefined>, variable: string, reason?: RegExp): ConfigError {
  let caught: unknown;
  try {
    loadConfig(env(overrides));
  } catch (err) {
    caught = err;
  }
  assert.ok(caught instanceof ConfigError, `expected a ConfigError for ${JSON.stringify(overrides)}, got ${caught}`);
  assert.equal(caught.variable, variable, caught.message);
  assert.ok(caught.message.startsWith(`${variable}: `), caught.message);
  assert.ok(!caught.message.includes(SECRET), `message leaks the password: ${caught.message}`);
  assert.ok(!caught.message.includes('\n'), 'one line');
  if (reason) assert.match(caught.message, reason);
  return caught;
}
