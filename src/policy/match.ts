/**
 * Claim matching for policies and BROKER_ADMINS entries. Pure: no I/O, no Fastify.
 *
 * Globs are matched by hand rather than compiled to RegExp. The only special character is `*`,
 * and a segment-by-segment scan keeps the cost linear-ish for any pattern, whereas a naive
 * regex translation of `*a*a*a*b` backtracks catastrophically on long claim values (claims come
 * from tokens, i.e. from the caller).
 */

import type { Static } from '@sinclair/typebox';
import type { ClaimPatternsSchema } from '../schemas/common.js';
import type { FailedClaim as FailedClaimSchema } from '../schemas/policy.js';

// The shapes the API shows (PUT /policies, POST /policies/evaluate); the schemas are their one definition.
export type ClaimPatterns = Static<typeof ClaimPatternsSchema>;
/** One failing claim; `value` is what the token holds there, null for a missing claim. */
export type FailedClaim = Static<typeof FailedClaimSchema>;

const MAX_PATTERN_LENGTH = 1024;

/**
 * Anchored, case-sensitive; `*` matches any run of characters, including empty, `/` and `:`.
 * Literal segments between stars are placed at their leftmost possible position: placing a
 * segment earlier never leaves less room for the ones after it, so greedy is also complete.
 */
