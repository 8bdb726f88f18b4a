import { runOnPg15 } from './run-on-pg15.js';

await runOnPg15('../orphan-audit.test.js');
