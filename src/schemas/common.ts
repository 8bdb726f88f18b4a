import { Type, type Static } from '@sinclair/typebox';

export const Timestamp = Type.String({ format: 'date-time', description: 'RFC 3339, UTC' });
export const NullableTimestamp = Type.Union([Timestamp, Type.Null()]);
export const ClientIp = Type.Union([Type.String(), Type.Null()], {
  description: 'The caller\'s address: the connection\'s, or the client X-Forwarded-For names when the connection came from a proxy in BROKER_TRUST_PROXY and that entry is an IP address (otherwise the nearest proxy\'s)',
});
// A bound a caller gives: any offset is fine. The description is also the 400's text for a value
// that is no date-time or out of range (see schemaErrors; validation.ts keeps out year 0000).
const TimestampFilter = Type.String({
  format: 'date-time',
  description: 'an RFC 3339 date-time with a time zone (e.g. 2026-01-01T00:00:00Z), years 0001 to 9999',
});

export const Problem = Type.Object(
  {
    type: Type.String(),
    title: Type.String(),
    status: Type.Integer(),
    detail: Type.String(),
    code: Type.String({ description: 'Stable machine-readable error code' }),
    instance: Type.Optional(Type.String()),
    request_id: Type.Optional(Type.String()),
  },
  { $id: 'Problem', description: 'RFC 9457 problem details' },
);
export type ProblemBody = Static<typeof Problem>;

export const ClaimPatternsSchema = Type.Record(
  Type.String({ minLength: 1, maxLength: 256 }),
  // The description is also the 400's text when a pattern is neither (see schemaErrors).
  Type.Union([Type.String({ maxLength: 1024 }), Type.Array(Type.String({ maxLength: 1024 }), { minItems: 1, maxItems: 100 })], {
    description: 'a glob or a list of 1 to 100 globs, each a string: a claim matches by its JSON text, so write true or 42 as "true" or "42"',
  }),
  { description: 'claim name or JSON pointer -> glob or list of globs (`*` is the only wildcard)' },
);

export const Cursor = Type.String({ maxLength: 512, description: 'Opaque cursor from a previous page' });
export const Limit = Type.Integer({ minimum: 1, maximum: 1000, default: 100 });

/** The filters and paging GET /leases and GET /audit share. */
export const ListFilters = {
  subject: Type.Optional(Type.String({ maxLength: 1024 })),
  issuer: Type.Optional(Type.String({ maxLength: 1024 })),
  policy: Type.Optional(Type.String({ maxLength: 63 })),
  username: Type.Optional(Type.String({ maxLength: 63 })),
  since: Type.Optional(TimestampFilter),
  until: Type.Optional(TimestampFilter),
  limit: Type.Optional(Limit),
  cursor: Type.Optional(Cursor),
};

// Functions, not shared objects: a shared object would reach openapi.yaml as a YAML anchor.
const retryAfter = () => ({ 'Retry-After': { type: 'integer', description: 'Seconds to wait before retrying' } });
const PROBLEM_HEADERS: Record<number, () => object> = {
  401: () => ({ 'WWW-Authenticate': { type: 'string', description: 'RFC 6750 Bearer challenge with error="invalid_token" and an error_description' } }),
  429: retryAfter,
  503: retryAfter,
};

/** Error answers of a route: problem+json bodies, with the headers that come with some statuses. */
export function problemResponses(...statuses: number[]): Record<number, object> {
  return Object.fromEntries(statuses.map((s) => [s, {
    description: 'RFC 9457 problem details',
    content: { 'application/problem+json': { schema: Problem } },
    ...(PROBLEM_HEADERS[s] ? { headers: PROBLEM_HEADERS[s]() } : {}),
  }]));
}
