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

type Env = Record<string, string | undefined>;

/**
 * The value of a variable that is set. Set but empty (a CI secret or variable that is missing, a
 * command substitution that failed) is refused rather than skipped: the next source in line may
 * be another identity's token, or another broker.
 */
export function setVariable(env: Env, name: string): string {
  const value = env[name]!.trim();
  if (!value) throw new CliError(`${name} is set but empty (a missing secret or variable?); give it a value, or unset it`);
  return value;
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
  const type = res.headers.get('content-type') ?? '';
  if (res.status >= 400) {
    const retryAfter = retryAfterSeconds(res.headers.get('retry-after'), res.headers.get('date'));
    const problem = parsed as { detail?: unknown; code?: unknown } | null;
    if (problem !== null && typeof problem === 'object' && typeof problem.detail === 'string') {
      const code = typeof problem.code === 'string' ? problem.code : undefined;
      throw new CliError(`${method} ${path} failed with ${res.status}${code ? ` ${code}` : ''}: ${problem.detail}`, 1, res.status, code, retryAfter);
    }
    // Not the broker's problem+json: another server at a wrong --url, or a proxy in front of the
    // broker failing. Its page (HTML, often) would run over many lines, so one line says what it was.
    throw new CliError(`the server at ${base} answered ${method} ${path} with ${res.status}, not with the broker's problem+json (content-type ${JSON.stringify(type || 'none')})`
      + `${excerpt(text, type)}; is ${base} the broker's URL, or a proxy in front of it failing?`, 1, res.status, undefined, retryAfter);
  }
  // Whatever else answers at a wrong --url (a web server, a proxy's login page) says 200 too; its
  // page must not be taken for the broker's answer, let alone printed as a credential.
  // The broker answers 204 with nothing, and every other success with a JSON body.
  if (res.status !== 204 && !text) {
    throw new CliError(`the server at ${base} answered ${method} ${path} with ${res.status} and nothing else; is ${base} the broker's URL?`);
  }
  if (text && (typeof parsed === 'string' || !/^application\/(problem\+)?json\b/i.test(type))) {
    throw new CliError(`the server at ${base} answered ${method} ${path} with ${res.status} but not with the broker's JSON (content-type ${JSON.stringify(type || 'none')}); is ${base} the broker's URL?`);
  }
  return { status: res.status, body: parsed as T, serverClock };
}

/** A short plain-text answer, on one line (": Bad Gateway"); nothing for markup or a long page. */
function excerpt(text: string, type: string): string {
  const line = text.replace(/\s+/g, ' ').trim();
  // Control characters (a terminal's escape sequences) from an unknown server are not printed.
  if (!line || /html|xml/i.test(type) || line.startsWith('<') || line.length > 120 || /[\u0000-\u001f\u007f-\u009f]/.test(line)) return '';
  return `: ${line}`;
}
