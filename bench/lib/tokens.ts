import type { TestIssuer } from '../../test/helpers/issuer.js';
import { AUDIENCE, TOKEN_TTL_SECONDS } from './settings.js';

/** Pre-signed JWTs from the test issuer, for the broker's audience, valid for the whole run. */
export async function signTokens(issuer: TestIssuer, subjects: string[], alg: 'RS256' | 'ES256' = 'RS256'): Promise<string[]> {
  const exp = Math.floor(Date.now() / 1000) + TOKEN_TTL_SECONDS;
  const out: string[] = [];
  for (const sub of subjects) out.push(await issuer.sign({ aud: AUDIENCE, sub, exp }, { alg }));
  return out;
}
