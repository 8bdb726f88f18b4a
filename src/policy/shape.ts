import type { PolicyInputBody } from '../schemas/policy.js';
import { POLICY_DEFAULTS } from '../schemas/policy.js';
import { validatePatterns } from './match.js';

/**
 * What is wrong with a policy on its own, before anything is looked up in the cluster: its claim
 * rules and the numbers that contradict each other or could never issue a working credential.
 * Shared by the API and `pg-broker policy` file validation, so both refuse the same things.
 */
export function policyShapeProblem(input: PolicyInputBody): string | null {
  const patterns = validatePatterns(input.claims);
  if (patterns) return patterns;
  const defaultTtl = input.default_ttl ?? POLICY_DEFAULTS.default_ttl;
  const maxTtl = input.max_ttl ?? POLICY_DEFAULTS.max_ttl;
  if (defaultTtl > maxTtl) return `default_ttl (${defaultTtl}) must not exceed max_ttl (${maxTtl})`;
  // PostgreSQL's CONNECTION LIMIT 0 lets nobody in; -1 is its "no limit".
  if (input.connection_limit === 0) return 'connection_limit 0 would issue credentials that can never log in: use -1 for no limit, or 1 or more';
  return null;
}
