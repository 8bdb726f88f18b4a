import { matchClaims, type FailedClaim } from './match.js';
import type { Policy } from './repository.js';

export interface PolicyEvaluation {
  policy: Policy;
  admitted: boolean;
  reason?: string;
  failed_claims: FailedClaim[];
}

/** Explains, policy by policy, whether these verified claims are admitted and why not. */
export function evaluatePolicies(policies: Policy[], claims: Record<string, unknown>): PolicyEvaluation[] {
  return policies.map((policy) => {
    const failed = matchClaims(policy.claims, claims);
    if (!policy.enabled) return { policy, admitted: false, reason: 'policy is disabled', failed_claims: failed };
    if (policy.issuer !== claims.iss) return { policy, admitted: false, reason: 'token comes from another issuer', failed_claims: failed };
    if (policy.audience) {
      const aud = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
      if (!aud.includes(policy.audience)) {
        return { policy, admitted: false, reason: `token audience does not include ${policy.audience}`, failed_claims: failed };
      }
    }
    return { policy, admitted: failed.length === 0, failed_claims: failed };
  });
}
