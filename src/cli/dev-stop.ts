import { DRAIN_LIMIT_MS } from '../server.js';

const CUT_GRACE_MS = 2_000;

/**
 * SIGINT and SIGTERM, listened for before anything starts. Without a listener, one that came during
 * start-up ended the process at once, and a PostgreSQL still coming up (not yet known to the exit
 * clean-up) kept running whenever the signal reached the node process alone: `kill -INT <pid>`,
 * a supervisor, or the stop of a container, where as PID 1 it would even be ignored. The first
 * aborts `signal`. A later one is offered to `hurry`, which ends a wait that may be cut short (dev's
 * wait for its broker); otherwise it is absorbed, with a line saying so: leaving half-way through
 * the stop is what leaves a server behind, and PostgreSQL's own stop ends by itself (SIGKILL after 10 s).
 */
export function stopSignals(command: string, hurry: (signal: NodeJS.Signals) => boolean = () => false) {
  const stop = new AbortController();
  let requested!: (signal: NodeJS.Signals) => void;
  const onSignal = (signal: NodeJS.Signals) => {
    if (stop.signal.aborted) {
      if (!hurry(signal)) console.error(`pg-broker ${command}: already stopping after ${stop.signal.reason as string}; ${signal} ignored, wait for it to finish`);
      return;
    }
    stop.abort(signal);
    requested(signal);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    signal: stop.signal,
    /** Resolves with the first signal. */
    requested: new Promise<NodeJS.Signals>((resolve) => { requested = resolve; }),
    release() {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}

export interface Started {
  name: string;
  stop(): Promise<void>;
  /**
   * Present when the stop waits on others, as the broker's close waits for requests in progress,
   * which a client may never finish. Such a stop is waited for DRAIN_LIMIT_MS at most, or until a
   * further signal; then `cut` ends what it still waits on, so that nothing of it keeps the process
   * alive, and the rest is stopped without it. The others end by themselves: the dev issuer's close
   * destroys its sockets, and PostgreSQL's stop kills the server after 10 s. PostgreSQL's is never
   * given up on, since that is what would leave it running.
   */
  cut?(): void;
}

/** What dev has started, stopped newest first, so that PostgreSQL, started first, goes last. */
export class Teardown {
  private readonly started: Started[] = [];
  private giveUp: ((signal: NodeJS.Signals) => void) | null = null;
  /** The stop of the step last waited for with a limit, settled either way. */
  private stopping: Promise<unknown> = Promise.resolve();

  constructor(private readonly command: string) {}

  add(step: Started): void {
    this.started.push(step);
  }

  /** Newest first, as they would be stopped. */
  names(): string[] {
    return this.started.map((s) => s.name).reverse();
  }

  /** Ends the wait for a stop that may be cut short, when one is under way; false otherwise. */
  hurry(signal: NodeJS.Signals): boolean {
    if (!this.giveUp) return false;
    this.giveUp(signal);
    return true;
  }

  /**
   * Stops everything. One that fails must not leave the others running; the first failure is thrown
   * after all were tried. Resolves with the names of those given up on, each announced by one line
   * when it was.
   */
  async run(): Promise<string[]> {
    const steps = this.started.splice(0).reverse();
    const failures: unknown[] = [];
    const givenUp: string[] = [];
    for (const [i, step] of steps.entries()) {
      const reason = await this.waitFor(step).catch((err: unknown) => {
        failures.push(err);
        return null;
      });
      if (reason === null) continue;
      step.cut!();
      givenUp.push(step.name);
      const rest = steps.slice(i + 1).map((s) => s.name);
      console.error(`pg-broker ${this.command}: ${reason}; ${rest.length > 0 ? `stopping ${rest.join(', ')} without it` : 'going on without it'}`);
      // With its clients cut off, the rest of its stop (the reaper, the pool) usually ends at once;
      // a moment's wait keeps PostgreSQL's stop from cutting those connections under it (57P01
      // warnings after the banner), and never more than that moment.
      let grace: NodeJS.Timeout | undefined;
      await Promise.race([this.stopping, new Promise((r) => { grace = setTimeout(r, CUT_GRACE_MS); })]);
      clearTimeout(grace);
    }
    if (failures.length > 0) throw failures[0];
    return givenUp;
  }

  /** null once `step` has stopped; why it was given up on, if it was. Rejects as its stop does. */
  private async waitFor(step: Started): Promise<string | null> {
    const stopping = step.stop().then(() => null);
    if (!step.cut) return stopping;
    // A stop given up on may still fail later, with nobody waiting for it.
    this.stopping = stopping.catch(() => null);
    let timer: NodeJS.Timeout | undefined;
    const givenUp = new Promise<string>((resolve) => {
      timer = setTimeout(() => resolve(`${step.name} did not stop within ${DRAIN_LIMIT_MS / 1000} s (a request still in progress?)`), DRAIN_LIMIT_MS);
      this.giveUp = (signal) => resolve(`${signal} while stopping: no longer waiting for ${step.name} to stop`);
    });
    try {
      return await Promise.race([stopping, givenUp]);
    } finally {
      clearTimeout(timer);
      this.giveUp = null;
    }
  }
}
