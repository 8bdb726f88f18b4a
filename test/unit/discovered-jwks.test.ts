import assert from 'node:assert/strict';
import { test } from 'node:test';
import { discoveredJwksProblem } from '../../src/auth/key-source.js';

test('a discovered jwks_uri is fetched over https, or over http only for an http issuer', () => {
  assert.equal(discoveredJwksProblem('https://idp.example.com', 'https://keys.example.com/jwks'), null);
  assert.equal(discoveredJwksProblem('http://127.0.0.1:9000', 'http://127.0.0.1:9000/jwks'), null);
  assert.equal(discoveredJwksProblem('http://127.0.0.1:9000', 'https://keys.example.com/jwks'), null);
  assert.match(String(discoveredJwksProblem('https://idp.example.com', 'http://keys.example.com/jwks')), /plain-http jwks_uri; an https issuer's keys must come over https/);
  for (const uri of ['data:application/json,{}', 'file:///etc/passwd', 'ftp://keys.example.com/jwks']) {
    assert.match(String(discoveredJwksProblem('https://idp.example.com', uri)), /names a jwks_uri with scheme/, uri);
  }
  assert.match(String(discoveredJwksProblem('https://idp.example.com', '/relative/jwks')), /not a URL/);
});
