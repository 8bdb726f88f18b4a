import type { FastifyInstance } from 'fastify';
import Fastify from 'fastify';
import pg from 'pg';
import { arrivalLimits, buildApp, type BuildOptions } from './app.js';
import { listLikeAudiences, plainHttpKeySources, type Config } from './config.js';
import { describeDatabase } from './database-url.js';
import { createLogger } from './logger.js';
import { Metrics } from './metrics.js';
import { migrate } from './postgres/migrate.js';
import { isConnectionError, searchPathProblem } from './postgres/pool.js';
import { Reaper } from './reaper/reaper.js';
import { brokerDatabaseOpenTo } from './postgres/exposure.js';
import { policiesRefusedNow } from './policy/repository.js';

export interface RunningBroker {
  app: FastifyInstance;
  url: string;
  reaper: Reaper;
  /** Waits for requests in progress (without a limit of its own), then stops the reaper and ends the pool. */
  close(): Promise<void>;
  /**
   * Ends every connection of its listeners at once, requests in progress included: for a close no
   * longer waited for, which then goes on to the reaper and the pool instead of waiting for a
   * client that may never finish its request, and whose sockets would keep the process alive.
   */
  dropConnections(): void;
  /** The listener of BROKER_METRICS_PORT, when set. */
  metricsServer: FastifyInstance | null;
}

const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 5000;

const CONNECT_TIMEOUT_MS = 5000;

/**
 * Opens and closes one connection, so that a failure to connect or log in can be told apart
 * from a failure in a migration: the first is DATABASE_URL's to fix (or PostgreSQL is not up yet).
 */
async function connectOnce(databaseUrl: string): Promise<void> {
  try {
    // pg reads the URL's sslrootcert and friends when the client is made: that throws too.
    const client = new pg.Client({ connectionString: databaseUrl, application_name: 'pg-credential-broker', connectionTimeoutMillis: CONNECT_TIMEOUT_MS });
    client.on('error', () => undefined);
    await client.connect();
    await client.end().catch(() => undefined);
  } catch (err) {
    throw new ConnectFailure(err);
  }
}

class ConnectFailure extends Error {
  constructor(readonly reason: unknown) {
    super((reason as Error)?.message ?? String(reason));
  }
}

/**
 * Migrates once PostgreSQL accepts connections. Compose and Kubernetes start the broker and the
 * database together, and a broker that exits on the first refused connection only adds restarts
 * and noise; so with `retry`, connection failures are retried (and logged) until the process is
 * stopped. Any other failure (a wrong password, a failed migration) ends start-up at once, and
 * one in connecting or logging in says it comes from DATABASE_URL, and where that points.
 */
export async function migrateWhenReachable(
  config: Pick<Config, 'databaseUrl' | 'managedRole'>, logger: ReturnType<typeof createLogger>, retry: boolean,
): Promise<string[]> {
  const database = describeDatabase(config.databaseUrl);
  for (let attempt = 1, delay = FIRST_RETRY_MS; ; attempt++, delay = Math.min(delay * 2, MAX_RETRY_MS)) {
    try {
      await connectOnce(config.databaseUrl);
      return (await migrate(config.databaseUrl, config.managedRole, logger)).applied;
    } catch (caught) {
      const err = caught instanceof ConnectFailure ? caught.reason : caught;
      const { message, code } = err as { message?: string; code?: string };
      if (retry && isConnectionError(err)) {
        logger.warn({ variable: 'DATABASE_URL', address: database.address, err: { message: database.withoutPassword(String(message)), code }, attempt, retry_in_ms: delay },
          'PostgreSQL is not reachable yet; retrying');
        await new Promise((resolve) => setTimeout(resolve, delay));
        continue;
      }
      if (!(caught instanceof ConnectFailure)) throw err;
      throw Object.assign(new Error(`DATABASE_URL (${database.label}): ${database.withoutPassword(String(message))}`, { cause: err }), { code });
    }
  }
}

/**
 * A listen failure in terms of the setting behind it: Node's `listen EADDRINUSE: address already
 * in use 0.0.0.0:8080` does not say whether PORT or BROKER_METRICS_PORT chose that port. The code
 * stays on the error, and in the message for anyone searching for it.
 */
function listenError(err: unknown, variable: 'PORT' | 'BROKER_METRICS_PORT', host: string, port: number): Error {
  const { code, message } = err as NodeJS.ErrnoException;
  const reason =
    code === 'EADDRINUSE' ? `${variable} ${port} is already in use on ${host}`
    : code === 'EACCES' ? `${variable} ${port} may not be opened by this process on ${host} (ports below 1024 need privileges)`
    : code === 'EADDRNOTAVAIL' ? `HOST ${host} is not an address of this machine`
    : code === 'ENOTFOUND' || code === 'EAI_AGAIN' ? `HOST ${host} does not resolve`
    : `cannot listen on HOST ${host}, ${variable} ${port}: ${message}`;
  return Object.assign(new Error(code ? `${reason} (${code})` : reason, { cause: err }), { code });
}

