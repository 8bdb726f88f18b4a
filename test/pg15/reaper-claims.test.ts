import { runOnPg15 } from './run-on-pg15.js';

await runOnPg15('../reaper-claims.test.js');
