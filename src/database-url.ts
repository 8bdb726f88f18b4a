/** Thrown with a reason fit to print after `DATABASE_URL: `; it never quotes the URL, which holds the password. */
export class DatabaseUrlError extends Error {
  constructor(reason: string) {
    super(reason);
    this.name = 'DatabaseUrlError';
  }
}

function parseDatabaseUrl(url: string): URL {
  try {
    return new URL(url);
  } catch {
    // libpq accepts `postgres://user@/db?host=...`; WHATWG URL wants a host after the `@`.
    try {
      return new URL(url.replace(/^(postgres(?:ql)?:\/\/[^/?#]*@)(?=[/?#]|$)/, '$1localhost'));
    } catch {
      throw new DatabaseUrlError('is not a valid URL');
    }
  }
}

/** The host and port DATABASE_URL connects to, as clients would be told them. */
export function databaseHostPort(url: string): { host: string; port: number } {
  const parsed = parseDatabaseUrl(url);
  const queryHost = parsed.searchParams.get('host');
  const queryPort = parsed.searchParams.get('port');
  // A socket directory (`?host=/run/postgresql`, or percent-encoded in the host part as
  // `%2Frun%2Fpostgresql`) is no address for clients elsewhere.
  const urlHost = /^%2f/i.test(parsed.hostname) ? '' : parsed.hostname.replace(/^\[(.*)\]$/, '$1');
  const host = queryHost && !queryHost.startsWith('/') ? queryHost : urlHost || 'localhost';
  const port = parsed.port || queryPort || '5432';
  // Checked here, not by the schema: the schema sees it as publicPgPort and would name
  // BROKER_PUBLIC_PG_PORT, which the operator never set.
  if (!/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) throw new DatabaseUrlError('port must be a whole number 1–65535');
  return { host, port: Number(port) };
}
