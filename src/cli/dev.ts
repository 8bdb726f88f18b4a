import path from 'node:path';
import { CliError } from './client.js';
import { loadConfig } from '../config.js';
import { startLocalPostgres } from '../dev/embedded-postgres.js';
import { DEV_ISSUER_BANNER, startDevIssuer } from '../dev/issuer.js';
import { seedLocalCluster } from '../dev/seed.js';
import { startBroker } from '../server.js';

export interface DevOptions {
  dir: string;
  port: number;
  pgPort: number;
  issuerPort: number;
}

function waitForSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    process.once('SIGINT', () => resolve('SIGINT'));
    process.once('SIGTERM', () => resolve('SIGTERM'));
  });
}

/**
 * `pg-broker dev`: embedded PostgreSQL (data kept under --dir), a development-only issuer and
 * the broker, seeded with a group role and a policy, then copy-paste commands to try it.
 */
export async function devCommand(opts: DevOptions): Promise<void> {
  // Whatever has started is stopped, newest first, before a start-up error (a port already taken)
  // propagates: a running PostgreSQL child or a listening issuer would keep the process alive
  // after the error was printed.
  const stops: Array<() => Promise<void>> = [];
  // One that fails must not leave the others running; the first failure is reported after.
  const stopAll = async () => {
    const failures: unknown[] = [];
    for (const stop of stops.splice(0).reverse()) await stop().catch((err: unknown) => failures.push(err));
    if (failures.length > 0) throw failures[0];
  };
  try {
    await startAndExplain(opts, stops);
  } catch (err) {
    await stopAll().catch(() => undefined);
    throw err;
  }
  await waitForSignal();
  await stopAll();
}

async function startAndExplain(opts: DevOptions, stops: Array<() => Promise<void>>): Promise<void> {
  const local = await startLocalPostgres({ dir: path.resolve(opts.dir, 'postgres'), port: opts.pgPort });
  stops.push(() => local.stop());
  const issuer = await startDevIssuer({ port: opts.issuerPort }).catch((err) => {
    throw portTaken(err, '--issuer-port', opts.issuerPort);
  });
  stops.push(() => issuer.close());
  const seeded = await seedLocalCluster(local);
  const config = loadConfig({
    ...process.env,
    DATABASE_URL: seeded.brokerUrl,
    BROKER_ISSUERS: JSON.stringify([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }]),
    BROKER_AUDIENCE: 'pg-broker',
    BROKER_ADMINS: JSON.stringify([{ issuer: issuer.issuer, claims: { sub: 'admin:*' } }]),
    HOST: '127.0.0.1',
    PORT: String(opts.port),
    LOG_LEVEL: process.env.LOG_LEVEL ?? 'warn',
  });
  const broker = await startBroker(config).catch((err) => {
    throw portTaken(err, '--port', opts.port);
  });
  stops.push(() => broker.close());
  const admin = await issuer.mint({ sub: 'admin:dev' });
  const policyNote = await seedDevPolicy(broker.url, admin, { issuer: issuer.issuer, grant_role: seeded.groupRole, database: seeded.database });

  const mint = (sub: string) =>
    `curl -s -X POST ${issuer.issuer}/token -d '{"sub":"${sub}"}' | node -pe 'JSON.parse(require("fs").readFileSync(0)).access_token'`;
  console.log(`
pg-credential-broker dev
  PostgreSQL ${local.version}   127.0.0.1:${local.port}   data: ${local.dataDir}
  broker         ${broker.url}
  issuer         ${issuer.issuer}   ⚠ ${DEV_ISSUER_BANNER}
  seeded         group role ${seeded.groupRole}, database ${seeded.database} (demo.orders), ${policyNote}

Try it (in another terminal):
  export PG_BROKER_URL=${broker.url}
  export PG_BROKER_TOKEN=$(${mint('dev:alice')})
  npx pg-broker creds --format env                    # a credential as shell exports
  npx pg-broker exec -- psql -c 'select current_user, count(*) from demo.orders'
  eval "$(npx pg-broker creds --format env)" && psql -c 'select 1'

Admin:
  export PG_BROKER_TOKEN=$(${mint('admin:you')})
  npx pg-broker leases list
  npx pg-broker policy list

Ctrl-C stops everything; the PostgreSQL data stays in ${local.dataDir}.
`);
}

/** `pg-broker dev-issuer`: only the development issuer, e.g. for docker-compose. */
export async function devIssuerCommand(opts: { host: string; port: number; publicUrl?: string; audience?: string }): Promise<void> {
  // It becomes every token's iss, which a broker compares exactly with BROKER_ISSUERS.
  if (opts.publicUrl !== undefined && !issuerUrl(opts.publicUrl)) {
    throw new CliError(`--public-url must be an http(s) URL without a user part, query or fragment, as BROKER_ISSUERS will name it; got ${opts.publicUrl.includes('@') ? 'one with an @ (not repeated: it may hold a password)' : JSON.stringify(opts.publicUrl.slice(0, 200))}`);
  }
  const issuer = await startDevIssuer(opts);
  console.log(`⚠ ${DEV_ISSUER_BANNER}\nissuer ${issuer.issuer} (JWKS ${issuer.jwksUri}); POST ${issuer.issuer}/token with a JSON object of claims`);
  await waitForSignal();
  await issuer.close();
}

/**
 * The "dev" policy, created on the first start. A later start keeps it as the developer left it
 * (the data directory is kept for that); only one naming another issuer (a --issuer-port changed
 * since) is made again, since no token could match it. Returns the banner's words for it.
 */
async function seedDevPolicy(base: string, admin: string, where: { issuer: string; grant_role: string; database: string }): Promise<string> {
  const headers = { authorization: `Bearer ${admin}`, 'content-type': 'application/json' };
  const current = await fetch(`${base}/policies/dev`, { headers });
  if (current.status !== 404 && !current.ok) throw new Error(`could not read the dev policy: ${current.status} ${await current.text()}`);
  const existing = current.ok ? (await current.json()) as { issuer?: string } : null;
  if (existing && existing.issuer === where.issuer) return 'policy "dev" as you left it';
  const res = await fetch(`${base}/policies/dev`, {
    method: 'PUT',
    headers,
    body: JSON.stringify({ ...where, claims: { sub: 'dev:*' }, description: 'seeded by pg-broker dev' }),
  });
  if (!res.ok) throw new Error(`could not seed the dev policy: ${res.status} ${await res.text()}`);
  return existing ? `policy "dev" seeded again, admitting sub dev:* (it named another issuer, ${existing.issuer})` : 'policy "dev" admitting sub dev:*';
}

/** A port that cannot be had, in the words of dev's own option (start-up would name PORT, or nothing). */
function portTaken(err: unknown, option: string, port: number): unknown {
  const { code } = err as NodeJS.ErrnoException;
  const reason = code === 'EADDRINUSE' ? 'is already in use on 127.0.0.1; choose another'
    : code === 'EACCES' ? 'may not be opened by this process (ports below 1024 need privileges); choose another'
    : null;
  return reason ? Object.assign(new Error(`${option} ${port} ${reason} (${code})`, { cause: err }), { code }) : err;
}

/** Whether `value` can be an OIDC issuer identifier (and BROKER_ISSUERS entry): http(s), with a host and nothing after the path. */
function issuerUrl(value: string): boolean {
  if (/[\s?#@]/.test(value) || !/^https?:\/\/[^/]/i.test(value)) return false;
  try {
    const url = new URL(value);
    return (url.protocol === 'http:' || url.protocol === 'https:') && url.hostname !== '';
  } catch {
    return false;
  }
}
