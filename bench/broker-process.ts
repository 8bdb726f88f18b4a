/**
 * The broker as the bench runs it: its own process (as in production), started through
 * startBroker from src/server.ts with configuration from the environment, so its CPU and RSS
 * can be read from /proc and the load generator does not share its event loop. The bench runs
 * it compiled (bench/lib/bundle.ts), on plain node like dist/pg-broker.mjs.
 *
 * Talks to bench/run.ts over the IPC channel:
 *   -> { id, cmd: 'reap' }                 drain the expired backlog with Reaper.reap(), timed
 *   -> { id, cmd: 'profile-start' }        start the V8 CPU profiler (node:inspector)
 *   -> { id, cmd: 'profile-stop', file }   stop it, write the .cpuprofile, answer a summary
 *   -> { id, cmd: 'memory' }               process.memoryUsage()
 *   -> { id, cmd: 'close' }                graceful shutdown
 *   <- { ready: url } once listening; { id, ok, result | error } per command
 */
import fs from 'node:fs';
import { Session } from 'node:inspector/promises';
import { loadConfig } from '../src/config.js';
import { startBroker } from '../src/server.js';
import { mapToSources, summarizeProfile, type CpuProfile } from './lib/profile.js';

interface Command {
  id: number;
  cmd: string;
  file?: string;
  maxMs?: number;
}

const send = (message: unknown) => process.send?.(message);

async function main(): Promise<void> {
  const config = loadConfig(process.env);
  const broker = await startBroker(config);
  let session: Session | null = null;

  const handle = async (msg: Command): Promise<unknown> => {
    switch (msg.cmd) {
      case 'reap': {
        // Reaper.reap() ends at most REAP_BATCH x MAX_BATCHES_PER_RUN leases per run; call it
        // until a run finds nothing due, as the cron schedule would over successive ticks.
        // At the cap, stop() lets the batch in progress finish and ends the run, as on shutdown.
        const started = performance.now();
        let capped = false;
        const cap = setTimeout(() => {
          capped = true;
          void broker.reaper.stop();
        }, msg.maxMs ?? 300_000);
        let ended = 0;
        let failed = 0;
        let runs = 0;
        try {
          for (;;) {
            const stats = await broker.reaper.reap();
            runs++;
            ended += stats.ended;
            failed += stats.failed;
            if ((stats.ended === 0 && stats.failed === 0) || capped) break;
          }
        } finally {
          clearTimeout(cap);
        }
        const ms = performance.now() - started;
        if (capped) {
          await broker.reaper.stop();
          broker.reaper.start();
        }
        return { ended, failed, runs, ms, capped };
      }
      case 'profile-start': {
        session = new Session();
        session.connect();
        await session.post('Profiler.enable');
        await session.post('Profiler.setSamplingInterval', { interval: 200 });
        await session.post('Profiler.start');
        return null;
      }
      case 'profile-stop': {
        if (!session) throw new Error('profiler not started');
        const { profile } = (await session.post('Profiler.stop')) as unknown as { profile: CpuProfile };
        session.disconnect();
        session = null;
        mapToSources(profile);
        if (msg.file) fs.writeFileSync(msg.file, JSON.stringify(profile));
        return summarizeProfile(profile, 20);
      }
      case 'memory':
        return process.memoryUsage();
      case 'close':
        await broker.close();
        setImmediate(() => process.exit(0));
        return null;
      default:
        throw new Error(`unknown command ${msg.cmd}`);
    }
  };

  process.on('message', (msg: Command) => {
    handle(msg).then(
      (result) => send({ id: msg.id, ok: true, result }),
      (err: Error) => send({ id: msg.id, ok: false, error: err.stack ?? err.message }),
    );
  });
  // The parent going away (crash, Ctrl-C) must not leave a broker behind.
  process.on('disconnect', () => {
    broker.close().finally(() => process.exit(0));
  });
  send({ ready: broker.url });
}

main().catch((err: Error) => {
  process.stderr.write(`bench broker failed to start: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