export function globMatch(pattern: string, value: string): boolean {
  const segments = pattern.split('*');
  if (segments.length === 1) return pattern === value;

  const head = segments[0];
  const tail = segments[segments.length - 1];
  if (head.length + tail.length > value.length) return false;
  if (!value.startsWith(head) || !value.endsWith(tail)) return false;

  let position = head.length;
  const limit = value.length - tail.length;
  for (let i = 1; i < segments.length - 1; i++) {
    const segment = segments[i];
    if (segment === '') continue;
    const found = value.indexOf(segment, position);
    if (found === -1 || found + segment.length > limit) return false;
    position = found + segment.length;
  }
  return true;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

// Own properties only: a key like `constructor` or `/__proto__/...` must not reach the prototype.
function ownProperty(object: Record<string, unknown>, key: string): unknown {
  return Object.hasOwn(object, key) ? object[key] : undefined;
}

/** RFC 6901 reference tokens, or null when a `~` is not followed by 0 or 1. */
function pointerTokens(pointer: string): string[] | null {
  const tokens = pointer.slice(1).split('/');
  if (tokens.some((token) => /~(?![01])/.test(token))) return null;
  // One pass, so `~01` becomes `~1` and not `/`.
  return tokens.map((token) => token.replace(/~[01]/g, (escape) => (escape === '~0' ? '~' : '/')));
}

const ARRAY_INDEX = /^(?:0|[1-9][0-9]*)$/;

/**
 * A key starting with `/` is a JSON pointer (so `/kubernetes.io/namespace` walks into the
 * `kubernetes.io` object rather than splitting on dots); any other key names a top-level claim
 * verbatim. A top-level claim whose name starts with `/` is reachable as `/~1name`.
 */
export function readClaim(claims: Record<string, unknown>, key: string): unknown {
  if (!isPlainObject(claims)) return undefined;
  if (!key.startsWith('/')) return ownProperty(claims, key);

  const tokens = pointerTokens(key);
  if (tokens === null) return undefined;
  let current: unknown = claims;
  for (const token of tokens) {
    if (Array.isArray(current)) {
      if (!ARRAY_INDEX.test(token)) return undefined;
      const index = Number(token);
      if (index >= current.length) return undefined;
      current = current[index];
    } else if (isPlainObject(current)) {
      current = ownProperty(current, token);
    } else {
      return undefined;
    }
  }
  return current;
}

/** The text a scalar claim is matched as, or null for values that never match. */
function scalarText(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  // Non-finite numbers cannot come from JSON, and JSON.stringify would render them as `null`.
  // An integer beyond 2^53 was rounded when the token was parsed: its text is lost, and the
  // rounded one is shared by its neighbours (…993 reads as …992), so it matches nothing.
  if (typeof value === 'number') return Number.isFinite(value) && !(Number.isInteger(value) && !Number.isSafeInteger(value)) ? JSON.stringify(value) : null;
  return null;
}

function patternList(patterns: string | string[]): string[] {
  return typeof patterns === 'string' ? [patterns] : Array.isArray(patterns) ? patterns : [];
}

/**
 * Any pattern against any element. Non-string patterns and an empty list match nothing, so a
 * policy that slipped past validation fails closed.
 */
export function claimMatches(patterns: string | string[], value: unknown): boolean {
  const list = patternList(patterns);
  const candidates = Array.isArray(value) ? value : [value];
  for (const candidate of candidates) {
    const text = scalarText(candidate);
    if (text === null) continue;
    if (list.some((pattern) => typeof pattern === 'string' && globMatch(pattern, text))) return true;
  }
  return false;
}

/**
 * Every failing claim, in the order of the keys of `patterns` (Object.keys order), so a caller
 * can explain all reasons at once; [] means admitted.
 *
 * Throws on an empty pattern object: "all of no conditions" would admit every token, and that
 * must never happen silently even if validatePatterns was skipped.
 */
export function matchClaims(patterns: ClaimPatterns, claims: Record<string, unknown>): FailedClaim[] {
  const keys = isPlainObject(patterns) ? Object.keys(patterns) : [];
  if (keys.length === 0) throw new TypeError('a policy must bind at least one claim');

  const failed: FailedClaim[] = [];
  for (const key of keys) {
    const value = readClaim(claims, key);
    if (!claimMatches(patterns[key], value)) {
      failed.push({ claim: key, patterns: [...patternList(patterns[key])], value: value ?? null });
    }
  }
  return failed;
}

const REGISTERED_CLAIMS = new Set(['iss', 'aud', 'exp', 'nbf', 'iat']);

/** null when the patterns are acceptable; otherwise a reason fit to show the policy's author. */
export function validatePatterns(patterns: ClaimPatterns): string | null {
  if (!isPlainObject(patterns)) return 'claims must be an object mapping claim names to patterns';
  const keys = Object.keys(patterns);
  if (keys.length === 0) return 'a policy must bind at least one claim';

  for (const key of keys) {
    const label = JSON.stringify(key);
    if (key === '') return 'a claim name must not be empty';
    // No claim any issuer sends is named with a space at an end; such a rule could never match.
    if (key.trim() !== key) return `claim name ${label} has a space at one end`;
    if (key.startsWith('/') && pointerTokens(key) === null) {
      return `claim ${label} is not a valid JSON pointer: "~" must be followed by "0" or "1"`;
    }
    const value: unknown = patterns[key];
    const list: unknown = typeof value === 'string' ? [value] : value;
    if (!Array.isArray(list)) return `claim ${label} must map to a pattern or a list of patterns`;
    if (list.length === 0) return `claim ${label} needs at least one pattern`;
    for (const pattern of list) {
      if (typeof pattern !== 'string') return `every pattern for claim ${label} must be a string`;
      if (pattern.length > MAX_PATTERN_LENGTH) {
        return `a pattern for claim ${label} is longer than ${MAX_PATTERN_LENGTH} characters`;
      }
    }
  }
  // With a public issuer (anyone can get a GitHub Actions token with any audience) a rule that
  // only asks for claims every token carries lets in the whole world. The registered claims do
  // not narrow: iss is the issuer's own, aud the broker's, and the times say nothing of who.
  // Judged by the top-level claim a key reads: `/iss` and `/aud/0` read iss and aud too.
  const topLevel = (key: string) => (key.startsWith('/') ? pointerTokens(key)?.[0] ?? key : key);
  const narrows = (key: string) => !REGISTERED_CLAIMS.has(topLevel(key)) && !patternList(patterns[key]).some((pattern) => /^\*+$/.test(pattern));
  if (!keys.some(narrows)) {
    return 'no claim narrows the match (each is "*", or one of iss, aud, exp, nbf, iat), so every token of the issuer would match: bind a claim such as sub or repository';
  }
  return null;
}
