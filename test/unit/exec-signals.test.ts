import assert from 'node:assert/strict';
import { test } from 'node:test';
import { EXEC_SIGNALS, signalsToForward } from '../../src/cli/credentials.js';

test('at a terminal exec leaves Ctrl-C and Ctrl-\\ to the terminal, which already sent them to the command', () => {
  assert.deepEqual(signalsToForward(true), ['SIGTERM', 'SIGHUP', 'SIGUSR1', 'SIGUSR2']);
});

test('without a terminal (CI, kill -INT) exec forwards every signal it handles', () => {
  assert.deepEqual(signalsToForward(false), [...EXEC_SIGNALS]);
  assert.ok(EXEC_SIGNALS.includes('SIGINT') && EXEC_SIGNALS.includes('SIGQUIT'));
});
