import path from 'node:path';
import { CliError } from './client.js';
import { loadConfig } from '../config.js';
import { startLocalPostgres } from '../dev/embedded-postgres.js';
import { DEV_ISSUER_BANNER, startDevIssuer } from '../dev/issuer.js';
import { seedLocalCluster } from '../dev/seed.js';
import { startBroker, StartupStopped } from '../server.js';
import { stopSignals, Teardown } from './dev-stop.js';

export interface DevOptions {
  dir: string;
  port: number;
  pgPort: number;
  issuerPort: number;
}

/**
 * `pg-broker dev`: embedded PostgreSQL (data kept under --dir), a development-only issuer and
 * the broker, seeded with a group role and a policy, then copy-paste commands to try it.
 */
export async function devCommand(opts: DevOptions): Promise<void> {
  // Whatever has started is stopped, newest first, before a start-up error (a port already taken)
  // propagates: a running PostgreSQL child or a listening issuer would keep the process alive
  // after the error was printed.
  const stops = new Teardown('dev');
  const signals = stopSignals('dev', (signal) => stops.hurry(signal));
  try {
    try {
      await startAndExplain(opts, stops, signals.signal);
    } catch (err) {
      if (signals.signal.aborted) return await stoppedDuringStartUp(signals.signal.reason as NodeJS.Signals, err, stops);
      await stops.run().catch(() => undefined);
      throw err;
    }
    await signals.requested;
    // The line saying what was given up on is printed already; the exit code still has to say so.
    if ((await stops.run()).length > 0) process.exitCode = 1;
  } finally {
    signals.release();
  }
}

/**
 * A signal came before the banner: start-up has ended at the step after it, and what it had started
 * is stopped. A step that failed meanwhile is most likely the same signal's doing (Ctrl-C reaches
 * PostgreSQL too, which then shuts down under the seeding), so it is named, not made the outcome.
 */
async function stoppedDuringStartUp(signal: NodeJS.Signals, err: unknown, stops: Teardown): Promise<void> {
  const names = stops.names();
  let failure: unknown;
  if (err instanceof StartupStopped) {
    // startBroker has already closed whatever of the broker it had opened.
    if (err.closed.length > 0) names.unshift(`the broker's ${[...err.closed].reverse().join(', ')}`);
    failure = err.closeFailure;
  }
  const givenUp = await stops.run().catch((stopFailure: unknown) => {
    failure ??= stopFailure;
    return [] as string[];
  });
  const stoppedNames = names.filter((name) => !givenUp.includes(name));
  const stopped = stoppedNames.length > 0 ? `; stopped ${stoppedNames.join(', ')}` : '';
  if (failure !== undefined) {
    throw new Error(`start-up stopped by ${signal}, but stopping what it had started failed: ${(failure as Error).message ?? String(failure)}`, { cause: failure });
  }
  if (givenUp.length > 0) process.exitCode = 1;
  // Its first line only: a server that exited during start brings its last log lines along.
  const reason = String((err as Error)?.message ?? err).split(' | ')[0].slice(0, 160);
  const meanwhile = err instanceof StartupStopped ? '' : ` (the step under way failed too: ${reason})`;
  console.error(`pg-broker dev: start-up stopped by ${signal}${stopped}${meanwhile}`);
}

/**
 * dev's own steps are never cut short: initdb, PostgreSQL coming up and a seeding query are left to
 * finish (none can be stopped midway without leaving a half-made cluster or a server behind), then
 * StartupStopped ends it. startBroker answers the same signal itself, and may end a migration
 * midway: each runs in a transaction, rolled back, and is applied again on the next start.
 */
async function startAndExplain(opts: DevOptions, stops: Teardown, signal: AbortSignal): Promise<void> {
  const stopIfAsked = () => {
    if (signal.aborted) throw new StartupStopped([]);
  };
  const local = await startLocalPostgres({ dir: path.resolve(opts.dir, 'postgres'), port: opts.pgPort }).catch((err) => {
    throw portTaken(err, '--pg-port', opts.pgPort);
  });
  stops.add({ name: 'PostgreSQL', stop: () => local.stop() });
  stopIfAsked();
  const issuer = await startDevIssuer({ port: opts.issuerPort }).catch((err) => {
    throw portTaken(err, '--issuer-port', opts.issuerPort);
  });
  stops.add({ name: 'the dev issuer', stop: () => issuer.close() });
  stopIfAsked();
  const seeded = await seedLocalCluster(local);
  stopIfAsked();
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
  const broker = await startBroker(config, { signal }).catch((err) => {
    throw portTaken(err, '--port', opts.port);
  });
  stops.add({ name: 'the broker', stop: () => broker.close(), cut: () => broker.dropConnections() });
  const admin = await issuer.mint({ sub: 'admin:dev' });
  const policyNote = await seedDevPolicy(broker.url, admin, { issuer: issuer.issuer, grant_role: seeded.groupRole, database: seeded.database });
  stopIfAsked();

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
  // Nothing of it outlives the process, but as PID 1 (docker-compose runs it so) a signal without a
  // listener is ignored, and the container's stop would wait for its SIGKILL.
  const signals = stopSignals('dev-issuer');
  try {
    const issuer = await startDevIssuer(opts);
    if (signals.signal.aborted) {
      await issuer.close();
      console.error(`pg-broker dev-issuer: start-up stopped by ${signals.signal.reason as string}`);
      return;
    }
    console.log(`⚠ ${DEV_ISSUER_BANNER}\nissuer ${issuer.issuer} (JWKS ${issuer.jwksUri}); POST ${issuer.issuer}/token with a JSON object of claims`);
    await signals.requested;
    await issuer.close();
  } finally {
    signals.release();
  }
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
