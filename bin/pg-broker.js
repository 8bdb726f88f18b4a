#!/usr/bin/env node
// The entry for a checkout (`npx pg-broker`, the tests): loads the TypeScript CLI through tsx, so
// nothing needs building first. Production runs the compiled dist/pg-broker.mjs (`npm run build`).
import { register } from 'tsx/esm/api';

register();
const { main } = await import('../src/cli/index.ts');
await main(process.argv);
