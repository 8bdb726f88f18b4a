import assert from 'node:assert/strict';
import { test } from 'node:test';
import { issuerRefusal } from '../../src/auth/verify.js';

const PLAIN = 'token issuer is not allowed';

test('a near miss of an allowed issuer is named as one; anything else gets the plain refusal', () => {
  const allowed = ['https://token.actions.githubusercontent.com', 'https://oidc.example.com/tenant-a/'];
  for (const iss of [
    'https://token.actions.githubusercontent.com/',
    'https://Token.Actions.GithubUserContent.com',
    'https://token.actions.githubusercontent.com:443',
    'https://oidc.example.com/tenant-a',
    'https://oidc.example.com/Tenant-A/',
  ]) assert.match(issuerRefusal(iss, allowed), /only by a trailing slash, letter case or a default port/, iss);
  for (const iss of [
    'https://token.actions.githubusercontent.com.evil.example',
    'http://token.actions.githubusercontent.com',
    'https://token.actions.githubusercontent.com:8443',
    'https://oidc.example.com/tenant-b/',
    'https://oidc.example.com',
    'not a url', '', 42, null, undefined, `https://x.example/${'a'.repeat(3000)}`,
  ]) assert.equal(issuerRefusal(iss, allowed), PLAIN, String(iss));
});
