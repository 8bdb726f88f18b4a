import { creatorNames } from '../../src/postgres/creators.js';
import type { TestIssuer } from '../../test/helpers/issuer.js';
import type { TestPostgres } from '../../test/helpers/postgres.js';
import { FloorConnections, TokenPool, type FloorSpec } from '../lib/load.js';
import { log } from '../lib/log.js';
import type { PopulationOptions } from '../lib/population.js';
import type { Results } from '../lib/results.js';
import { AUDIENCE, MANAGED_ROLE, POLICY, PRODUCTION_ENV, SETTINGS } from '../lib/settings.js';
import { signTokens } from '../lib/tokens.js';

/** What every scenario works with: the servers, the results being filled in, tokens and specs. */
export interface BenchContext {
  pgs: TestPostgres;
  /** The postmaster, whose children's CPU is PostgreSQL's share. */
  pmPid: number;
  issuer: TestIssuer;
  results: Results;
  adminToken: string;
  userSubjects: string[];
  /** Pre-signed RS256 tokens, one per user subject, handed out in turn. */
  tokens: TokenPool;
  /** The environment a broker process (or `pg-broker serve`) is started with. */
  brokerEnv(iterations: number): Record<string, string>;
  /** The raw-SQL floor's issuance, as the broker would do it for the bench policy. */
  floorSpec(iterations: number): FloorSpec;
  /** Issued roles created directly by the bench as superuser, as the broker would create them. */
  popOptions(prefix: string, expired?: boolean): PopulationOptions;
  /** Closes the floor's connections. */
  close(): Promise<void>;
}

export async function createContext(pgs: TestPostgres, pmPid: number, issuer: TestIssuer, results: Results): Promise<BenchContext> {
  const brokerEnv = (iterations: number): Record<string, string> => {
    const env: Record<string, string> = {};
    for (const [k, v] of Object.entries(process.env)) if (v !== undefined && !k.startsWith('NODE_TEST')) env[k] = v;
    return {
      ...env,
      ...PRODUCTION_ENV,
      DATABASE_URL: pgs.brokerUrl,
      BROKER_ISSUERS: JSON.stringify([{ issuer: issuer.issuer, jwks_uri: issuer.jwksUri }]),
      BROKER_AUDIENCE: AUDIENCE,
      BROKER_ADMINS: JSON.stringify([{ issuer: issuer.issuer, claims: { sub: 'admin:*' } }]),
      BROKER_SCRAM_ITERATIONS: String(iterations),
      // The reaper is driven explicitly (P4); its schedule must not fire in the middle of a run.
      BROKER_REAPER_INTERVAL: '3600',
      // Load from one loopback address must not meet the per-IP or per-identity rate limits.
      BROKER_RATE_LIMIT_IP: '1000000000',
      BROKER_RATE_LIMIT_IDENTITY: '1000000000',
      BROKER_MANAGED_ROLE: MANAGED_ROLE,
      HOST: '127.0.0.1',
      PORT: '0',
      LOG_LEVEL: 'info',
    };
  };

  log('signing tokens');
  const adminToken = (await signTokens(issuer, ['admin:bench']))[0];
  const userSubjects = Array.from({ length: SETTINGS.tokens }, (_, i) => `bench:user:${i}`);
  const tokens = new TokenPool(await signTokens(issuer, userSubjects));
  let floorSubject = 0;
  // The names the broker's migration creates on 16+ (it runs before any floor or population work).
  const creators = pgs.version >= 16 ? creatorNames(MANAGED_ROLE) : [];
  const floorConnections = new FloorConnections(pgs.brokerUrl);
  const floorSpec = (iterations: number): FloorSpec => ({
    databaseUrl: pgs.brokerUrl, connections: floorConnections, iterations, issuer: issuer.issuer, policy: POLICY, grantRole: 'app_readers', database: pgs.database,
    managedRole: MANAGED_ROLE, creators, ttlSeconds: 3600, maxTtlSeconds: 7200,
    subjects: () => `bench:floor:${floorSubject++ % SETTINGS.tokens}`,
  });
  const popOptions = (prefix: string, expired = false) => ({
    issuer: issuer.issuer, policy: POLICY, grantRole: 'app_readers', managedRole: MANAGED_ROLE, creators, database: pgs.database, prefix, expired,
  });

  return { pgs, pmPid, issuer, results, adminToken, userSubjects, tokens, brokerEnv, floorSpec, popOptions, close: () => floorConnections.close() };
}
