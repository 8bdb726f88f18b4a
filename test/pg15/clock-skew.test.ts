import { runOnPg15 } from './run-on-pg15.js';

await runOnPg15('../clock-skew.test.js');
