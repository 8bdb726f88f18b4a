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

/**
 * What GET /audit filters on (AuditQuery). Sent as given: a broker too old to know `owner`
 * refuses the query (400) rather than ignoring it.
 */
export const AUDIT_FILTERS: readonly Filter[] = [
  { flags: '--type <type>', description: 'event type, e.g. credential.issued, lease.revoked, policy.deleted (the README lists them)' },
  { flags: '--subject <sub>', description: 'who acted: the subject of the token behind the event' },
  { flags: '--owner <sub>', description: 'whose lease the event concerns (the subject it was issued to)' },
  { flags: '--owner-issuer <iss>', description: 'the issuer of the token the lease was issued to (with --owner: one identity)' },
  { flags: '--issuer <iss>', description: 'the issuer of the token behind the event' },
  { flags: '--lease-id <id>', description: 'events of one lease' },
  { flags: '--policy <name>' },
  { flags: '--username <role>', description: 'the issued PostgreSQL role' },
  { flags: '--since <time>', description: `at or after ${TIME}` },
  { flags: '--until <time>', description: 'before this time' },
];
