import assert from 'node:assert/strict';
import type { TestBroker } from './broker.js';

// Shared by the input batteries: every response is checked for a 5xx and for PostgreSQL's own
// error text, so each test proves both for what it sent.

// Phrases PostgreSQL puts in its error messages; our own texts never use them.
const PG_ERROR_TEXT = [
  /syntax error/i, /violates/i, /\brelation\b/i, /duplicate key/i, /invalid byte sequence/i, /unsupported Unicode escape/i,
  /invalid input syntax/i, /null value in column/i, /(role|relation|database|column|schema|function) "[^"]*" does not exist/i,
  /\bSQLSTATE\b/i, /current transaction is aborted/i, /out of range for type/i, /value too long for type/i, /permission denied/i,
];

export interface Sent {
  method?: 'GET' | 'POST' | 'PUT' | 'DELETE';
  url?: string;
  token?: string | null;
  payload?: unknown;
  raw?: string;
  contentType?: string;
}

export interface Answer {
  status: number;
  body: string;
  json: () => any;
  headers: Record<string, unknown>;
}

/** send(label, request) against the broker `broker()` returns: a user token unless one is given, null for none. */
export function batterySender(broker: () => TestBroker): (label: string, req: Sent) => Promise<Answer> {
  return async (label, req) => {
    const b = broker();
    const headers: Record<string, string> = {};
    if (req.token !== null) headers.authorization = `Bearer ${req.token ?? (await b.token())}`;
    if (req.raw !== undefined || req.contentType) headers['content-type'] = req.contentType ?? 'application/json';
    const res = await b.app.inject({
      method: req.method ?? 'POST',
      url: req.url ?? '/credentials',
      headers,
      ...(req.raw !== undefined ? { payload: req.raw } : req.payload !== undefined ? { payload: req.payload as object } : {}),
    });
    assertNoServerErrorOrLeak(label, res.statusCode, res.body);
    return { status: res.statusCode, body: res.body, json: () => res.json(), headers: res.headers };
  };
}

export function assertNoServerErrorOrLeak(label: string, status: number, body: string): void {
  assert.ok(status < 500, `${label}: ${status} ${body}`);
  const leaks = PG_ERROR_TEXT.filter((re) => re.test(body)).map((re) => `${re} in ${body.slice(0, 300)}`);
  assert.deepEqual(leaks, [], `${label}: PostgreSQL error text in the response`);
}

export function assertProblem(res: { status: number; body: string; headers: Record<string, unknown> }, status: number, label: string): void {
  assert.equal(res.status, status, `${label}: ${res.status} ${res.body}`);
  assert.match(String(res.headers['content-type']), /^application\/problem\+json/, label);
  const body = JSON.parse(res.body);
  assert.equal(body.status, status, label);
  assert.equal(typeof body.code, 'string', label);
  assert.ok(body.detail.length > 0, label);
}
