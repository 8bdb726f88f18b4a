/** Thrown with a reason fit to print after `DATABASE_URL: `; it never quotes the URL, which holds the password. */
export class DatabaseUrlError extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'DatabaseUrlError';
  }
}

const PORT_RULE = 'its port must be a whole number from 1 to 65535';
// pg, unlike libpq, takes one host: with a list it looks up "a,b" as a name and retries forever.
const SEVERAL_HOSTS = 'names several hosts, but the broker connects to one: give the primary\'s address, or one in front of the cluster';
const ENCODING_HINT = 'a / ? # @ : or % in the user or password, and an @ anywhere after the host, must be percent-encoded';

function parseDatabaseUrl(url: string): URL {
  // A / ? or # in the password ends the authority early, and when what precedes it looks like a
  // host and port (`broker:4711/Zx9@db`) the URL still parses, the user part taken for the host
  // and the rest of the password for the path: it would then be printed as the address and the
  // database. An @ after the authority is that mistake, or an unencoded @ elsewhere.
  const rest = url.replace(/^[a-z][a-z0-9+.-]*:\/\//i, '');
  if (rest.slice(rest.split(/[/?#]/, 1)[0].length).includes('@')) throw new DatabaseUrlError(`is not a valid URL: ${ENCODING_HINT}`);
  try {
    return new URL(url);
  } catch {
    // libpq accepts `postgres://user@/db?host=...`; WHATWG URL wants a host after the `@`.
    try {
      return new URL(url.replace(/^(postgres(?:ql)?:\/\/[^/?#]*@)(?=[/?#]|$)/, '$1localhost'));
    } catch {
      throw new DatabaseUrlError(whyNotAUrl(url));
    }
  }
}

/**
 * What makes DATABASE_URL unparseable, said without quoting any of it: the part before the host
 * holds the password, and with an unescaped `/` or `#` in the password even the "host" may be a
 * piece of it.
 */
function whyNotAUrl(url: string): string {
  const rest = url.replace(/^postgres(?:ql)?:\/\//i, '');
  const authority = rest.split(/[/?#]/, 1)[0];
  // An @ after the authority: a / ? or # in the password ended it early.
  if (rest.slice(authority.length).includes('@')) return `is not a valid URL: ${ENCODING_HINT}`;
  const hostPort = authority.slice(authority.lastIndexOf('@') + 1);
  if (hostPort.includes(',')) return SEVERAL_HOSTS;
  if (/^(?:\[[^\]]*\]|[^:[\]]*):/.test(hostPort)) return PORT_RULE;
  return `is not a valid URL (${ENCODING_HINT})`;
}

function decoded(text: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return text;
  }
}

/** Where DATABASE_URL connects. */
export interface DatabaseTarget {
  /** A host name or address; null when the connection goes through a Unix socket. */
  host: string | null;
  /** The socket directory when host is null. */
  socketDir: string | null;
  port: number;
}

export function databaseTarget(url: string): DatabaseTarget {
  const parsed = parseDatabaseUrl(url);
  const queryHost = parsed.searchParams.get('host');
  const queryPort = parsed.searchParams.get('port');
  // pg reads a socket directory from `?host=/run/postgresql`, or percent-encoded in the host
  // part as `%2Frun%2Fpostgresql`.
  const encodedDir = /^%2f/i.test(parsed.hostname) ? decoded(parsed.hostname) : null;
  const socketDir = queryHost?.startsWith('/') ? queryHost : queryHost ? null : encodedDir;
  // No host at all is pg's default, localhost over TCP.
  const host = socketDir ? null : queryHost || parsed.hostname.replace(/^\[(.*)\]$/, '$1') || 'localhost';
  if (host?.includes(',')) throw new DatabaseUrlError(SEVERAL_HOSTS);
  const port = parsed.port || queryPort || '5432';
  // Checked here, not by the schema: the schema sees it as publicPgPort and would name
  // BROKER_PUBLIC_PG_PORT, which the operator never set.
  if (!/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) throw new DatabaseUrlError(PORT_RULE);
  return { host, socketDir, port: Number(port) };
}

export interface DatabaseDescription {
  /** `host:port`, or the socket file for a Unix socket. */
  address: string;
  /** `user broker at db.internal:5432, database broker`: what a failed connection tried, without the password. */
  label: string;
  /** `text` with the URL's password, as written and decoded, replaced: for error texts from elsewhere. */
  withoutPassword(text: string): string;
}

/**
 * `secret` where it stands on its own (in a URL, quoted, between spaces), not inside a longer
 * word: a short password would otherwise be cut out of every word that holds it ("open", for the
 * password "p"). An end of the secret that is no letter or digit is a boundary by itself.
 */
function standingAlone(secret: string): RegExp {
  // Letters and digits of any script, and _, make a word (é too; "p_x" is one word).
  const word = /[\p{L}\p{N}_]/u;
  const escaped = secret.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const [first, last] = [...secret].filter((_, i, all) => i === 0 || i === all.length - 1);
  return new RegExp(`${word.test(first) ? '(?<![\\p{L}\\p{N}_])' : ''}${escaped}${word.test(last ?? first) ? '(?![\\p{L}\\p{N}_])' : ''}`, 'gu');
}

/** DATABASE_URL (already accepted by loadConfig) as start-up messages name it. */
export function describeDatabase(url: string): DatabaseDescription {
  const parsed = parseDatabaseUrl(url);
  const target = databaseTarget(url);
  const address = target.host === null
    ? `${target.socketDir!.replace(/\/$/, '')}/.s.PGSQL.${target.port}`
    : `${target.host.includes(':') ? `[${target.host}]` : target.host}:${target.port}`;
  // pg lets ?user= override the user part; without either it uses PGUSER or the OS user.
  const user = parsed.searchParams.get('user') || decoded(parsed.username) || '(the default)';
  const database = decoded(parsed.pathname.replace(/^\//, '')) || '(the default)';
  const secrets = [...new Set([parsed.password, decoded(parsed.password)])].filter((s) => s.length > 0);
  return {
    address,
    label: `user ${user} at ${address}, database ${database}`,
    withoutPassword: (text) => secrets.reduce((out, secret) => out.replace(standingAlone(secret), '[REDACTED]'), text),
  };
}
