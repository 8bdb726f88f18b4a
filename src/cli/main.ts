#!/usr/bin/env node
// The entry that scripts/build.ts compiles to dist/pg-broker.mjs. index.ts only runs itself when
// started as src/cli/index.ts, so the bundle needs a module whose whole job is to call main().
import { main } from './index.js';

await main(process.argv);
