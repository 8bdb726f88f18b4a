import { Type, type Static } from '@sinclair/typebox';
import { ClientIp, ListFilters, Timestamp } from './common.js';

const Nullable = (t: ReturnType<typeof Type.String>) => Type.Union([t, Type.Null()]);
export const AuditEventSchema = Type.Object({
  id: Type.String(),
  at: Timestamp,
  type: Type.String(),
  issuer: Nullable(Type.String()),
  subject: Nullable(Type.String()),
  actor_verified: Type.Boolean(),
  lease_id: Nullable(Type.String()),
  policy: Nullable(Type.String()),
  username: Nullable(Type.String()),
  reason: Nullable(Type.String()),
  request_id: Nullable(Type.String()),
  client_ip: ClientIp,
  detail: Type.Union([Type.Record(Type.String(), Type.Unknown()), Type.Null()]),
});

/** Every type of event the broker writes; README's "Audit event types" lists them too. */
export const AUDIT_TYPES = [
  'credential.issued', 'credential.denied', 'credential.failed',
  'lease.renewed', 'lease.revoked', 'lease.expired', 'lease.teardown_failed', 'lease.revoke_failed', 'revocation.requested',
  'policy.created', 'policy.updated', 'policy.deleted',
  'role.orphan_dropped', 'role.orphan_drop_failed', 'token.rejected', 'request.denied', 'request.failed',
] as const;
export type AuditType = (typeof AUDIT_TYPES)[number];

export const AuditQuery = Type.Object(
  {
    ...ListFilters,
    // An enum, not any string: a misspelt type would otherwise answer an empty page, as if
    // nothing of the kind had happened.
    type: Type.Optional(Type.Unsafe<AuditType>({ type: 'string', enum: [...AUDIT_TYPES] })),
    lease_id: Type.Optional(Type.String({ format: 'uuid' })),
    // `subject` is who acted (an admin, for the revocations they make); an audit of one identity
    // also needs what others did to its leases.
    owner: Type.Optional(Type.String({ maxLength: 1024, description: 'events about the leases of this subject (the lease owner), whoever acted' })),
    // An owner is the pair (issuer, subject): two clusters' service accounts can share a subject.
    owner_issuer: Type.Optional(Type.String({ maxLength: 1024, description: 'events about the leases issued to tokens of this issuer, whoever acted' })),
  },
  { additionalProperties: false },
);

export type AuditEventBody = Static<typeof AuditEventSchema>;
export type AuditQueryBody = Static<typeof AuditQuery>;
export const AuditPage = Type.Object({ items: Type.Array(AuditEventSchema), next_cursor: Type.Union([Type.String(), Type.Null()]) });
