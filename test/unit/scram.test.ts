import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, createHmac } from 'node:crypto';
import {
  DEFAULT_SCRAM_ITERATIONS,
  generatePassword,
  scramVerifier,
  scramVerifierAsync,
} from '../../src/postgres/scram.js';

const VERIFIER = /^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$/;

function parse(verifier: string) {
  const match = VERIFIER.exec(verifier);
  assert.ok(match, `not a SCRAM verifier: ${verifier}`);
  return {
    iterations: Number(match[1]),
    salt: Buffer.from(match[2], 'base64'),
    storedKey: Buffer.from(match[3], 'base64'),
    serverKey: Buffer.from(match[4], 'base64'),
  };
}

// RFC 7677 section 3: user "user", password "pencil". The RFC publishes the exchange, not the
// stored keys, so the test checks our StoredKey/ServerKey the way a server would: the client's
// proof must unmask to a ClientKey hashing to StoredKey, and ServerKey must sign the exchange to
// the published server signature. That needs only SHA-256/HMAC, not our PBKDF2 path.
const RFC7677 = {
  password: 'pencil',
  salt: 'W22ZaJ0SNY7soEsUEjb6gQ==',
  iterations: 4096,
  authMessage: [
    'n=user,r=rOprNGfwEbeRWgbNEkqO',
    'r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096',
    'c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0',
  ].join(','),
  clientProof: 'dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=',
  serverSignature: '6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=',
};

test('RFC 7677 vector: StoredKey and ServerKey verify the published exchange', () => {
  const salt = Buffer.from(RFC7677.salt, 'base64');
  const verifier = scramVerifier(RFC7677.password, RFC7677.iterations, salt);
  const { iterations, salt: parsedSalt, storedKey, serverKey } = parse(verifier);
  assert.equal(iterations, 4096);
  assert.deepEqual(parsedSalt, salt);

  const serverSignature = createHmac('sha256', serverKey).update(RFC7677.authMessage).digest('base64');
  assert.equal(serverSignature, RFC7677.serverSignature);

  const clientSignature = createHmac('sha256', storedKey).update(RFC7677.authMessage).digest();
  const proof = Buffer.from(RFC7677.clientProof, 'base64');
  const clientKey = Buffer.alloc(32);
  for (let i = 0; i < 32; i++) clientKey[i] = proof[i] ^ clientSignature[i];
  assert.deepEqual(createHash('sha256').update(clientKey).digest(), storedKey);
});

test('RFC 7677 vector: exact verifier text (regression)', () => {
  const verifier = scramVerifier('pencil', 4096, Buffer.from(RFC7677.salt, 'base64'));
  assert.equal(
    verifier,
    'SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==' +
      '$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=',
  );
});

test('format matches what PostgreSQL stores', () => {
  const { iterations, salt, storedKey, serverKey } = parse(scramVerifier(generatePassword()));
  assert.equal(iterations, DEFAULT_SCRAM_ITERATIONS);
  assert.equal(salt.length, 16);
  assert.equal(storedKey.length, 32);
  assert.equal(serverKey.length, 32);
});

test('honours the iteration count, and the default is a named export', () => {
  assert.equal(DEFAULT_SCRAM_ITERATIONS, 4096);
  assert.equal(parse(scramVerifier('secret', 1)).iterations, 1);
  assert.equal(parse(scramVerifier('secret', 10_000)).iterations, 10_000);
});

test('a fresh random salt for every verifier', () => {
  const a = parse(scramVerifier('same password', 1));
  const b = parse(scramVerifier('same password', 1));
  assert.notDeepEqual(a.salt, b.salt);
  assert.notDeepEqual(a.storedKey, b.storedKey);
});

test('same password, salt and iterations give the same verifier; others differ', () => {
  const salt = Buffer.alloc(16, 7);
  assert.equal(scramVerifier('x', 2, salt), scramVerifier('x', 2, salt));
  assert.notEqual(scramVerifier('x', 2, salt), scramVerifier('y', 2, salt));
  assert.notEqual(scramVerifier('x', 2, salt), scramVerifier('x', 3, salt));
});

test('async verifier equals the sync one for its salt', async () => {
  for (const iterations of [1, DEFAULT_SCRAM_ITERATIONS]) {
    const password = generatePassword();
    const verifier = await scramVerifierAsync(password, iterations);
    const { salt } = parse(verifier);
    assert.equal(salt.length, 16);
    assert.equal(verifier, scramVerifier(password, iterations, salt));
  }
  assert.equal(parse(await scramVerifierAsync('pw')).iterations, DEFAULT_SCRAM_ITERATIONS);
});

test('rejects iteration counts that are not integers >= 1', async () => {
  for (const bad of [0, -1, 1.5, Number.NaN, Number.POSITIVE_INFINITY, 2 ** 31, '4096' as unknown as number]) {
    assert.throws(() => scramVerifier('pw', bad), RangeError, String(bad));
    await assert.rejects(scramVerifierAsync('pw', bad), RangeError, String(bad));
  }
});

test('accepts only non-empty ASCII passwords (no SASLprep is done)', async () => {
  for (const bad of ['pässword', 'emoji 😀', 'nul\u0000inside', '', 'x'.repeat(1025)]) {
    assert.throws(() => scramVerifier(bad, 1), JSON.stringify(bad));
    await assert.rejects(scramVerifierAsync(bad, 1), JSON.stringify(bad));
  }
  assert.match(scramVerifier('plain ASCII ~!@#$%^&*()', 1), VERIFIER);
});

test('rejects an empty salt', () => {
  assert.throws(() => scramVerifier('pw', 1, Buffer.alloc(0)), TypeError);
});

test('generatePassword: 32 random bytes as unpadded base64url', () => {
  const seen = new Set<string>();
  for (let i = 0; i < 1000; i++) {
    const password = generatePassword();
    assert.match(password, /^[A-Za-z0-9_-]{43}$/);
    assert.equal(Buffer.from(password, 'base64url').length, 32);
    seen.add(password);
  }
  assert.equal(seen.size, 1000);
  assert.doesNotThrow(() => scramVerifier(generatePassword(), 1));
});
