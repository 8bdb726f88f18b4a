import { createPublicKey } from 'node:crypto';
import { Agent } from 'undici';
import type { IssuerConfig } from '../config.js';
import { discoverJwksUri, discoveredJwksProblem, fetchOverHttpsIfAsked, readCappedJson } from './key-source.js';

// Asymmetric algorithms only: an HMAC alg would let anyone holding the public key forge tokens.
export const ALLOWED_ALGORITHMS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA'];

// The JWK a header alg may be verified with. A JWKS may omit `alg` (Entra ID does), and then any
// key with the right kid is a candidate, so without this an ES256 header could meet an RSA key.
const KEY_TYPE_FOR_ALG: Record<string, { kty: string; crv?: string[] }> = {
  RS256: { kty: 'RSA' }, RS384: { kty: 'RSA' }, RS512: { kty: 'RSA' },
  PS256: { kty: 'RSA' }, PS384: { kty: 'RSA' }, PS512: { kty: 'RSA' },
  ES256: { kty: 'EC', crv: ['P-256'] }, ES384: { kty: 'EC', crv: ['P-384'] }, ES512: { kty: 'EC', crv: ['P-521'] },
  EdDSA: { kty: 'OKP', crv: ['Ed25519', 'Ed448'] },
};

export class KeyLookupError extends Error {
  constructor(message: string, readonly fetchFailed = false) {
    super(message);
    this.name = 'KeyLookupError';
  }
}

export interface KeyResolverOptions {
  /** How long a fetched key is trusted without asking the JWKS again (default 10 minutes). */
  cacheTtlMs?: number;
  /** How long a kid the JWKS did not list is refused without asking again (default 5 s). */
  unknownKidCooldownMs?: number;
  /**
   * JWKS fetches caused by kids not in the cache, per issuer: a burst of this many (default 5),
   * then one per missFetchIntervalMs (default 1 s).
   */
  missFetchBurst?: number;
  missFetchIntervalMs?: number;
  fetchTimeoutMs?: number;
  /**
   * While the JWKS cannot be fetched, a key it served within this long keeps verifying
   * (default 24 hours). A JWKS that answers without the key ends its use at once.
   */
  staleKeyMaxAgeMs?: number;
  onFetchError?: (issuer: string, err: unknown) => void;
  /**
   * Certificate authorities to trust instead of the system's (tests). A deployment whose IdP has
   * a private CA sets NODE_EXTRA_CA_CERTS, which adds to the system's.
   */
  ca?: string;
}

type Jwk = Record<string, unknown>;

interface IssuerKeys {
  issuer: string;
  /** The explicit jwks_uri; without one, OIDC discovery on the issuer finds it. */
  jwksUri: string | null;
  /** The last key set the JWKS served, by kid, and when; replaced whole by each good fetch. */
  set: Map<string, Jwk[]> | null;
  fetchedAt: number;
  /** The one JWKS fetch in flight for this issuer, which every lookup meanwhile shares. */
  setFetch: Promise<Map<string, Jwk[]>> | null;
  /** Token bucket for fetches caused by kids the last set did not list. */
  missBudget: number;
  missBudgetAt: number;
  knownMisses: Map<string, number>;
  lastFetchFailure: number;
}

/** Whether a JWK may verify a token with this header alg: key type, curve, use and its own alg. */
function fits(jwk: Jwk, alg: string): boolean {
  const wanted = KEY_TYPE_FOR_ALG[alg];
  if (jwk.kty !== wanted.kty || (wanted.crv && !wanted.crv.includes(jwk.crv as string))) return false;
  if (jwk.use !== undefined && jwk.use !== 'sig') return false;
  return jwk.alg === undefined || jwk.alg === alg;
}

/**
 * Finds the public key for a token's (iss, kid, alg). The issuer must be allow-listed before
 * anything is fetched: each issuer's JWKS location is its explicit jwks_uri, or what OIDC
 * discovery on that issuer names.
 *
 * Each fetch takes the issuer's whole key set, which is trusted for cacheTtlMs: a key the issuer
 * unpublishes keeps verifying until then. Past that, the JWKS is asked again: if it answers
 * without the key, the key is refused from then on; if it cannot be reached, the last set is used
 * (up to staleKeyMaxAgeMs) so an IdP outage does not lock out tokens signed with keys we already
 * know. Keeping whole sets is also what keeps a flood of made-up kids from locking out real ones:
 * the flood's own fetches bring in a rotated key (or, after a restart, every key) for the tokens
 * that need it.
 */
