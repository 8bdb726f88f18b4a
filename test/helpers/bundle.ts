import { rmSync } from 'node:fs';
import { mkdtemp, symlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildBundle, CLI_ENTRY } from '../../scripts/build.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));

let built: Promise<string> | undefined;

/**
 * The CLI compiled from the current sources the way `npm run build` compiles it for production,
 * once per test process (about 0.3 s), into a temp dir removed on exit. The suites start
 * `pg-broker` a few hundred times in all; through bin/pg-broker.js each start pays for tsx's
 * loader, about 0.75 s of CPU against 0.2 s for the bundle, and the suite is CPU-bound on two
 * cores. cli.test.ts still runs bin/pg-broker.js through tsx itself.
 */
export function cliBundle(): Promise<string> {
  built ??= (async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'pgcb-test-cli-'));
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
    // Dependencies stay external to the bundle, as in production: found through node_modules beside it.
    await symlink(path.join(ROOT, 'node_modules'), path.join(dir, 'node_modules'));
    const file = path.join(dir, 'pg-broker.mjs');
    await buildBundle(CLI_ENTRY, file);
    return file;
  })();
  return built;
}
