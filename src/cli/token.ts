import { readFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { CliError, fetchFailure, setVariable } from './client.js';

/** Where the CLI finds the caller's token: flags, variables, the GitHub Actions runtime, a service-account file. */

export const KUBERNETES_TOKEN_FILE = '/var/run/secrets/kubernetes.io/serviceaccount/token';

type Env = Record<string, string | undefined>;

export interface TokenOptions {
  token?: string;
  tokenFile?: string;
  audience?: string;
}


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
