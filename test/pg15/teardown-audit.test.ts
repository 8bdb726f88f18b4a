import { runOnPg15 } from './run-on-pg15.js';

await runOnPg15('../teardown-audit.test.js');
