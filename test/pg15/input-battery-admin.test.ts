import { runOnPg15 } from './run-on-pg15.js';

await runOnPg15('../input-battery-admin.test.js');
