import { Type, type Static } from '@sinclair/typebox';
import { ClientIp, ListFilters, NullableTimestamp, Timestamp } from './common.js';
import { PolicyName } from './policy.js';

const LEASE_STATES = ['pending', 'active', 'revoking', 'expired', 'revoked', 'revoke_failed'] as const;
// An enum rather than a union of literals: a wrong value then fails once, naming the allowed ones
// (see schemaErrors in validation.ts), instead of once per literal.
export const LeaseState = Type.Unsafe<(typeof LEASE_STATES)[number]>({ type: 'string', enum: [...LEASE_STATES] });

export const Lease = Type.Object(
  {
    id: Type.String({ format: 'uuid' }),
    username: Type.String(),
    policy: Type.String(),
    grant_role: Type.String(),
    database: Type.String(),
    issuer: Type.String(),
    subject: Type.String(),
    claims: Type.Record(Type.String(), Type.Unknown(), { description: 'The claims the policy matched on' }),
    state: LeaseState,
    created_at: Timestamp,
    expires_at: Timestamp,
    max_expires_at: Timestamp,
    ended_at: NullableTimestamp,
    ended_by: Type.Union([Type.String(), Type.Null()]),
    end_reason: Type.Union([Type.String(), Type.Null()]),
    attempts: Type.Integer(),
    last_error: Type.Union([Type.String(), Type.Null()]),
    client_ip: ClientIp,
    user_agent: Type.Union([Type.String(), Type.Null()]),
    request_id: Type.Union([Type.String(), Type.Null()]),
    capped: Type.Optional(Type.Boolean({ description: 'Renew only: the TTL was cut to max_expires_at' })),
  },
  { $id: 'Lease' },
);
export type LeaseBody = Static<typeof Lease>;

export const Credential = Type.Object(
  {
    lease_id: Type.String({ format: 'uuid' }),
    username: Type.String(),
    password: Type.String(),
    expires_at: Timestamp,
    max_expires_at: Timestamp,
    policy: Type.String(),
    grant_role: Type.String(),
    host: Type.String(),
    port: Type.Integer(),
    database: Type.String(),
    uri: Type.String(),
  },
  { $id: 'Credential' },
);
export type CredentialBody = Static<typeof Credential>;

export const CredentialRequest = Type.Object(
  {
    // A name no policy can have is refused here, never echoed back in a NO_POLICY.
    policy: Type.Optional(PolicyName),
    ttl: Type.Optional(Type.Integer({ minimum: 1, maximum: 31_536_000, description: 'Seconds; at most the policy max_ttl' })),
  },
  { additionalProperties: false },
);

export const RenewRequest = Type.Object(
  { ttl: Type.Optional(Type.Integer({ minimum: 1, maximum: 31_536_000 })) },
  { additionalProperties: false },
);

export const LeaseQuery = Type.Object(
  {
    ...ListFilters,
    state: Type.Optional(LeaseState),
  },
  { additionalProperties: false },
);
export type LeaseQueryBody = Static<typeof LeaseQuery>;

export const LeasePage = Type.Object({ items: Type.Array(Lease), next_cursor: Type.Union([Type.String(), Type.Null()]) });

// Recorded as the lease's end_reason and in its event; only text: it decides nothing.
const RevokeReason = () => Type.Optional(Type.String({ maxLength: 1024, description: 'why, for the record (end_reason and the audit event)' }));

// At least one of subject, issuer and policy is required: the route refuses a body naming none
// with a 400 that says so. No minProperties here: it let {"reason": …} through all the same, and
// answered {} in words ("must NOT have fewer than 1 properties") that named no field.
export const BulkRevokeRequest = Type.Object(
  {
    subject: Type.Optional(Type.String({ minLength: 1, maxLength: 1024 })),
    issuer: Type.Optional(Type.String({ minLength: 1, maxLength: 1024 })),
    policy: Type.Optional(Type.String({ minLength: 1, maxLength: 63 })),
    reason: RevokeReason(),
  },
  { additionalProperties: false, description: 'Names at least one of subject, issuer and policy; reason alone is refused' },
);
export const BulkRevokeResult = Type.Object({ revoked: Type.Integer(), lease_ids: Type.Array(Type.String({ format: 'uuid' })) });
export const LeaseIdParams = Type.Object({ id: Type.String({ format: 'uuid' }) });
/** DELETE /leases/{id} takes no body (DESIGN.md): its reason comes in the query. */
export const RevokeQuery = Type.Object({ reason: RevokeReason() }, { additionalProperties: false });
