/** Markdown helpers shared by the report's sections. */

import type { CpuPerOp } from '../results.js';
import { fmt } from '../stats.js';

export function table(head: string[], rows: string[][]): string {
  return [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

export const pct = (x: number) => `${(x * 100).toFixed(0)} %`;

/** CPU ms per operation as a table cell: broker / PostgreSQL / client. */
export function cpuCell(c: CpuPerOp): string {
  const idle = c.idle !== undefined && Number.isFinite(c.idle) ? ` (idle ${fmt(c.idle * 100, 0)} %)` : '';
  return `${fmt(c.broker, 2)} / ${fmt(c.pg, 2)} / ${fmt(c.client, 2)}${idle}`;
}

/** A report section that was not measured in this run: its heading and the reason. */
export function notMeasured(heading: string, reason: string): string[] {
  return [heading, '', `Not measured in this run: ${reason}.`, ''];
}
