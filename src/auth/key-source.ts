import type { Dispatcher } from 'undici';

// Where an issuer's keys come from, over the network: OIDC discovery and the JWKS request, each
// hop of a redirect checked. Caching and choosing keys is keys.ts's.

// Redirects followed per key-source request: plenty for any IdP, few enough to end a loop soon.
const MAX_REDIRECTS = 5;
const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/**
 * The most a discovery document or key set may take. Real ones are a few kilobytes (tens with
 * x5c chains); without a cap, whatever an allow-listed issuer's endpoint sends within the fetch
 * deadline (hundreds of megabytes on loopback) was held, then parsed in one blocking step.
 */
export const MAX_KEY_DOCUMENT_BYTES = 1024 * 1024;

/** The answer's body as JSON, read no further than `limit` bytes; a longer one fails the fetch. */
export async function readCappedJson(res: Response, what: string, limit = MAX_KEY_DOCUMENT_BYTES): Promise<unknown> {
  const tooLarge = () => new Error(`the ${what} answer is larger than ${limit} bytes; refusing it`);
  if (Number(res.headers.get('content-length')) > limit) {
    await res.body?.cancel().catch(() => undefined);
    throw tooLarge();
  }
  const chunks: Uint8Array[] = [];
  let size = 0;
  if (res.body) {
    const reader = res.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > limit) {
        await reader.cancel().catch(() => undefined);
        throw tooLarge();
      }
      chunks.push(value);
    }
  }
  // TextDecoder drops a byte-order mark, as res.json() did.
  return JSON.parse(new TextDecoder().decode(Buffer.concat(chunks)));
}

/**
 * fetch would follow redirects, https to http included, and check nothing on the way: what an
 * https URL answers must not come over plain http at any hop, where anyone on the path could
 * change it (for discovery, choose the key set), even if the chain ends on https again. So
 * redirects are followed here, each hop checked.
 */
export async function fetchOverHttpsIfAsked(uri: string, dispatcher: Dispatcher, deadline: AbortSignal, what: string): Promise<Response> {
  const httpsOnly = new URL(uri).protocol === 'https:';
  let url = uri;
  for (let hops = 0; ; hops++) {
    const res = await fetch(url, { dispatcher, signal: deadline, redirect: 'manual' } as RequestInit);
    // The statuses fetch itself follows; a 300 or 304 with a Location is an answer.
    const location = REDIRECTS.has(res.status) ? res.headers.get('location') : null;
    if (location === null) return res;
    await res.body?.cancel().catch(() => undefined);
    if (hops >= MAX_REDIRECTS) throw new Error(`the ${what} request was redirected more than ${MAX_REDIRECTS} times`);
    url = new URL(location, url).href;
    // fetch itself would refuse any other scheme; a data: URL would carry its own answer.
    const { protocol, username, password } = new URL(url);
    if (protocol !== 'https:' && protocol !== 'http:') throw new Error(`the ${what} request was redirected to a ${protocol} URL; refusing it`);
    // fetch would refuse it and repeat the URL, password and all, in its error (and so the log).
    if (username || password) throw new Error(`the ${what} request was redirected to a URL with a user part; refusing it`);
    if (httpsOnly && protocol !== 'https:') {
      throw new Error(`the ${what} request was redirected from https to plain http; refusing its answer`);
    }
  }
}

/** The jwks_uri from the issuer's OIDC discovery document (OpenID Connect Discovery 1.0, 4). */
export async function discoverJwksUri(issuer: string, dispatcher: Dispatcher, deadline: AbortSignal): Promise<string> {
  const res = await fetchOverHttpsIfAsked(`${issuer.replace(/\/$/, '')}/.well-known/openid-configuration`, dispatcher, deadline, 'discovery');
  if (!res.ok) {
    await res.body?.cancel().catch(() => undefined);
    throw new Error(`discovery request failed with ${res.status}`);
  }
  const body = (await readCappedJson(res, 'discovery')) as { issuer?: unknown; jwks_uri?: unknown } | null;
  // OpenID Connect Discovery 1.0, 4.3: a document for another issuer (a proxy's, another
  // tenant's) must not choose this one's keys.
  if (body?.issuer !== issuer) {
    throw new Error(`the discovery document is for issuer ${JSON.stringify(body?.issuer ?? null)}, not ${JSON.stringify(issuer)}`);
  }
  if (typeof body.jwks_uri !== 'string') throw new Error('the discovery document names no jwks_uri');
  return body.jwks_uri;
}

/**
 * Why a jwks_uri that an issuer's discovery document names must not be fetched, or null. Only
 * BROKER_ISSUERS' own URLs were checked at start-up; this one comes over the network. Fetch would
 * take any scheme undici knows (a `data:` URL carries its own keys), and an https issuer naming a
 * plain-http key set would hand the root of trust to whoever sits on that path.
 */
export function discoveredJwksProblem(issuer: string, jwksUri: string): string | null {
  let url: URL;
  try {
    url = new URL(jwksUri);
  } catch {
    return `discovery for ${issuer} names a jwks_uri that is not a URL`;
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') return `discovery for ${issuer} names a jwks_uri with scheme ${url.protocol}; only https (or http, for an http issuer) is fetched`;
  if (url.protocol === 'http:' && new URL(issuer).protocol === 'https:') return `discovery for ${issuer} names a plain-http jwks_uri; an https issuer's keys must come over https`;
  // fetch refuses a URL with credentials, and would put them in its error message.
  if (url.username || url.password) return `discovery for ${issuer} names a jwks_uri with a user part, which is not fetched`;
  return null;
}
