import http from 'node:http';
import { listenHttp } from '../../src/dev/http-server.js';
import { KeyObject, randomUUID } from 'node:crypto';
import { exportJWK, exportSPKI, generateKeyPair, SignJWT, type JWK } from 'jose';

export interface TestIssuer {
  issuer: string;
  jwksUri: string;
  /** Request paths (with query) in arrival order, in every mode, so tests can count fetch attempts. */
  requests: string[];
  /**
   * 'down' answers 503; 'hang' never answers; 'drip' answers 200 and sends its body a byte at a
   * time, 10 per second, never finishing (close() ends all of them).
   */
  mode: 'ok' | 'down' | 'hang' | 'drip';
  sign(claims: Record<string, unknown>, opts?: SignOptions): Promise<string>;
  addKey(alg?: KeyAlg): Promise<string>;
  removeKey(kid: string): void;
  publicJwk(kid?: string): Record<string, unknown>;
  publicPem(kid?: string): string;
  close(): Promise<void>;
}

export interface SignOptions {
  kid?: string;
  /** Header alg; picks the current key of that alg, else the RS256 key. Any RS and PS alg works with
   *  an RSA key. 'HS256'/'HS384'/'HS512' sign with the key's public PEM as HMAC secret (the classic
   *  alg-confusion attack). For alg 'none' use unsignedToken(). */
  alg?: string;
  /** Merged over {alg, kid, typ}; set a field to undefined to leave it out (e.g. { kid: undefined }). */
  header?: Record<string, unknown>;
  /** Do not add iss/iat/exp. */
  omitDefaults?: boolean;
  /** Extension header names the signer should accept in a `crit` header (jose refuses unknown ones). */
  crit?: Record<string, boolean>;
}

type KeyAlg = 'RS256' | 'ES256';
// A KeyObject (not the WebCrypto key jose generates) lets an RSA key sign RS384/PS256 etc. too.
interface Key { kid: string; alg: KeyAlg; privateKey: KeyObject; jwk: JWK; pem: string; published: boolean }

/** A plain HTTP server on 127.0.0.1 whose open sockets (even mid-request) die with close(). */
async function listen(handler: http.RequestListener): Promise<{ url: string; close(): Promise<void> }> {
  const server = await listenHttp(handler);
  return { url: `http://127.0.0.1:${server.port}`, close: server.close };
}

function json(res: http.ServerResponse, status: number, body: unknown): void {
  const payload = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) });
  res.end(payload);
}

/**
 * `jwksUriFor`: the jwks_uri its discovery document names, from its base URL (default `${base}/jwks`).
 * `path`: an issuer identifier with a path, as a self-managed GitLab under a relative URL root
 * (`/gitlab`) has: the issuer, its discovery document and its JWKS all live under it, and the
 * server's root answers 404, as another application on the same host would.
 */
