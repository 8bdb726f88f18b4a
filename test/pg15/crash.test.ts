import { runOnPg15 } from './run-on-pg15.js';

// Fewer kill trials on 15: the full 30 run on 18, and npm run test:soak goes further.
process.env.CRASH_TRIALS ??= '15';
await runOnPg15('../crash.test.js');
