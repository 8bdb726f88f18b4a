import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { isIPv4 } from 'node:net';
import { httpDateMs, readServerClock, type ServerClockReading } from './renew-schedule.js';

/** A CLI failure: printed as one line, exit code 1 (or `exitCode`). */
export class CliError extends Error {
  /**
   * `status` and `code`: the broker's HTTP status and problem code, when it answered with an error;
   * `retryAfterSeconds`: how long its Retry-After header said to wait, when it sent a readable one.
   */
  constructor(message: string, readonly exitCode = 1, readonly status?: number, readonly code?: string, readonly retryAfterSeconds?: number) {
    super(message);
    this.name = 'CliError';
  }
}

export const DEFAULT_BROKER_URL = 'http://127.0.0.1:8080';
export const KUBERNETES_TOKEN_FILE = '/var/run/secrets/kubernetes.io/serviceaccount/token';

export interface TokenOptions {
  token?: string;
  tokenFile?: string;
  audience?: string;
}

type Env = Record<string, string | undefined>;

/**
 * Where a token comes from, first match wins: --token, --token-file, $PG_BROKER_TOKEN,
 * $PG_BROKER_TOKEN_FILE, the GitHub Actions OIDC runtime, the Kubernetes service-account file.
 */
export async function obtainToken(opts: TokenOptions, env: Env = process.env): Promise<string> {
  const { token, source } = await tokenFromSources(opts, env);
  return bareToken(token, source);
}

async function tokenFromSources(opts: TokenOptions, env: Env): Promise<{ token: string; source: string }> {
  if (opts.token) return { token: opts.token.trim(), source: '--token' };
  if (opts.tokenFile === undefined && env.PG_BROKER_TOKEN !== undefined) return { token: setVariable(env, 'PG_BROKER_TOKEN'), source: 'PG_BROKER_TOKEN' };
  const file = opts.tokenFile ?? (env.PG_BROKER_TOKEN_FILE === undefined ? undefined : setVariable(env, 'PG_BROKER_TOKEN_FILE'));
  if (file) return { token: await readTokenFile(file, opts.tokenFile === undefined ? 'PG_BROKER_TOKEN_FILE' : '--token-file'), source: `token file ${file}` };
  if (env.ACTIONS_ID_TOKEN_REQUEST_URL && env.ACTIONS_ID_TOKEN_REQUEST_TOKEN) {
    const token = await githubActionsToken(env.ACTIONS_ID_TOKEN_REQUEST_URL, env.ACTIONS_ID_TOKEN_REQUEST_TOKEN, opts.audience ?? 'pg-broker');
    return { token: token.trim(), source: 'the GitHub Actions token' };
  }
  // GitLab sets GITLAB_CI in every job. Its token is only where the job's id_tokens: entry puts
  // it, so a job without one is told that, rather than about GitHub or a projected
  // service-account token (the Kubernetes executor's pods have the automounted one).
  const inGitLab = env.GITLAB_CI === 'true';
  if (existsSync(KUBERNETES_TOKEN_FILE)) {
    const token = await readTokenFile(KUBERNETES_TOKEN_FILE);
    refuseOtherAudience(token, opts.audience ?? 'pg-broker', inGitLab);
    return { token, source: `token file ${KUBERNETES_TOKEN_FILE}` };
  }
  if (inGitLab) throw new CliError(`no token: ${gitlabTokenHint(opts.audience ?? 'pg-broker')}, or pass --token or --token-file`);
  throw new CliError('no token: pass --token or --token-file, set PG_BROKER_TOKEN or PG_BROKER_TOKEN_FILE, or run in GitHub Actions with "permissions: id-token: write"');
}

const gitlabTokenHint = (audience: string) => `in GitLab CI, give the job an id_tokens: entry named PG_BROKER_TOKEN with aud: ${audience}`;

/**
 * The automounted service-account token is the pod's key to the Kubernetes API (its audience is
 * the API server's). Sent to the broker, it would be refused for its audience, after the broker
 * (and anything on the way, over plain http) had seen it. It is used only when it names the
 * broker's audience, as a projected token can; the payload is read, not verified: the broker
 * verifies it. `inGitLab`: in a GitLab job the token the broker wants is the one an id_tokens:
 * entry provides, and the refusal says so instead of pointing at Kubernetes.
 */
