/**
 * JSON for a jsonb column: PostgreSQL refuses the NUL character (\u0000) in jsonb text, and a
 * token may carry one, so it becomes U+FFFD. Only a real escape is rewritten: the text
 * backslash-u-0000 (serialised with its backslash doubled) is left as it is.
 */
export function jsonbText(value: unknown): string {
  return JSON.stringify(value).replace(/(?<=(?:^|[^\\])(?:\\\\)*)\\u0000/g, '\\ufffd');
}

/** Converts pg's Date values to RFC 3339 UTC strings, leaving everything else alone. */
export function isoRow<T>(row: Record<string, unknown>): T {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(row)) out[key] = value instanceof Date ? value.toISOString() : value;
  return out as T;
}

// Keyset cursors are opaque to clients: base64url JSON of the last row's sort key.
export function encodeCursor(key: unknown[]): string {
  return Buffer.from(JSON.stringify(key)).toString('base64url');
}

export function decodeCursor(cursor: string, arity: number): unknown[] | null {
  try {
    const key = JSON.parse(Buffer.from(cursor, 'base64url').toString('utf8')) as unknown;
    return Array.isArray(key) && key.length === arity && key.every((k) => typeof k === 'string' || typeof k === 'number') ? key : null;
  } catch {
    return null;
  }
}
