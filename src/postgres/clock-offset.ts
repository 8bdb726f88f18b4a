import type { FastifyBaseLogger } from 'fastify';
import type { Gauge } from 'prom-client';

/**
 * Beyond this (after subtracting what the round trip leaves unknown) the clocks disagree by more
 * than NTP ever lets them: one of the hosts has lost time sync.
 */
export const CLOCK_OFFSET_WARN_MS = 2000;

/**
 * How far PostgreSQL's clock is from this host's, read by the reaper's gauge update in a query of
 * its own, just before its counts.
 * Expiries do not depend on it: they are taken on PostgreSQL's clock (leases/expiry.ts). What
 * still reads this host's clock is token checking (exp, nbf, iat against the issuer's clock), and
 * clients compare the expires_at they are given with theirs, so an operator should hear of it.
 * Logged once when the offset goes out of bounds and once when it is back, not on every reading;
 * the gauge carries it in between.
 */
export class ClockOffsetWatch {
  private off = false;

  constructor(private readonly log: FastifyBaseLogger, private readonly gauge?: Gauge) {}

  /** One reading: PostgreSQL's clock_timestamp(), taken between `sentMs` and `receivedMs` on this host's clock. */
  observe(serverMs: number, sentMs: number, receivedMs: number): void {
    // The server read its clock somewhere in the round trip; its midpoint is the best guess, and
    // half the round trip the most it can be wrong by.
    const offsetMs = serverMs - (sentMs + receivedMs) / 2;
    const uncertaintyMs = (receivedMs - sentMs) / 2;
    this.gauge?.set(offsetMs / 1000);
    const fields = { offset_ms: Math.round(offsetMs), uncertainty_ms: Math.round(uncertaintyMs) };
    if (!this.off && Math.abs(offsetMs) - uncertaintyMs > CLOCK_OFFSET_WARN_MS) {
      this.off = true;
      this.log.warn(fields, "PostgreSQL's clock and this host's disagree (offset_ms: PostgreSQL's minus this host's): check NTP on both; "
        + 'expiries follow PostgreSQL\'s clock, token exp/nbf/iat checks follow this host\'s');
    } else if (this.off && Math.abs(offsetMs) + uncertaintyMs <= CLOCK_OFFSET_WARN_MS) {
      this.off = false;
      this.log.info(fields, "PostgreSQL's clock and this host's agree again");
    }
  }
}
