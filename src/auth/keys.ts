import { createPublicKey } from 'node:crypto';
import buildGetJwks from 'get-jwks';
import { Agent } from 'undici';
import type { IssuerConfig } from '../config.js';

// Asymmetric algorithms only: an HMAC alg would let anyone holding the public key forge tokens.
export const ALLOWED_ALGORITHMS = ['RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', 'ES256', 'ES384', 'ES512', 'EdDSA'];

export class KeyLookupError extends Error {
  constructor(message: string, readonly fetchFailed = false) {
    super(message);
    this.name = 'KeyLookupError';
  }
}

export interface KeyResolverOptions {
  /** Cache lifetime for fetched keys; an unknown kid refetches sooner. */
  cacheTtlMs?: number;
  /** Minimum gap between JWKS fetches caused by unknown kids, per issuer. */
  unknownKidCooldownMs?: number;
  fetchTimeoutMs?: number;
  onFetchError?: (issuer: string) => void;
}

const MISS_FETCHES_PER_WINDOW = 5;

type GetJwks = ReturnType<typeof buildGetJwks>;

interface IssuerKeys {
  jwks: GetJwks;
  domain: string;
  windowStart: number;
  missFetches: number;
  knownMisses: Map<string, number>;
}

/**
 * Finds the public key for a token's (iss, kid, alg). The issuer must be allow-listed before
 * anything is fetched; each issuer gets its own get-jwks instance so an explicit jwks_uri on
 * another host still works, and its allow-list names only that one location.
 */
export class KeyResolver {
  private readonly issuers = new Map<string, IssuerKeys>();
  // PEM conversion of EC keys is slow in get-jwks; convert each JWK object once.
  private readonly pemCache = new WeakMap<object, string>();
  private readonly cooldownMs: number;
  readonly dispatcher: Agent;

  constructor(entries: IssuerConfig[], private readonly options: KeyResolverOptions = {}) {
    const timeout = options.fetchTimeoutMs ?? 3000;
    // The global fetch ignores get-jwks' timeout option; an Agent with its own timeouts does not.
    this.dispatcher = new Agent({ connectTimeout: timeout, headersTimeout: timeout, bodyTimeout: timeout });
    this.cooldownMs = options.unknownKidCooldownMs ?? 5000;
    for (const entry of entries) this.issuers.set(entry.issuer, this.build(entry));
  }

  private build(entry: IssuerConfig): IssuerKeys {
    const fetchOptions = { dispatcher: this.dispatcher } as Record<string, unknown>;
    const common = { ttl: this.options.cacheTtlMs ?? 10 * 60_000, max: 50, fetchOptions };
    if (entry.jwks_uri) {
      const url = new URL(entry.jwks_uri);
      const domain = `${url.protocol}//${url.host}`;
      const jwksPath = `${url.pathname}${url.search}`;
      return {
        jwks: buildGetJwks({ ...common, issuersWhitelist: [domain], jwksPath }),
        domain,
        windowStart: 0,
        missFetches: 0,
        knownMisses: new Map(),
      };
    }
    return {
      jwks: buildGetJwks({ ...common, issuersWhitelist: [entry.issuer], providerDiscovery: true }),
      domain: entry.issuer,
      windowStart: 0,
      missFetches: 0,
      knownMisses: new Map(),
    };
  }

  isAllowed(issuer: unknown): issuer is string {
    return typeof issuer === 'string' && this.issuers.has(issuer);
  }

  async publicKeyPem(issuer: string, kid: string, alg: string): Promise<string> {
    const keys = this.issuers.get(issuer);
    if (!keys) throw new KeyLookupError('issuer is not allowed');
    const cacheKey = keys.jwks.generateCacheKey(alg, kid, keys.domain.endsWith('/') ? keys.domain : `${keys.domain}/`);
    const cached = keys.jwks.cache.get(cacheKey) !== undefined || keys.jwks.staleCache.get(cacheKey) !== undefined;
    if (!cached) this.guardUnknownKid(keys, kid);
    let jwk: Record<string, unknown>;
    try {
      jwk = (await keys.jwks.getJwk({ domain: keys.domain, alg, kid })) as Record<string, unknown>;
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (code === 'JWK_NOT_FOUND' || code === 'NO_JWKS') {
        keys.knownMisses.set(kid, Date.now());
        throw new KeyLookupError('signing key not found in the issuer JWKS');
      }
      this.options.onFetchError?.(issuer);
      throw new KeyLookupError('could not fetch the issuer JWKS', true);
    }
    let pem = this.pemCache.get(jwk);
    if (!pem) {
      pem = createPublicKey({ key: jwk as never, format: 'jwk' }).export({ type: 'spki', format: 'pem' }).toString();
      this.pemCache.set(jwk, pem);
    }
    return pem;
  }

  // A flood of made-up kids must not become a flood of JWKS fetches: a kid already seen
  // missing is refused for the cooldown, and each issuer allows only a few cache-miss fetches
  // per cooldown window. A genuinely rotated key is still picked up within one window.
  private guardUnknownKid(keys: IssuerKeys, kid: string): void {
    const now = Date.now();
    const missedAt = keys.knownMisses.get(kid);
    if (missedAt !== undefined && now - missedAt < this.cooldownMs) {
      throw new KeyLookupError('signing key not found in the issuer JWKS');
    }
    if (keys.knownMisses.size > 1000) keys.knownMisses.clear();
    if (now - keys.windowStart >= this.cooldownMs) {
      keys.windowStart = now;
      keys.missFetches = 0;
    }
    if (keys.missFetches >= MISS_FETCHES_PER_WINDOW) {
      throw new KeyLookupError('signing key not found in the issuer JWKS (refetch cooling down)');
    }
    keys.missFetches += 1;
  }

  async close(): Promise<void> {
    await this.dispatcher.close();
  }
}