/**
 * What startBroker throws when its `signal` aborts: by then whatever start-up had opened, listed in
 * `closed` in the order it started, is closed as a drain closes it (in-flight requests answered,
 * the reaper stopped and its leadership released, the pool ended). `closeFailure` says if that failed.
 */
export class StartupStopped extends Error {
  constructor(readonly closed: string[], readonly closeFailure?: unknown) {
    super(closeFailure ? `start-up stopped; closing what it had started failed: ${(closeFailure as Error).message}` : 'start-up stopped');
  }
}

/** `work`, or a StartupStopped as soon as `signal` aborts, leaving `work` to the process's exit. */
function unlessAborted<T>(work: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return work;
  if (signal.aborted) return Promise.reject(new StartupStopped([]));
  return new Promise<T>((resolve, reject) => {
    const stop = () => reject(new StartupStopped([]));
    signal.addEventListener('abort', stop, { once: true });
    work.then(resolve, reject).finally(() => signal.removeEventListener('abort', stop));
  });
}

/**
 * Migrates, builds the app, starts the reaper and listens. Used by `serve`, `dev` and `demo`.
 * With `signal` (serve's stop signals), an abort at any point stops start-up with StartupStopped:
 * while migrating at once (nothing is open yet, and the migration's transaction rolls back with
 * its connection), after that at the next step, once the step in progress (a query, bounded by
 * BROKER_QUERY_TIMEOUT) has ended.
 */
export async function startBroker(
  config: Config,
  options: BuildOptions & { migrate?: boolean; waitForDatabase?: boolean; signal?: AbortSignal } = {},
): Promise<RunningBroker> {
  const { signal } = options;
  const logger = options.logger ?? createLogger(config.logLevel, options.logDestination);
  // Before anything that can wait or fail, so the warning is seen on every start.
  for (const { entry, field, origin } of plainHttpKeySources(config)) {
    logger.warn({ variable: 'BROKER_ISSUERS', entry, field, url: origin }, 'signing keys are fetched over plain http from another machine: whoever can alter that traffic can sign tokens the broker accepts, admin tokens included; use https');
  }
  for (const { variable, audience } of listLikeAudiences(config)) {
    logger.warn({ variable, audience }, 'this audience holds a comma, and is one audience matched whole against a token\'s aud, not a list: '
      + 'a token must carry exactly this string; give each issuer its own "audience" in BROKER_ISSUERS instead');
  }
  if (options.migrate !== false) await unlessAborted(migrateWhenReachable(config, logger, options.waitForDatabase === true), signal);
  if (signal?.aborted) throw new StartupStopped([]);
  const app = await buildApp(config, { ...options, logger });
  // Whatever is open from here on, in the order it opened; closed together on any way out but success.
  const started: string[] = options.pool ? [] : ['database pool'];
  let metricsServer: FastifyInstance | null = null;
  const closeStarted = async () => {
    const results = await Promise.allSettled([metricsServer?.close(), app.close()]);
    const failed = results.find((r) => r.status === 'rejected');
    if (failed) throw failed.reason;
  };
  const stopIfAborted = () => {
    if (signal?.aborted) throw new StartupStopped([]);
  };
  try {
    stopIfAborted();
    await startupChecks(app, config, logger);
    stopIfAborted();
    const reaper = new Reaper({ pool: app.db, config, log: logger.child({ component: 'reaper' }), metrics: app.metrics });
    app.addHook('onReady', async () => {
      reaper.start();
      started.push('reaper');
    });
    app.addHook('onClose', async () => reaper.stop());
    if (config.metricsPort !== undefined) {
      const port = config.metricsPort;
      const server = Fastify({ logger: false, ...arrivalLimits() });
      metricsServer = server;
      server.get('/metrics', async (_req, reply) => reply.type(app.metrics.registry.contentType).send(await app.metrics.registry.metrics()));
      await server.listen({ host: config.host, port }).catch((err) => { throw listenError(err, 'BROKER_METRICS_PORT', config.host, port); });
      started.push('metrics listener');
      stopIfAborted();
    }
    // listen() makes the app ready first, which starts the reaper, then binds: a listen that
    // fails (port taken) leaves a reaper to stop, as much as an abort after it does.
    const url = await app.listen({ host: config.host, port: config.port }).catch((err) => { throw listenError(err, 'PORT', config.host, config.port); });
    started.push('API listener');
    stopIfAborted();
    return {
      app,
      url,
      reaper,
      close: async () => {
        await metricsServer?.close();
        await app.close();
      },
      metricsServer,
      dropConnections: () => {
        metricsServer?.server.closeAllConnections();
        app.server.closeAllConnections();
      },
    };
  } catch (err) {
    if (!(err instanceof StartupStopped)) {
      // A broker that cannot serve must not linger as a headless reaper holding the pool.
      await closeStarted().catch(() => undefined);
      throw err;
    }
    let closeFailure: unknown;
    await closeStarted().catch((failure: unknown) => { closeFailure = failure; });
    throw new StartupStopped(started, closeFailure);
  }
}

