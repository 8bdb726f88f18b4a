import pg from 'pg';

// pg exports these at the top level; NUL bytes cannot be represented in SQL text at all.
export function escapeIdent(name: string): string {
  if (name.includes('\0')) throw new Error('identifier contains a NUL byte');
  return pg.escapeIdentifier(name);
}

export function escapeLit(value: string): string {
  return pg.escapeLiteral(value.replace(/\0/g, '\uFFFD'));
}
