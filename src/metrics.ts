import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';

/** One registry per app instance, so tests and several apps in one process do not collide. */
export class Metrics {
  readonly registry = new Registry();
  readonly issued = new Counter({ name: 'broker_credentials_issued_total', help: 'Credentials issued', labelNames: ['policy'], registers: [this.registry] });
  readonly denied = new Counter({ name: 'broker_credentials_denied_total', help: 'Credential requests denied', labelNames: ['policy', 'reason'], registers: [this.registry] });
  readonly revoked = new Counter({ name: 'broker_leases_revoked_total', help: 'Leases revoked and torn down', registers: [this.registry] });
  readonly expired = new Counter({ name: 'broker_leases_expired_total', help: 'Leases expired and torn down', registers: [this.registry] });
  readonly orphans = new Counter({ name: 'broker_orphan_roles_dropped_total', help: 'Managed roles without a live lease that were dropped', registers: [this.registry] });
  readonly issueSeconds = new Histogram({
    name: 'broker_issue_duration_seconds',
    help: 'Time to issue a credential once the token is verified',
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    registers: [this.registry],
  });
  readonly activeLeases = new Gauge({ name: 'broker_active_leases', help: 'Leases in state active', registers: [this.registry] });
  readonly reaperLag = new Gauge({ name: 'broker_reaper_lag_seconds', help: 'Age of the oldest ended lease whose role is not yet dropped', registers: [this.registry] });
  readonly clockOffset = new Gauge({ name: 'broker_clock_offset_seconds', help: "PostgreSQL's clock minus this host's, read after every reaper run", registers: [this.registry] });
  readonly reaperFailures = new Counter({ name: 'broker_reaper_failures_total', help: 'Lease teardowns that failed and will be retried', registers: [this.registry] });
  readonly jwksFetchErrors = new Counter({ name: 'broker_jwks_fetch_errors_total', help: 'JWKS or discovery fetches that failed', labelNames: ['issuer'], registers: [this.registry] });

  constructor(collectDefaults = false) {
    if (collectDefaults) collectDefaultMetrics({ register: this.registry });
  }
}
