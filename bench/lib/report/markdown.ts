/** Markdown helpers shared by the report's sections. */

export function table(head: string[], rows: string[][]): string {
  return [`| ${head.join(' | ')} |`, `|${head.map(() => '---').join('|')}|`, ...rows.map((r) => `| ${r.join(' | ')} |`)].join('\n');
}

export const pct = (x: number) => `${(x * 100).toFixed(0)} %`;