export function refuseOtherAudience(token: string, audience: string, inGitLab = false): void {
  let aud: unknown;
  try {
    aud = JSON.parse(Buffer.from(token.trim().split('.')[1] ?? '', 'base64url').toString('utf8')).aud;
  } catch {
    aud = undefined;
  }
  const audiences = (Array.isArray(aud) ? aud : [aud]).filter((a): a is string => typeof a === 'string');
  if (audiences.includes(audience)) return;
  const notSent = `the Kubernetes service-account token at ${KUBERNETES_TOKEN_FILE} is not for the broker `;
  if (inGitLab) throw new CliError(`no token: ${gitlabTokenHint(audience)} (${notSent}and is not sent)`);
  throw new CliError(`no token given, and ${notSent}`
    + `(its audience: ${audiences.length > 0 ? audiences.map((a) => JSON.stringify(a)).join(', ') : 'none readable'}; the broker's: "${audience}"), `
    + 'so it is not sent: it is the pod\'s key to the Kubernetes API. Mount a projected token with audience '
    + `"${audience}" and pass --token-file (examples/kubernetes), or --audience if your broker expects another`);
}

/**
 * A token copied with its scheme (`Bearer eyJ…`, from a curl command or a browser's network tab)
 * is taken without it: sent as given, the header read "Bearer Bearer eyJ…" and the broker's 401
 * said the header was not a bearer token, which sent people looking at the wrong thing.
 */
export function bareToken(token: string, source: string): string {
  const bare = token.replace(/^bearer(?:\s+|$)/i, '');
  if (!bare) throw new CliError(`${source} holds the word Bearer and no token after it`);
  // RFC 6750's b64token, which every JWT is. Anything else is refused here, unquoted: fetch
  // refuses a line break in a header by quoting the whole value, token and all, in its error.
  if (!/^[A-Za-z0-9\-._~+/]+=*$/.test(bare)) {
    throw new CliError(`${source} is no bearer token: it holds a space, line break, quote or other character a token cannot (two tokens, a wrapped line?)`);
  }
  return bare;
}

/**
 * What no path is: a JWT (three base64url segments, the first a JSON header, so "eyJ…"), or longer
 * than any path given in practice. Mostly the token itself, passed as the file by mistake. The
 * header is required so that a file name such as `ci.token.jwt` is still repeated.
 */
export function looksLikeToken(value: string): boolean {
  return value.length > 512 || /^(?:bearer\s+)?eyJ[\w-]*\.[\w-]+\.[\w-]*$/i.test(value.trim());
}

/**
 * An empty file is named as such: sent on, it came back as "not a bearer token", which hides the
 * usual cause, a projected token the kubelet has not written yet. `source` is where the path came
 * from (--token-file, PG_BROKER_TOKEN_FILE), named when what it gave cannot be repeated.
 */
async function readTokenFile(file: string, source?: string): Promise<string> {
  let token: string;
  try {
    token = (await readFile(file, 'utf8')).trim();
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    // Repeated, the token would land on the terminal and in the CI log that error is written to
    // (fs's own message quotes the path, so only its code is given).
    if (source && looksLikeToken(file)) {
      const why = code ?? 'unreadable';
      const instead = source === '--token-file' ? '--token, or better $PG_BROKER_TOKEN (--token shows in the process list)' : '$PG_BROKER_TOKEN';
      throw new CliError(`${source} got what looks like a token, not a path (not repeated here; reading it as a file failed: ${why}); pass the token itself in ${instead}`);
    }
    throw new CliError(`cannot read token file ${file}: ${code ?? (err as Error).message}`);
  }
  if (!token) throw new CliError(`token file ${file} is empty`);
  return token;
}

/**
 * The value of a variable that is set. Set but empty (a CI secret or variable that is missing, a
 * command substitution that failed) is refused rather than skipped: the next source in line may
 * be another identity's token, or another broker.
 */
function setVariable(env: Env, name: string): string {
  const value = env[name]!.trim();
  if (!value) throw new CliError(`${name} is set but empty (a missing secret or variable?); give it a value, or unset it`);
  return value;
}

