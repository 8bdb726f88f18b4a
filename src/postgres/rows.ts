/**
 * JSON for a jsonb column. PostgreSQL refuses two things a token's claims may carry: the NUL
 * character, and a lone UTF-16 surrogate (JSON.stringify writes paired ones as characters and
 * only lone ones as \udXXX escapes). Both become U+FFFD. Only real escapes are rewritten: the
 * same text with its backslash doubled by JSON.stringify is data and stays as it is.
 */
export function jsonbText(value: unknown): string {
  return JSON.stringify(value).replace(/(?<=(?:^|[^\\])(?:\\\\)*)\\u(?:0000|d[89a-f][0-9a-f]{2})/g, '\\ufffd');
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
