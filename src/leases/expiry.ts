/**
 * Every expiry is taken on PostgreSQL's clock, inside a statement the broker sends anyway: that
 * clock enforces VALID UNTIL, and the quota, the reaper and renewal compare expires_at with its
 * now(). One taken on the broker's host would be off by however far that host's clock is: 10
 * minutes ahead made a 60 s max_ttl a 660 s login, 2 minutes behind answered 201 with a password
 * that had already expired.
 *
 * This is the statement's start as whole Unix seconds, rounded up, so that start + ttl never
 * falls inside a second and a lease never lives shorter than its ttl (nor more than a second
 * longer). EXTRACT gives numeric, exact to the microsecond; float8 keeps every whole second
 * exactly and lets to_timestamp take the sum.
 */
export const SERVER_SECOND_SQL = 'pg_catalog.ceil(EXTRACT(epoch FROM pg_catalog.statement_timestamp()))::float8';