export async function startIssuer(opts: { discovery?: boolean; jwksUriFor?: (base: string, jwks: unknown) => string; path?: string } = {}): Promise<TestIssuer> {
  const discovery = opts.discovery ?? true;
  const prefix = opts.path ?? '';
  const keys = new Map<string, Key>();
  const current: Partial<Record<KeyAlg, string>> = {};

  const keyFor = (kid?: string): Key => {
    const k = keys.get(kid ?? current.RS256 ?? '');
    if (!k) throw new Error(`test issuer: unknown kid ${kid}`);
    return k;
  };
  const publicJwk = (kid?: string) => {
    const k = keyFor(kid);
    return { ...k.jwk, kid: k.kid, alg: k.alg, use: 'sig' };
  };

  let base = '';
  const srv = await listen((req, res) => {
    const url = req.url ?? '/';
    issuer.requests.push(url);
    if (issuer.mode === 'hang') return; // leave the socket open without answering
    if (issuer.mode === 'down') return json(res, 503, { error: 'unavailable' });
    if (issuer.mode === 'drip') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.write('{"keys":[');
      const drip = setInterval(() => res.write(' '), 100);
      res.on('close', () => clearInterval(drip));
      return;
    }
    const full = url.split('?')[0];
    if (!full.startsWith(`${prefix}/`)) return json(res, 404, { error: 'not found' });
    const route = full.slice(prefix.length);
    if (route === '/jwks') {
      return json(res, 200, { keys: [...keys.values()].filter((k) => k.published).map((k) => publicJwk(k.kid)) });
    }
    if (discovery && route === '/.well-known/openid-configuration') {
      const jwks = { keys: [...keys.values()].filter((k) => k.published).map((k) => publicJwk(k.kid)) };
      const jwksUri = opts.jwksUriFor?.(base, jwks) ?? `${base}/jwks`;
      return json(res, 200, { issuer: base, jwks_uri: jwksUri, id_token_signing_alg_values_supported: ['RS256', 'ES256'] });
    }
    json(res, 404, { error: 'not found' });
  });
  base = `${srv.url}${prefix}`;

  const issuer: TestIssuer = {
    issuer: base,
    jwksUri: `${base}/jwks`,
    requests: [],
    mode: 'ok',
    async addKey(alg: KeyAlg = 'RS256') {
      const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
      const kid = `${alg.toLowerCase()}-${randomUUID().slice(0, 8)}`;
      keys.set(kid, { kid, alg, privateKey: KeyObject.from(privateKey), jwk: await exportJWK(publicKey), pem: await exportSPKI(publicKey), published: true });
      current[alg] = kid;
      return kid;
    },
    removeKey(kid) {
      keyFor(kid).published = false;
    },
    publicJwk,
    publicPem: (kid) => keyFor(kid).pem,
    async sign(claims, o = {}) {
      const wanted = o.alg ?? 'RS256';
      const key = keyFor(o.kid ?? current[wanted as KeyAlg] ?? current.RS256);
      const alg = o.alg ?? key.alg;
      const now = Math.floor(Date.now() / 1000);
      const payload = o.omitDefaults ? { ...claims } : { iss: base, iat: now, exp: now + 300, ...claims };
      const header = { alg, kid: key.kid, typ: 'JWT', ...o.header } as { alg: string };
      const secret = alg.startsWith('HS') ? new TextEncoder().encode(key.pem) : key.privateKey;
      return new SignJWT(payload).setProtectedHeader(header).sign(secret, o.crit ? { crit: o.crit } : undefined);
    },
    close: () => srv.close(),
  };
  await issuer.addKey('RS256');
  await issuer.addKey('ES256');
  return issuer;
}

/** An "unlisted host": records every request and answers 200 {}, to prove nobody fetched from it. */
export async function startCountingServer(): Promise<{ url: string; requests: string[]; close(): Promise<void> }> {
  const requests: string[] = [];
  const srv = await listen((req, res) => {
    requests.push(req.url ?? '/');
    json(res, 200, {});
  });
  return { url: srv.url, requests, close: srv.close };
}

/** A compact JWS with arbitrary header/payload and a given (default empty) signature, e.g. alg:none. */
export function unsignedToken(header: object, payload: object, signature = ''): string {
  const b64 = (o: object) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${b64(header)}.${b64(payload)}.${signature}`;
}

/**
 * A key pair that no configured issuer publishes: what an attacker signs with when they point
 * jku/x5u at their own server or embed their public key in the header.
 */
export async function foreignSigner(alg: KeyAlg = 'RS256'): Promise<{
  kid: string;
  publicJwk: Record<string, unknown>;
  sign(header: Record<string, unknown>, payload: Record<string, unknown>): Promise<string>;
}> {
  const { privateKey, publicKey } = await generateKeyPair(alg, { extractable: true });
  const kid = `foreign-${randomUUID().slice(0, 8)}`;
  const publicJwk = { ...(await exportJWK(publicKey)), kid, alg, use: 'sig' };
  return {
    kid,
    publicJwk,
    sign: (header, payload) => new SignJWT(payload).setProtectedHeader({ alg, kid, typ: 'JWT', ...header } as { alg: string }).sign(privateKey),
  };
}

/** HMAC-signs a token with any secret text, e.g. a public key as JWK JSON (alg confusion). */
export function hmacToken(alg: 'HS256' | 'HS384' | 'HS512', header: Record<string, unknown>, payload: Record<string, unknown>, secret: string): Promise<string> {
  return new SignJWT(payload).setProtectedHeader({ typ: 'JWT', ...header, alg }).sign(new TextEncoder().encode(secret));
}