/** GitHub's runtime hands a job its OIDC token: GET $URL&audience=..., bearer $TOKEN, JSON {value}. */
export async function githubActionsToken(requestUrl: string, requestToken: string, audience: string): Promise<string> {
  const url = new URL(requestUrl);
  url.searchParams.set('audience', audience);
  let res: Response;
  try {
    res = await fetch(url, { headers: { authorization: `Bearer ${requestToken}`, accept: 'application/json' }, signal: AbortSignal.timeout(10_000) });
  } catch (err) {
    throw new CliError(`GitHub Actions token request failed: ${fetchFailure(err, requestToken)}`);
  }
  if (!res.ok) throw new CliError(`GitHub Actions token request answered ${res.status}`);
  const body = (await res.json().catch(() => null)) as { value?: unknown } | null;
  if (typeof body?.value !== 'string' || !body.value.trim()) throw new CliError('GitHub Actions token response has no "value"');
  return body.value;
}

export function brokerUrl(flag: string | undefined, env: Env = process.env): string {
  const given = flag ?? (env.PG_BROKER_URL === undefined ? DEFAULT_BROKER_URL : setVariable(env, 'PG_BROKER_URL'));
  const url = given.replace(/\/+$/, '');
  // Checked before anything is sent: fetch's own refusal ("fetch failed") names neither.
  const source = flag === undefined ? 'PG_BROKER_URL' : '--url';
  // An @ anywhere may follow a password (user:pa/ss@host parses as a path): refused before the
  // URL is parsed or repeated. fetch would refuse credentials too, repeating them in its error.
  if (url.includes('@')) throw new CliError(`${source} must not carry a user or password (user:password@), or any @; the broker takes a bearer token`);
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new CliError(`${source} must be the broker's http(s) URL, like https://pg-broker.internal; got ${JSON.stringify(given.slice(0, 200))}`);
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new CliError(`${source} must be the broker's http(s) URL, like https://pg-broker.internal; ${parsed.protocol} is no scheme the broker answers on`);
  }
  if (/[?#]/.test(url)) throw new CliError(`${source} must be the broker's base URL, without a query or fragment`);
  const warning = plainHttpWarning(url);
  if (warning) process.stderr.write(`pg-broker: warning: ${warning}\n`);
  return url;
}

/**
 * The token goes to the broker and a password comes back: over plain http to another host both
 * cross the network readable. Loopback (a port-forward, a sidecar) is fine.
 */
export function plainHttpWarning(url: string): string | null {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return null;
  }
  if (parsed.protocol !== 'http:') return null;
  const host = parsed.hostname.replace(/^\[|\]$/g, '');
  if (host === 'localhost' || host === '::1' || (isIPv4(host) && host.startsWith('127.'))) return null;
  return `${url} is plain http: the token and the credential cross the network unencrypted; use https`;
}

/**
 * Why a fetch failed. Its own message is only "fetch failed"; the reason is in its cause: a code
 * such as ECONNREFUSED, ENOTFOUND or a TLS error's, and a message naming the address. When several
 * addresses were tried (localhost's ::1 and 127.0.0.1), the cause is an AggregateError whose own
 * message is empty, and each attempt's is given. `secret` (the bearer token) is cut out wherever it
 * appears: an invalid header value comes back quoted whole in the message, and stderr is logged.
 */
export function fetchFailure(err: unknown, secret?: string): string {
  const message = err instanceof Error ? err.message : String(err);
  const cause = (err as { cause?: unknown } | null)?.cause;
  let why = '';
  if (cause && typeof cause === 'object') {
    const { code, message: causeMessage, errors } = cause as { code?: unknown; message?: unknown; errors?: unknown };
    why = typeof causeMessage === 'string' ? causeMessage : '';
    if (!why && Array.isArray(errors)) why = [...new Set(errors.map((e) => (e as Error)?.message).filter(Boolean))].join('; ');
    if (typeof code === 'string' && !why.includes(code)) why = why ? `${code}: ${why}` : code;
  }
  const text = why && why !== message ? `${message} (${why})` : message;
  return secret ? text.split(secret).join('[token]') : text;
}

