import { setTimeout as sleep } from 'node:timers/promises';
import { callBroker, CliError } from './client.js';

/**
 * 429s in a row after which a listing gives up. The broker's window is a minute, so one wait
 * normally suffices; refusals that go on mean something else is spending the same allowance
 * (another export under the same identity or address), and an export should not wait forever.
 */
export const RATE_LIMIT_REFUSALS = 5;
export const DEFAULT_MAX_WAIT_SECONDS = 60;
/** For a 429 without a readable Retry-After: not the broker's (it always sends one), perhaps a proxy's. */
const UNSAID_WAIT_SECONDS = 10;

type Env = Record<string, string | undefined>;

/** PG_BROKER_RATE_LIMIT_MAX_WAIT: the longest one wait may last, whole seconds ≥ 1. */
export function maxWaitSeconds(env: Env = process.env): number {
  const value = env.PG_BROKER_RATE_LIMIT_MAX_WAIT;
  if (value === undefined) return DEFAULT_MAX_WAIT_SECONDS;
  if (!/^\d+$/.test(value.trim()) || Number(value) < 1) {
    throw new CliError('PG_BROKER_RATE_LIMIT_MAX_WAIT must be a whole number of seconds ≥ 1 (the longest one wait for a rate-limited broker may last)');
  }
  return Number(value);
}

/** The broker kept refusing with 429: `detail` is its last reason, `refusals` how many in a row. */
export class RateLimitedOut extends CliError {
  constructor(path: string, readonly detail: string, readonly refusals: number) {
    super(`GET ${path.split('?')[0]} was refused ${refusals} times in a row (${detail}); gave up`, 1, 429, 'RATE_LIMITED');
    this.name = 'RateLimitedOut';
  }
}

/**
 * GETs for one command that wait out the broker's rate limit (429) for as long as its
 * Retry-After says, each wait capped, rather than fail part-way through an export. Only reads:
 * a retried POST /credentials would mint a second credential when the first had been issued.
 */
export class RateLimitPacer {
  private told = false;

  constructor(readonly maxWaitSeconds: number = DEFAULT_MAX_WAIT_SECONDS) {}

  async get<T>(base: string, token: string, path: string): Promise<T> {
    for (let refusals = 1; ; refusals++) {
      try {
        return (await callBroker<T>(base, token, 'GET', path)).body;
      } catch (err) {
        if (!(err instanceof CliError) || err.status !== 429) throw err;
        const detail = err.message.replace(/^GET \S+ failed with /, '');
        if (refusals >= RATE_LIMIT_REFUSALS) throw new RateLimitedOut(path, detail, refusals);
        // At least a second: a Retry-After of 0 must not become a burst of immediate retries.
        const seconds = Math.max(1, Math.min(err.retryAfterSeconds ?? UNSAID_WAIT_SECONDS, this.maxWaitSeconds));
        // Once per command: a person watching a long export learns why it paused; a log is not
        // filled with a line per page.
        if (!this.told) {
          process.stderr.write(`pg-broker: the broker is limiting the rate of requests (${detail}); waiting ${seconds} s, `
            + `then going on (each wait at most ${this.maxWaitSeconds} s; gives up after ${RATE_LIMIT_REFUSALS} refusals in a row)\n`);
          this.told = true;
        }
        await sleep(seconds * 1000);
      }
    }
  }
}
