import createError from '@fastify/error';

// One catalogue of the errors clients can see. The `code` is the stable contract; messages
// may improve over time. 5xx messages never reach clients (see problem.ts), except the few
// written for them (REVOKE_INCOMPLETE, DATABASE_BUSY, DatabaseUnavailableDuring's). problem.ts
// writes INVALID_TOKEN and a bare DATABASE_UNAVAILABLE itself; their entries keep the list whole.
export const Errors = {
  BadRequest: createError<[string]>('BAD_REQUEST', '%s', 400),
  InvalidToken: createError<[string]>('INVALID_TOKEN', '%s', 401),
  MissingToken: createError('MISSING_TOKEN', 'A bearer token is required', 401),
  NotAdmin: createError('NOT_ADMIN', 'This operation needs an admin token', 403),
  NoPolicy: createError<[string]>('NO_POLICY', '%s', 403),
  UnsafeGrantRole: createError<[string]>('GRANT_ROLE_UNSAFE', '%s', 403),
  PolicyDatabaseMissing: createError<[string]>('POLICY_DATABASE_MISSING', '%s', 403),
  LeaseNotFound: createError('LEASE_NOT_FOUND', 'No such lease', 404),
  PolicyNotFound: createError('POLICY_NOT_FOUND', 'No such policy', 404),
  AmbiguousPolicy: createError<[string]>('AMBIGUOUS_POLICY', '%s', 409),
  LeaseEnded: createError<[string]>('LEASE_ENDED', '%s', 409),
  QuotaExceeded: createError<[string]>('LEASE_QUOTA_EXCEEDED', '%s', 429),
  RateLimited: createError<[string]>('RATE_LIMITED', '%s', 429),
  InvalidPolicy: createError<[string]>('INVALID_POLICY', '%s', 400),
  RevokeIncomplete: createError<[string]>('REVOKE_INCOMPLETE', '%s', 500),
  DatabaseUnavailable: createError('DATABASE_UNAVAILABLE', 'PostgreSQL is unavailable, retry shortly', 503),
  /** DATABASE_UNAVAILABLE with a detail of its own: what an interrupted revocation got done. */
  DatabaseUnavailableDuring: createError<[string]>('DATABASE_UNAVAILABLE', '%s', 503),
  DatabaseBusy: createError<[string]>('DATABASE_BUSY', '%s', 503),
};
