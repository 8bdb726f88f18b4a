import type { Filter } from './listing.js';

const TIME = 'an RFC 3339 time with its zone, e.g. 2026-01-01T00:00:00Z';

/** What GET /leases filters on (LeaseQuery). A test checks every query parameter has its option. */
export const LEASE_FILTERS: readonly Filter[] = [
  { flags: '--subject <sub>', description: 'the token subject the lease was issued to' },
  { flags: '--issuer <iss>', description: 'the token issuer' },
  { flags: '--policy <name>' },
  { flags: '--state <state>', description: 'pending, active, revoking, expired, revoked or revoke_failed' },
  { flags: '--username <role>', description: 'the issued PostgreSQL role' },
  { flags: '--since <time>', description: `issued at or after ${TIME}` },
  { flags: '--until <time>', description: 'issued before this time' },
];

