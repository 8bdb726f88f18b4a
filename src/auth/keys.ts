import { createPublicKey } from 'node:crypto';
import buildGetJwks from 'get-jwks';
import { Agent } from 'undici';
import type { IssuerConfig } from '../config.js';

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
  onFetchError?: (issuer: string) => void;
}

const KNOWN_KEYS_PER_ISSUER = 100;

type GetJwks = ReturnType<typeof buildGetJwks>;
type Jwk = Record<string, unknown>;

interface KnownKey {
  pem: string;
  confirmedAt: number;
}

interface IssuerKeys {
  issuer: string;
  jwks: GetJwks;
  domain: string;
  /** The explicit jwks_uri; without one, OIDC discovery on the issuer finds it. */
  jwksUri: string | null;
  /** The one JWKS fetch in flight for this issuer, which every cache miss meanwhile shares. */
  setFetch: Promise<Jwk[]> | null;
  /** Token bucket for cache-miss fetches. */
  missBudget: number;
  missBudgetAt: number;
  knownMisses: Map<string, number>;
  /** The last copy of each (alg, kid) the JWKS served, for riding out a JWKS outage. */
  known: Map<string, KnownKey>;
  lastFetchFailure: number;
}

/** A JWKS that answered but does not list the key: unlike a failed fetch, this ends its use. */
class DefinitiveMiss extends Error {}

/**
 * Finds the public key for a token's (iss, kid, alg). The issuer must be allow-listed before
 * anything is fetched; each issuer gets its own get-jwks instance so an explicit jwks_uri on
 * another host still works, and its allow-list names only that one location.
 *
 * Cache semantics: every key of a fetched set is kept for cacheTtlMs (in get-jwks' cache, which
 * also does OIDC discovery; the set itself is fetched here), so a key the issuer unpublishes
 * keeps verifying until then. Past that, the JWKS is asked again: if it answers without the key,
 * the key is refused from then on; if it cannot be reached, the last copy is used (up to
 * staleKeyMaxAgeMs) so an IdP outage does not lock out tokens signed with keys we already know.
 */
export class KeyResolver {
  private readonly issuers = new Map<string, IssuerKeys>();
  // PEM conversion costs more than a verification; convert each JWK object once.
  private readonly pemCache = new WeakMap<object, string>();
  private readonly cooldownMs: number;
  private readonly missBurst: number;
  private readonly missIntervalMs: number;
  private readonly staleMaxAgeMs: number;
  readonly dispatcher: Agent;

  constructor(entries: IssuerConfig[], private readonly options: KeyResolverOptions = {}) {
    const timeout = options.fetchTimeoutMs ?? 3000;
    // The global fetch ignores get-jwks' timeout option; an Agent with its own timeouts does not.
    this.dispatcher = new Agent({ connectTimeout: timeout, headersTimeout: timeout, bodyTimeout: timeout });
    this.cooldownMs = options.unknownKidCooldownMs ?? 5000;
    this.missBurst = options.missFetchBurst ?? 5;
    this.missIntervalMs = options.missFetchIntervalMs ?? 1000;
    this.staleMaxAgeMs = options.staleKeyMaxAgeMs ?? 24 * 60 * 60_000;
    for (const entry of entries) this.issuers.set(entry.issuer, this.build(entry));
  }

  private build(entry: IssuerConfig): IssuerKeys {
    const fetchOptions = { dispatcher: this.dispatcher } as Record<string, unknown>;
    // Each fetch caches every key of the set, under each algorithm it may serve: room for a few
    // dozen keys.
    const common = { ttl: this.options.cacheTtlMs ?? 10 * 60_000, max: 500, fetchOptions };
    const state = {
      issuer: entry.issuer, setFetch: null, missBudget: this.missBurst, missBudgetAt: Date.now(), knownMisses: new Map<string, number>(),
      known: new Map<string, KnownKey>(), lastFetchFailure: 0,
    };
    if (entry.jwks_uri) {
      const url = new URL(entry.jwks_uri);
      const domain = `${url.protocol}//${url.host}`;
      return { jwks: buildGetJwks({ ...common, issuersWhitelist: [domain] }), domain, jwksUri: entry.jwks_uri, ...state };
    }
    return { jwks: buildGetJwks({ ...common, issuersWhitelist: [entry.issuer], providerDiscovery: true }), domain: entry.issuer, jwksUri: null, ...state };
  }

  isAllowed(issuer: unknown): issuer is string {
    return typeof issuer === 'string' && this.issuers.has(issuer);
  }

