#!/usr/bin/env node
// The entry for a checkout (`npx pg-broker`, the tests): loads the TypeScript CLI through tsx, so
// nothing needs building first. Production runs the compiled dist/pg-broker.mjs (`npm run build`).
// tsx is a development dependency: after `npm ci --omit=dev` this falls back to dist/.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

let tsx;
try {
  tsx = await import('tsx/esm/api');
} catch (err) {
  // Only tsx itself missing means a production install; a broken tsx install must still fail loudly.
  if (err?.code !== 'ERR_MODULE_NOT_FOUND' || !err.message.includes("'tsx'")) throw err;
}

if (tsx) {
  tsx.register();
  const { main } = await import('../src/cli/index.ts');
  await main(process.argv);
} else {
  const compiled = new URL('../dist/pg-broker.mjs', import.meta.url);
  if (!existsSync(fileURLToPath(compiled))) {
    process.stderr.write(
      'pg-broker: tsx is not installed (a production install, npm ci --omit=dev?) and dist/pg-broker.mjs is missing.\n' +
        'Build it where development dependencies are installed (npm run build) and run node dist/pg-broker.mjs, or install tsx.\n',
    );
    process.exit(1);
  }
  // The compiled CLI runs itself on import.
  await import(compiled.href);
}
