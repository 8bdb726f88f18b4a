import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildBundle, CLI_ENTRY } from '../../scripts/build.js';
import { ROOT } from './settings.js';

export interface CompiledEntries {
  /** bench/broker-process.ts compiled, for BrokerChild. */
  broker: string;
  /** The CLI compiled exactly as `npm run build` compiles dist/pg-broker.mjs, for the start-up scenario. */
  cli: string;
}

let built: Promise<CompiledEntries> | undefined;

/**
 * The broker processes the bench measures run compiled JavaScript on plain `node`, as production
 * does, so RSS and start-up carry no tsx loader. Built once per run from the current sources
 * (never a possibly stale dist/) into a temp dir that goes away when the bench exits; its
 * node_modules link resolves the bundles' external imports to this checkout's dependencies.
 */
export function compiledEntries(): Promise<CompiledEntries> {
  built ??= (async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgcb-bench-build-'));
    process.once('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
    fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'));
    // One directory per bundle: each has its own chunks, named by content hash.
    const entries = { broker: path.join(dir, 'broker/broker-process.mjs'), cli: path.join(dir, 'cli/pg-broker.mjs') };
    await Promise.all([buildBundle(path.join(ROOT, 'bench/broker-process.ts'), entries.broker), buildBundle(CLI_ENTRY, entries.cli)]);
    return entries;
  })();
  return built;
}