/**
 * What start-up checks in the database before serving: a search_path that is not ours refuses
 * the start; the rest warn. A check that cannot run warns that it could not, and start-up goes on.
 */
async function startupChecks(app: FastifyInstance, config: Config, logger: ReturnType<typeof createLogger>): Promise<void> {
  const searchPath = await searchPathProblem(app.db).catch((err: Error) => {
    logger.warn({ err: { message: err.message } }, 'could not check the search_path of the broker\'s sessions');
    return null;
  });
  if (searchPath) throw new Error(searchPath);
  const openTo = await brokerDatabaseOpenTo(app.db, config.managedRole).catch((err: Error) => {
    logger.warn({ err: { message: err.message } }, 'could not check who may connect to the broker\'s own database');
    return [];
  });
  if (openTo.length > 0) {
    logger.warn({ connect: openTo }, 'issued credentials can connect to the broker\'s own database, where a login can take the broker\'s advisory locks and stall issuance or reaping: '
      + 'REVOKE CONNECT, TEMPORARY ON DATABASE <this database> FROM PUBLIC, and keep the broker schema in a database no policy names (README, Least-privilege setup)');
  }
  const refused = await policiesRefusedNow(app.db).catch((err: Error) => {
    logger.warn({ err: { message: err.message } }, 'could not check the stored policies against today\'s rules');
    return [];
  });
  for (const { policy, problem } of refused) {
    logger.warn({ policy, problem }, 'a stored policy would be refused if stored today, and still issues credentials: fix it with PUT /policies/{name}');
  }
}

/**
 * How long a stop waits for the broker to close (requests in progress, the reaper, the pool) before
 * it gives up: `serve` then exits 1, `dev` stops its issuer and PostgreSQL without it.
 */
export const DRAIN_LIMIT_MS = 15_000;

/** `pg-broker serve`: run until SIGINT/SIGTERM, then drain requests and the reaper. */
export async function serve(config: Config): Promise<void> {
  const logger = createLogger(config.logLevel);
  const startup = new AbortController();
  let broker: RunningBroker | undefined;
  let closing = false;
  const exitIfStuck = () => {
    const force = setTimeout(() => {
      logger.error({ after_ms: DRAIN_LIMIT_MS }, 'shutdown did not finish in time; exiting');
      process.exit(1);
    }, DRAIN_LIMIT_MS);
    force.unref();
  };
  const shutdown = async (signal: string) => {
    if (closing) return;
    closing = true;
    exitIfStuck();
    if (!broker) {
      // startBroker stops at its next step and closes what it had opened; serve's own wait below
      // then exits. Handled at all because as PID 1, in a container, a signal with no handler is
      // ignored, and the stop would wait for its SIGKILL.
      logger.info({ signal }, 'shutting down before start-up finished');
      startup.abort(signal);
      return;
    }
    broker.app.log.info({ signal }, 'shutting down');
    try {
      await broker.close();
    } catch (err) {
      broker.app.log.error({ err: { message: (err as Error).message } }, 'shutdown failed');
      process.exit(1);
    }
    process.exit(0);
  };
  process.on('SIGINT', () => void shutdown('SIGINT'));
  process.on('SIGTERM', () => void shutdown('SIGTERM'));
  try {
    broker = await startBroker(config, { logger, metrics: new Metrics(true), waitForDatabase: true, signal: startup.signal });
  } catch (err) {
    if (!(err instanceof StartupStopped)) throw err;
    const signal = startup.signal.reason as string;
    if (err.closeFailure) {
      logger.error({ signal, closed: err.closed, err: { message: (err.closeFailure as Error).message } }, 'shutdown failed');
      process.exit(1);
    }
    logger.info({ signal, closed: err.closed }, 'start-up stopped by a signal');
    process.exit(0);
  }
  broker.app.log.info({ url: broker.url }, 'pg-credential-broker listening');
}