export class KeyResolver {
  private readonly issuers = new Map<string, IssuerKeys>();
  // PEM conversion costs more than a verification; convert each JWK object once.
  private readonly pemCache = new WeakMap<object, string>();
  private readonly ttlMs: number;
  private readonly cooldownMs: number;
  private readonly missBurst: number;
  private readonly missIntervalMs: number;
  private readonly staleMaxAgeMs: number;
  readonly dispatcher: Agent;
  private readonly fetchTimeoutMs: number;

  constructor(entries: IssuerConfig[], private readonly options: KeyResolverOptions = {}) {
    const timeout = options.fetchTimeoutMs ?? 3000;
    this.fetchTimeoutMs = timeout;
    // An Agent with its own timeouts: the global fetch has none. Its body timeout bounds the wait for each chunk only; loadKeySet bounds the whole fetch.
    this.dispatcher = new Agent({ connectTimeout: timeout, headersTimeout: timeout, bodyTimeout: timeout, ...(options.ca ? { connect: { ca: options.ca } } : {}) });
    this.ttlMs = options.cacheTtlMs ?? 10 * 60_000;
    this.cooldownMs = options.unknownKidCooldownMs ?? 5000;
    this.missBurst = options.missFetchBurst ?? 5;
    this.missIntervalMs = options.missFetchIntervalMs ?? 1000;
    this.staleMaxAgeMs = options.staleKeyMaxAgeMs ?? 24 * 60 * 60_000;
    for (const entry of entries) this.issuers.set(entry.issuer, this.build(entry));
  }

  private build(entry: IssuerConfig): IssuerKeys {
    return {
      issuer: entry.issuer, jwksUri: entry.jwks_uri ?? null, set: null, fetchedAt: 0, setFetch: null,
      missBudget: this.missBurst, missBudgetAt: Date.now(), knownMisses: new Map<string, number>(), lastFetchFailure: 0,
    };
  }

  isAllowed(issuer: unknown): issuer is string {
    return typeof issuer === 'string' && this.issuers.has(issuer);
  }

  async publicKeyPem(issuer: string, kid: string, alg: string): Promise<string> {
    const keys = this.issuers.get(issuer);
    if (!keys) throw new KeyLookupError('issuer is not allowed');
    if (!KEY_TYPE_FOR_ALG[alg]) throw new KeyLookupError('token algorithm is not allowed');
    const now = Date.now();
    const listed = keys.set?.get(kid);
    if (listed && now - keys.fetchedAt < this.ttlMs) return this.toPem(listed, alg);
    // A key the last good set listed, while that set is not too old to fall back on.
    const fallback = listed && now - keys.fetchedAt < this.staleMaxAgeMs ? listed : undefined;
    // Right after a failed fetch, known keys are served without waiting on the JWKS again, so
    // an outage costs one timeout per cooldown rather than one per request.
    if (fallback && now - keys.lastFetchFailure < this.cooldownMs) return this.toPem(fallback, alg);
    if (!listed) this.guardUnknownKid(keys, kid);
    let set: Map<string, Jwk[]>;
    try {
      set = await this.fetchKeySet(keys);
    } catch {
      if (fallback) return this.toPem(fallback, alg);
      throw new KeyLookupError('could not fetch the issuer JWKS', true);
    }
    const found = set.get(kid);
    if (!found) {
      keys.knownMisses.set(kid, Date.now());
      throw new KeyLookupError('signing key not found in the issuer JWKS');
    }
    return this.toPem(found, alg);
  }

  /**
   * Fetches the issuer's whole JWKS, at most one fetch at a time: every lookup that needs it
   * meanwhile waits for the same answer.
   */
  private fetchKeySet(keys: IssuerKeys): Promise<Map<string, Jwk[]>> {
    keys.setFetch ??= this.loadKeySet(keys).finally(() => (keys.setFetch = null));
    return keys.setFetch;
  }

