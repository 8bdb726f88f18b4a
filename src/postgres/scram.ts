import { createHash, createHmac, pbkdf2, pbkdf2Sync, randomBytes } from 'node:crypto';
import { promisify } from 'node:util';

/**
 * SCRAM-SHA-256 verifiers in the form PostgreSQL stores in pg_authid.rolpassword, so the broker
 * can send `CREATE ROLE ... PASSWORD '<verifier>'` and never put the plaintext in a statement
 * (a failed CREATE ROLE is logged in full by the server).
 *
 * Iterations: our passwords are 256 random bits, so key stretching adds no security; it only
 * costs CPU here and on the server, which re-runs PBKDF2 on every CREATE ROLE to check the
 * password is not empty. 4096 matches PostgreSQL's own default; a deployment may lower it.
 */
export const DEFAULT_SCRAM_ITERATIONS = 4096;

const SALT_BYTES = 16;
const KEY_BYTES = 32;
// PostgreSQL's SASLprep refuses longer passwords; there is no reason for ours to come close.
const MAX_PASSWORD_LENGTH = 1024;
// Node's PBKDF2 and PostgreSQL's `int` iteration count both stop here.
const MAX_ITERATIONS = 2 ** 31 - 1;

const pbkdf2Async = promisify(pbkdf2);

/**
 * PostgreSQL runs SASLprep over the password before hashing, but its fast path leaves pure ASCII
 * untouched. Restricting input to ASCII lets us skip a stringprep implementation without risking
 * a verifier the server would compute differently. NUL is excluded because the server sees C
 * strings and would truncate there.
 */
function assertPassword(password: string): void {
  if (typeof password !== 'string' || password.length === 0) {
    throw new TypeError('SCRAM password must be a non-empty string');
  }
  if (password.length > MAX_PASSWORD_LENGTH) {
    throw new RangeError(`SCRAM password must be at most ${MAX_PASSWORD_LENGTH} characters`);
  }
  if (!/^[\x01-\x7f]*$/.test(password)) {
    throw new TypeError('SCRAM password must be ASCII without NUL (no SASLprep is applied)');
  }
}

function assertIterations(iterations: number): void {
  if (!Number.isInteger(iterations) || iterations < 1 || iterations > MAX_ITERATIONS) {
    throw new RangeError(`SCRAM iterations must be an integer between 1 and ${MAX_ITERATIONS}`);
  }
}

function assertSalt(salt: Buffer): void {
  if (!Buffer.isBuffer(salt) || salt.length === 0) {
    throw new TypeError('SCRAM salt must be a non-empty Buffer');
  }
}

function formatVerifier(saltedPassword: Buffer, iterations: number, salt: Buffer): string {
  const clientKey = createHmac('sha256', saltedPassword).update('Client Key').digest();
  const storedKey = createHash('sha256').update(clientKey).digest();
  const serverKey = createHmac('sha256', saltedPassword).update('Server Key').digest();
  return (
    `SCRAM-SHA-256$${iterations}:${salt.toString('base64')}` +
    `$${storedKey.toString('base64')}:${serverKey.toString('base64')}`
  );
}

/**
 * Synchronous: blocks the event loop for the whole PBKDF2. Fine at low iteration counts and in
 * tests; request paths should prefer scramVerifierAsync.
 */
export function scramVerifier(
  password: string,
  iterations: number = DEFAULT_SCRAM_ITERATIONS,
  salt: Buffer = randomBytes(SALT_BYTES),
): string {
  assertPassword(password);
  assertIterations(iterations);
  assertSalt(salt);
  const saltedPassword = pbkdf2Sync(password, salt, iterations, KEY_BYTES, 'sha256');
  return formatVerifier(saltedPassword, iterations, salt);
}

/**
 * Up to this many iterations PBKDF2 runs inline: it then takes under ~50 µs, less than the hop
 * to libuv's thread pool and back costs (measured on 2 cores: ~45 µs of CPU per async call, vs
 * 7 µs inline at 1 iteration and 46 µs at 256). Above it, the event loop is never blocked.
 */
export const INLINE_PBKDF2_MAX_ITERATIONS = 256;

/**
 * Runs PBKDF2 on libuv's thread pool (inline for tiny iteration counts, see
 * INLINE_PBKDF2_MAX_ITERATIONS); invalid input rejects rather than throws.
 */
export async function scramVerifierAsync(
  password: string,
  iterations: number = DEFAULT_SCRAM_ITERATIONS,
): Promise<string> {
  assertPassword(password);
  assertIterations(iterations);
  const salt = randomBytes(SALT_BYTES);
  const saltedPassword =
    iterations <= INLINE_PBKDF2_MAX_ITERATIONS
      ? pbkdf2Sync(password, salt, iterations, KEY_BYTES, 'sha256')
      : await pbkdf2Async(password, salt, iterations, KEY_BYTES, 'sha256');
  return formatVerifier(saltedPassword, iterations, salt);
}

/** 256 bits from the CSPRNG; base64url keeps it ASCII and safe inside a connection URI. */
export function generatePassword(): string {
  return randomBytes(32).toString('base64url');
}
