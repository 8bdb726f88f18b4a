import { randomBytes } from 'node:crypto';

/**
 * Role names go into DDL, which takes no bind parameters. Generating them from a tiny alphabet
 * means they never need quoting to be safe (we still pass them through escapeIdentifier), never
 * fold case, and never start with the reserved `pg_` prefix.
 */
const PREFIX = 'lease_';
const SUFFIX_LENGTH = 10;
const ALPHABET = 'abcdefghijklmnopqrstuvwxyz0123456789';
// NAMEDATALEN - 1: PostgreSQL silently truncates longer identifiers, which could merge names.
const MAX_ROLE_NAME_BYTES = 63;
const MAX_HINT_LENGTH = MAX_ROLE_NAME_BYTES - PREFIX.length - 1 - SUFFIX_LENGTH;

/**
 * Exactly what roleNameFor produces: `lease_`, an optional hint of [a-z0-9] words joined by
 * single underscores followed by `_`, then 10 random [a-z0-9]; 16 to 63 characters in all.
 */
export const ROLE_NAME_PATTERN = /^(?=.{16,63}$)lease_(?:[a-z0-9]+(?:_[a-z0-9]+)*_)?[a-z0-9]{10}$/;

/**
 * The hint is only for humans reading pg_stat_activity and logs; uniqueness comes from the
 * random suffix alone, so two subjects that collapse to the same hint are fine.
 */
function hintFor(subject: string): string {
  // Lowercase first: some non-ASCII letters lowercase into ASCII (KELVIN SIGN -> k), and the
  // filter below must see the final characters.
  // Runs are collapsed, so at most one underscore can sit at either end, before or after the cut.
  const words = subject.toLowerCase().replace(/[^a-z0-9]+/g, '_').replace(/^_|_$/g, '');
  return words.slice(0, MAX_HINT_LENGTH).replace(/_$/, '');
}

/**
 * `random` exists for deterministic tests and must hold at least 10 bytes. Each byte maps to a
 * character modulo 36; the slight bias is irrelevant because the suffix only needs to avoid
 * collisions (about 51 bits), it is not a secret.
 */
export function roleNameFor(subject: string, random?: Buffer): string {
  const bytes = random ?? randomBytes(SUFFIX_LENGTH);
  if (!Buffer.isBuffer(bytes) || bytes.length < SUFFIX_LENGTH) {
    throw new RangeError(`roleNameFor needs at least ${SUFFIX_LENGTH} random bytes`);
  }
  let suffix = '';
  for (let i = 0; i < SUFFIX_LENGTH; i++) suffix += ALPHABET[bytes[i] % ALPHABET.length];
  const hint = hintFor(typeof subject === 'string' ? subject : '');
  return hint === '' ? `${PREFIX}${suffix}` : `${PREFIX}${hint}_${suffix}`;
}
