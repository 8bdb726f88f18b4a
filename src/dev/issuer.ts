import type http from 'node:http';
import { randomUUID } from 'node:crypto';
import { exportJWK, generateKeyPair, SignJWT, type JWK } from 'jose';
import { listenHttp } from './http-server.js';

/**
 * DEVELOPMENT ONLY. A tiny OIDC issuer for `pg-broker dev`, `demo` and the compose file: it
 * serves discovery and a JWKS, and mints a signed token for whatever claims it is asked for.
 * Anyone who can reach it can become anyone, so it binds to 127.0.0.1 unless told otherwise and
 * `serve` never starts it.
 */
export interface DevIssuer {
  issuer: string;
  jwksUri: string;
  mint(claims: Record<string, unknown>, ttlSeconds?: number): Promise<string>;
  close(): Promise<void>;
}

export const DEV_ISSUER_BANNER = 'DEVELOPMENT-ONLY token issuer: it signs any claims it is asked for. Never expose it.';

export interface DevIssuerOptions {
  host?: string;
  port?: number;
  /** The iss value and base of the URLs it publishes; defaults to http://<host>:<port>. */
  publicUrl?: string;
  audience?: string;
}

const MAX_BODY = 64 * 1024;

export async function startDevIssuer(options: DevIssuerOptions = {}): Promise<DevIssuer> {
  const host = options.host ?? '127.0.0.1';
  const { privateKey, publicKey } = await generateKeyPair('ES256', { extractable: true });
  const kid = `dev-${randomUUID().slice(0, 8)}`;
  const jwk: JWK = { ...(await exportJWK(publicKey)), kid, alg: 'ES256', use: 'sig' };
  let base = '';

  const mint = async (claims: Record<string, unknown>, ttlSeconds = 600): Promise<string> => {
    const now = Math.floor(Date.now() / 1000);
    const payload = { iss: base, aud: options.audience ?? 'pg-broker', iat: now, nbf: now, exp: now + ttlSeconds, ...claims };
    return new SignJWT(payload).setProtectedHeader({ alg: 'ES256', kid, typ: 'JWT' }).sign(privateKey);
  };

  const send = (res: http.ServerResponse, status: number, body: unknown) => {
    const text = JSON.stringify(body);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text), 'cache-control': 'no-store' });
    res.end(text);
  };

  const server = await listenHttp((req: http.IncomingMessage, res: http.ServerResponse) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method === 'GET' && path === '/.well-known/openid-configuration') {
      return send(res, 200, { issuer: base, jwks_uri: `${under(base)}/jwks`, token_endpoint: `${under(base)}/token`, id_token_signing_alg_values_supported: ['ES256'] });
    }
    if (req.method === 'GET' && path === '/jwks') return send(res, 200, { keys: [jwk] });
    if (req.method === 'POST' && path === '/token') {
      let body = '';
      req.setEncoding('utf8');
      req.on('data', (chunk: string) => {
        body += chunk;
        if (body.length > MAX_BODY) req.destroy();
      });
      req.on('end', () => {
        let claims: unknown;
        try {
          claims = body ? JSON.parse(body) : {};
        } catch {
          return send(res, 400, { error: 'body must be a JSON object of claims' });
        }
        if (!claims || typeof claims !== 'object' || Array.isArray(claims)) return send(res, 400, { error: 'body must be a JSON object of claims' });
        const { ttl, ...rest } = claims as Record<string, unknown>;
        mint(rest, typeof ttl === 'number' ? ttl : undefined).then(
          (token) => send(res, 200, { access_token: token, id_token: token, token_type: 'Bearer', value: token }),
          () => send(res, 500, { error: 'could not sign' }),
        );
      });
      return;
    }
    send(res, 404, { error: 'not found' });
  }, host, options.port ?? 0);
  const { port } = server;
  // The issuer as given (tokens' iss must match BROKER_ISSUERS exactly); URLs under it without a doubled slash.
  base = options.publicUrl ?? `http://${host.includes(':') ? `[${host}]` : host}:${port}`;
  return {
    issuer: base,
    jwksUri: `${under(base)}/jwks`,
    mint,
    close: server.close,
  };
}

const under = (base: string) => base.replace(/\/+$/, '');