  async publicKeyPem(issuer: string, kid: string, alg: string): Promise<string> {
    const keys = this.issuers.get(issuer);
    if (!keys) throw new KeyLookupError('issuer is not allowed');
    if (!KEY_TYPE_FOR_ALG[alg]) throw new KeyLookupError('token algorithm is not allowed');
    const cacheKey = this.cacheKey(keys, alg, kid);
    const cached = keys.jwks.cache.get(cacheKey) as Jwk | undefined;
    if (cached) return this.toPem(cached, alg);
    const known = keys.known.get(cacheKey);
    // Right after a failed fetch, known keys are served without waiting on the JWKS again, so
    // an outage costs one timeout per cooldown rather than one per request.
    if (known && Date.now() - keys.lastFetchFailure < this.cooldownMs && this.fresh(known)) return known.pem;
    if (!known) this.guardUnknownKid(keys, kid);
    let jwk: Jwk;
    try {
      jwk = this.pick(await this.fetchKeySet(keys), alg, kid);
    } catch (err) {
      if (err instanceof DefinitiveMiss) {
        keys.known.delete(cacheKey);
        keys.knownMisses.set(kid, Date.now());
        throw new KeyLookupError('signing key not found in the issuer JWKS');
      }
      // A key we knew keeps verifying through the outage; no stale copy outlives a JWKS that
      // answered without it (the branch above).
      if (known && this.fresh(known)) return known.pem;
      throw new KeyLookupError('could not fetch the issuer JWKS', true);
    }
    const pem = this.toPem(jwk, alg);
    keys.known.delete(cacheKey);
    keys.known.set(cacheKey, { pem, confirmedAt: Date.now() });
    if (keys.known.size > KNOWN_KEYS_PER_ISSUER) keys.known.delete(keys.known.keys().next().value!);
    return pem;
  }

  private cacheKey(keys: IssuerKeys, alg: string, kid: string): string {
    return keys.jwks.generateCacheKey(alg, kid, keys.domain.endsWith('/') ? keys.domain : `${keys.domain}/`);
  }

  private pick(set: Jwk[], alg: string, kid: string): Jwk {
    const jwk = set.find((key) => key.kid === kid && (key.alg === undefined || key.alg === alg));
    if (!jwk) throw new DefinitiveMiss();
    return jwk;
  }

  /**
   * Fetches the issuer's whole JWKS, at most one fetch at a time, and caches every key in it.
   * Caching the whole set is what keeps a flood of made-up kids from locking out real ones: the
   * flood's own fetches bring in a rotated key (or, after a restart, every key) for the tokens
   * that need it, instead of spending the fetch budget on one kid each.
   */
  private fetchKeySet(keys: IssuerKeys): Promise<Jwk[]> {
    keys.setFetch ??= this.loadKeySet(keys).finally(() => (keys.setFetch = null));
    return keys.setFetch;
  }

  private async loadKeySet(keys: IssuerKeys): Promise<Jwk[]> {
    try {
      const uri = keys.jwksUri ?? await keys.jwks.getJwksUri(`${keys.issuer.replace(/\/$/, '')}/`);
      const res = await fetch(uri, { dispatcher: this.dispatcher } as RequestInit);
      const body = (await res.json()) as { keys?: unknown };
      if (!res.ok) throw new Error(`JWKS request failed with ${res.status}`);
      if (!Array.isArray(body.keys) || body.keys.length === 0) throw new DefinitiveMiss();
      const set = body.keys.filter((k): k is Jwk => typeof k === 'object' && k !== null && typeof (k as Jwk).kid === 'string');
      for (const jwk of set) {
        for (const alg of Object.keys(KEY_TYPE_FOR_ALG)) {
          if (jwk.alg === undefined || jwk.alg === alg) keys.jwks.cache.set(this.cacheKey(keys, alg, jwk.kid as string), jwk as never);
        }
      }
      keys.lastFetchFailure = 0;
      return set;
    } catch (err) {
      if (!(err instanceof DefinitiveMiss)) {
        keys.lastFetchFailure = Date.now();
        this.options.onFetchError?.(keys.issuer);
      }
      throw err;
    }
  }

  private fresh(known: KnownKey): boolean {
    return Date.now() - known.confirmedAt < this.staleMaxAgeMs;
  }

  private toPem(jwk: Record<string, unknown>, alg: string): string {
    const wanted = KEY_TYPE_FOR_ALG[alg];
    if (jwk.kty !== wanted.kty || (wanted.crv && !wanted.crv.includes(jwk.crv as string))) {
      throw new KeyLookupError('signing key does not fit the token algorithm');
    }
    if (jwk.use !== undefined && jwk.use !== 'sig') throw new KeyLookupError('signing key is not meant for signatures');
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
