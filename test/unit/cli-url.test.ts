import assert from 'node:assert/strict';
import { test } from 'node:test';
import { plainHttpWarning } from '../../src/cli/client.js';

test('plain http to another host is warned about; https and loopback are not', () => {
  for (const url of ['http://pg-broker.internal', 'http://10.0.0.5:8080', 'http://[fd00::1]:8080', 'http://localhost.evil.example', 'http://127.evil.example', 'http://127.0.0.1.nip.io']) {
    assert.match(plainHttpWarning(url) ?? 'none', /plain http/, url);
  }
  for (const url of ['https://pg-broker.internal', 'http://127.0.0.1:8080', 'http://127.9.9.9', 'http://localhost:8080', 'http://[::1]:8080', 'not a url']) {
    assert.equal(plainHttpWarning(url), null, url);
  }
});
