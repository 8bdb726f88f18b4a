import type { PolicyInputBody } from '../schemas/policy.js';
import { POLICY_DEFAULTS } from '../schemas/policy.js';
import { validatePatterns } from './match.js';

const MAX_IDENTIFIER_BYTES = 63;
const MAX_CLAIM_KEY_LENGTH = 256;

/**
 * What is wrong with a policy on its own, before anything is looked up in the cluster: its claim
 * rules and the numbers that contradict each other or could never issue a working credential.
 * Shared by the API and `pg-broker policy` file validation, so both refuse the same things.
 */
export function policyShapeProblem(input: PolicyInputBody): string | null {
  // PostgreSQL cuts identifiers at 63 bytes, not characters: a longer name would be looked up and
  // granted as a different, shorter one while the policy and its leases kept the long spelling.
  for (const field of ['grant_role', 'database'] as const) {
    const bytes = Buffer.byteLength(input[field]);
    if (bytes > MAX_IDENTIFIER_BYTES) return `${field} is ${bytes} bytes in UTF-8; PostgreSQL names hold at most ${MAX_IDENTIFIER_BYTES}`;
  }
  // The schema's key length is documentation only: a JSON Schema record does not check its keys.
  const longKey = Object.keys(input.claims).find((k) => k.length > MAX_CLAIM_KEY_LENGTH);
  if (longKey !== undefined) return `claim name ${JSON.stringify(longKey.slice(0, 40))}… is longer than ${MAX_CLAIM_KEY_LENGTH} characters`;
  const patterns = validatePatterns(input.claims);
  if (patterns) return patterns;
  const defaultTtl = input.default_ttl ?? POLICY_DEFAULTS.default_ttl;
  const maxTtl = input.max_ttl ?? POLICY_DEFAULTS.max_ttl;
  if (defaultTtl > maxTtl) return `default_ttl (${defaultTtl}) must not exceed max_ttl (${maxTtl})`;
  // PostgreSQL's CONNECTION LIMIT 0 lets nobody in; -1 is its "no limit".
  if (input.connection_limit === 0) return 'connection_limit 0 would issue credentials that can never log in: use -1 for no limit, or 1 or more';
  return null;
}
