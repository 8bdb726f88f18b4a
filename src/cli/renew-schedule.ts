/**
 * When `pg-broker exec` renews its lease next. Pure, so the timing can be tested without a clock.
 * All instants are epoch milliseconds (UTC) on the broker's clock (serverNowMs); all delays are milliseconds.
 */

/** The first retry after a failed renew waits this long; each further failure doubles it… */
export const RENEW_RETRY_FIRST_MS = 2_000;
/** …up to this. */
export const RENEW_RETRY_MAX_MS = 30_000;
/** A renew sent later than this before expires_at may land after the lease has lapsed. */
export const RENEW_REQUEST_ALLOWANCE_MS = 1_000;
/** The shortest wait between attempts, so a failure that comes back at once cannot spin. */
export const RENEW_RETRY_FLOOR_MS = 250;
/** The shortest wait before a routine renew. */
export const RENEW_FLOOR_MS = 1_000;
/**
 * The longest wait: setTimeout takes a signed 32-bit delay and fires after 1 ms for anything
 * larger, so a lease of more than about 37 days (two thirds of it past 24.8 days) would be renewed
 * in a tight loop. Renewing earlier than two thirds costs one request; the loop floods the broker.
 */
export const RENEW_MAX_DELAY_MS = 2 ** 31 - 1;

export interface LeaseTimes {
  expiresAtMs: number;
  maxExpiresAtMs: number;
}

/**
 * How long to wait before the next renew attempt, or null when no attempt can help: the lease is
 * already at max_expires_at, or it has lapsed (the broker refuses to renew a lapsed lease).
 *
 * `failures` counts the renew attempts that failed since the last success. With none, the renew
 * is due at two thirds of the remaining lifetime (at most RENEW_MAX_DELAY_MS). After a failure the wait backs off
 * exponentially, but is never put off past the last moment a renew can still land before
 * expires_at: a lease that runs out while we wait politely is the failure this exists to prevent.
 */
export function nextRenewDelayMs(lease: LeaseTimes, nowMs: number, failures: number): number | null {
  if (lease.expiresAtMs >= lease.maxExpiresAtMs) return null;
  const remainingMs = lease.expiresAtMs - nowMs;
  if (remainingMs <= 0) return null;
  if (failures <= 0) return Math.min(RENEW_MAX_DELAY_MS, Math.round(Math.max(RENEW_FLOOR_MS, (remainingMs * 2) / 3)));
  if (remainingMs <= RENEW_RETRY_FLOOR_MS) return null;
  const backoffMs = Math.min(RENEW_RETRY_MAX_MS, RENEW_RETRY_FIRST_MS * 2 ** (failures - 1));
  return Math.round(Math.max(RENEW_RETRY_FLOOR_MS, Math.min(backoffMs, remainingMs - RENEW_REQUEST_ALLOWANCE_MS)));
}

/**
 * The broker's clock as one of its answers read it, carried forward on this process's monotonic
 * clock (performance.now()): `serverMs` was the broker's time when `monoMs` was ours.
 */
export interface ServerClockReading {
  serverMs: number;
  monoMs: number;
}

/** Milliseconds of an HTTP date (RFC 9110), or NaN: Date.parse takes nearly anything ("-5" is a year); an HTTP date ends in GMT. */
export function httpDateMs(value: string | null): number {
  const text = value?.trim() ?? '';
  return /GMT$/.test(text) ? Date.parse(text) : NaN;
}

/**
 * A reading from an answer's Date header, taken as it arrived (`arrivedMonoMs`), or null when
 * there is none (a proxy that drops it) or it is no HTTP date. Date holds whole seconds, cut
 * down: the answer left within the second after it, and reading the end of that second errs
 * toward renewing early, never late.
 */
export function readServerClock(dateHeader: string | null, arrivedMonoMs: number): ServerClockReading | null {
  const at = httpDateMs(dateHeader);
  return Number.isNaN(at) ? null : { serverMs: at + 999, monoMs: arrivedMonoMs };
}

/**
 * Now on the broker's clock, for comparing with the expires_at it answered: this machine's own
 * clock may be off by minutes (a VM resumed, NTP blocked on a CI runner), and a clock behind would
 * renew after the lease lapsed, one ahead renew early or, ahead by more than the lease's lifetime,
 * never. expires_at is PostgreSQL's time and Date the broker host's; the broker warns when those
 * two disagree. Without a reading, this machine's clock is all there is.
 */
export function serverNowMs(reading: ServerClockReading | null, monoNowMs: number, localNowMs: number): number {
  return reading ? reading.serverMs + (monoNowMs - reading.monoMs) : localNowMs;
}

/**
 * The wait before the next renew attempt: the sooner of what the broker's clock (its latest Date,
 * serverNowMs) and this machine's clock say, leaving out a clock by which the lease has lapsed
 * while the other still has time. Either can be wrong: this machine's (a VM resumed, NTP blocked),
 * or the Date header (nginx, for one, sends its own host's Date, not the broker's). One clock off
 * by more than the lease's lifetime then neither lets the lease lapse nor stops the renewals; off
 * the other way it costs an early renew, never a late one. Null only when neither clock can help.
 */
export function renewDelayMs(lease: LeaseTimes, reading: ServerClockReading | null, monoNowMs: number, localNowMs: number, failures: number): number | null {
  const delays = [serverNowMs(reading, monoNowMs, localNowMs), localNowMs]
    .map((nowMs) => nextRenewDelayMs(lease, nowMs, failures))
    .filter((delay): delay is number => delay !== null);
  return delays.length > 0 ? Math.min(...delays) : null;
}

// 400: the request itself is wrong and will be every time; 404: the lease is gone or not ours;
// 409: LEASE_ENDED (revoked, expired or being torn down). Anything else (5xx, 429, 401 while the
// IdP's keys are unreachable, a refused connection, a token that could not be fetched) may pass.
const FINAL_RENEW_STATUSES = new Set([400, 404, 409]);

/**
 * Whether a failed renew can never succeed: the broker answered one of the statuses above. No
 * answer at all (unreachable) or a failure before asking (no token) counts as transient.
 */
export function isFinalRenewFailure(err: unknown): boolean {
  const status = (err as { status?: unknown } | null)?.status;
  return typeof status === 'number' && FINAL_RENEW_STATUSES.has(status);
}