  private async loadKeySet(keys: IssuerKeys): Promise<Map<string, Jwk[]>> {
    let set: Map<string, Jwk[]>;
    try {
      // One deadline for discovery, the JWKS request and its body together: a server sending a
      // byte now and then would otherwise hold every lookup waiting on this fetch indefinitely.
      const deadline = AbortSignal.timeout(this.fetchTimeoutMs);
      const uri = keys.jwksUri ?? await discoverJwksUri(keys.issuer, this.dispatcher, deadline);
      const problem = keys.jwksUri ? null : discoveredJwksProblem(keys.issuer, uri);
      if (problem) throw new Error(problem);
      const res = await fetchOverHttpsIfAsked(uri, this.dispatcher, deadline, 'JWKS');
      if (!res.ok) {
        await res.body?.cancel().catch(() => undefined);
        throw new Error(`JWKS request failed with ${res.status}`);
      }
      const body = await readCappedJson(res, 'JWKS');
      // RFC 7517 makes "keys" required. An answer without it (a proxy's `{}`, a JSON `null`) is
      // treated as a failed fetch, so the last good set rides it out instead of being emptied.
      const listed = typeof body === 'object' && body !== null ? (body as { keys?: unknown }).keys : undefined;
      if (!Array.isArray(listed)) throw new Error('the JWKS answer is not a JSON object with a "keys" array');
      set = new Map();
      for (const jwk of listed) {
        if (typeof jwk !== 'object' || jwk === null || typeof (jwk as Jwk).kid !== 'string') continue;
        const kid = (jwk as Jwk).kid as string;
        set.set(kid, [...(set.get(kid) ?? []), jwk as Jwk]);
      }
    } catch (err) {
      keys.lastFetchFailure = Date.now();
      this.options.onFetchError?.(keys.issuer, err);
      throw err;
    }
    // An answer replaces the whole set: a key it no longer lists is gone, outage or not.
    keys.set = set;
    keys.fetchedAt = Date.now();
    keys.lastFetchFailure = 0;
    return set;
  }

  /** The PEM of the first of a kid's keys that fits the alg; a clear refusal when none does. */
  private toPem(candidates: Jwk[], alg: string): string {
    const jwk = candidates.find((key) => fits(key, alg));
    if (!jwk) {
      const forSignatures = candidates.some((key) => key.use === undefined || key.use === 'sig');
      throw new KeyLookupError(forSignatures ? 'signing key does not fit the token algorithm' : 'signing key is not meant for signatures');
    }
    let pem = this.pemCache.get(jwk);
    if (!pem) {
      try {
        pem = createPublicKey({ key: jwk as never, format: 'jwk' }).export({ type: 'spki', format: 'pem' }).toString();
      } catch {
        throw new KeyLookupError('signing key in the issuer JWKS is not usable');
      }
      this.pemCache.set(jwk, pem);
    }
    return pem;
  }

  // A flood of made-up kids must not become a flood of JWKS fetches: a kid the JWKS did not
  // list is refused for the cooldown, and each issuer has a small token bucket of cache-miss
  // fetches. A bucket rather than a fixed window: once a flood stops, a genuinely rotated key
  // (or the first token after a JWKS outage) gets a fetch within one refill interval. While a
  // flood goes on it can use up every refill, but each of those fetches caches the whole key
  // set, so a real key the JWKS lists is found in the cache rather than refused.
  private guardUnknownKid(keys: IssuerKeys, kid: string): void {
    const now = Date.now();
    const missedAt = keys.knownMisses.get(kid);
    if (missedAt !== undefined && now - missedAt < this.cooldownMs) {
      throw new KeyLookupError('signing key not found in the issuer JWKS');
    }
    if (keys.knownMisses.size > 1000) keys.knownMisses.clear();
    // Joining the fetch already in flight costs nothing.
    if (keys.setFetch) return;
    keys.missBudget = Math.min(this.missBurst, keys.missBudget + (now - keys.missBudgetAt) / this.missIntervalMs);
    keys.missBudgetAt = now;
    if (keys.missBudget < 1) {
      throw new KeyLookupError('signing key not found in the issuer JWKS (refetch cooling down)');
    }
    keys.missBudget -= 1;
  }

  async close(): Promise<void> {
    await this.dispatcher.close();
  }
}