/** How long a call waits for the broker's whole answer. */
export const CALL_TIMEOUT_MS = 30_000;
/**
 * Revocations wait longer: the broker answers only once the role is gone, after waiting up to
 * BROKER_LOCK_TIMEOUT per lock and BROKER_QUERY_TIMEOUT per statement, and a bulk revocation ends
 * its leases batch by batch. Giving up earlier reported a failure for a revocation that completed.
 */
export const REVOKE_TIMEOUT_MS = 300_000;

/** fetch's own header and body timeouts (undici's, 300 s each) fire like ours: no answer in time. */
export function undiciTimedOut(err: unknown): boolean {
  const code = (err as { cause?: { code?: unknown } })?.cause?.code;
  return code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT';
}

/**
 * Retry-After as whole seconds from now: delta-seconds, or an HTTP date (RFC 9110); undefined
 * when unreadable. A date is measured from the answer's own Date header when it has a readable
 * one, as both then come from the same clock: this machine's may be minutes off the server's.
 */
export function retryAfterSeconds(header: string | null, answerDate: string | null = null, now = Date.now()): number | undefined {
  if (header === null) return undefined;
  const value = header.trim();
  if (/^\d+$/.test(value)) return Number(value);
  const at = httpDateMs(value);
  if (Number.isNaN(at)) return undefined;
  const sent = httpDateMs(answerDate);
  return Math.max(0, Math.ceil((at - (Number.isNaN(sent) ? now : sent)) / 1000));
}

/** Calls the broker; a problem+json answer becomes a CliError carrying its detail. */
export async function callBroker<T = any>(
  base: string, token: string, method: string, path: string, body?: unknown, timeoutMs = CALL_TIMEOUT_MS,
): Promise<{ status: number; body: T; serverClock: ServerClockReading | null }> {
  const signal = AbortSignal.timeout(timeoutMs);
  // The broker got the request and may still carry it out: saying it was unreachable would mislead.
  const unanswered = () => new CliError(`the broker at ${base} did not answer ${method} ${path} within ${timeoutMs / 1000} s; it may still complete there`);
  let res: Response;
  let text: string;
  try {
    res = await fetch(`${base}${path}`, {
      method,
      headers: { authorization: `Bearer ${token}`, accept: 'application/json', ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (signal.aborted || undiciTimedOut(err)) throw unanswered();
    throw new CliError(`cannot reach the broker at ${base}: ${fetchFailure(err, token)}`);
  }
  const serverClock = readServerClock(res.headers.get('date'), performance.now());
  try {
    text = await res.text();
  } catch (err) {
    if (signal.aborted || undiciTimedOut(err)) throw unanswered();
    throw new CliError(`the broker at ${base} broke off its ${res.status} answer to ${method} ${path}: ${fetchFailure(err, token)}`);
  }
  let parsed: unknown = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = text;
  }
  if (res.status >= 400) {
    const problem = parsed as { detail?: string; code?: string } | null;
    throw new CliError(`${method} ${path} failed with ${res.status}${problem?.code ? ` ${problem.code}` : ''}: ${problem?.detail ?? text}`, 1, res.status, problem?.code,
      retryAfterSeconds(res.headers.get('retry-after'), res.headers.get('date')));
  }
  // Whatever else answers at a wrong --url (a web server, a proxy's login page) says 200 too; its
  // page must not be taken for the broker's answer, let alone printed as a credential.
  const type = res.headers.get('content-type') ?? '';
  // The broker answers 204 with nothing, and every other success with a JSON body.
  if (res.status !== 204 && !text) {
    throw new CliError(`the server at ${base} answered ${method} ${path} with ${res.status} and nothing else; is ${base} the broker's URL?`);
  }
  if (text && (typeof parsed === 'string' || !/^application\/(problem\+)?json\b/i.test(type))) {
    throw new CliError(`the server at ${base} answered ${method} ${path} with ${res.status} but not with the broker's JSON (content-type ${JSON.stringify(type || 'none')}); is ${base} the broker's URL?`);
  }
  return { status: res.status, body: parsed as T, serverClock };
}
