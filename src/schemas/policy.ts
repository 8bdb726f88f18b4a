import { Type, type Static } from '@sinclair/typebox';
import { ClaimPatternsSchema, Cursor, Limit, Timestamp } from './common.js';

// The description is also the 400's text for a name that fails the pattern (see schemaErrors).
export const PolicyName = Type.String({
  pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$',
  description: "a policy name of 1 to 63 characters from A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
});
const Identifier = Type.String({ minLength: 1, maxLength: 63 });

export const POLICY_DEFAULTS = {
  description: '',
  default_ttl: 900,
  max_ttl: 3600,
  max_active_leases: 10,
  connection_limit: -1,
  assume_role: false,
  enabled: true,
} as const;

export const PolicyInput = Type.Object(
  {
    description: Type.Optional(Type.String({ maxLength: 1024 })),
    issuer: Type.String({ minLength: 1 }),
    audience: Type.Optional(Type.Union([Type.String({ minLength: 1 }), Type.Null()])),
    claims: ClaimPatternsSchema,
    grant_role: Identifier,
    database: Identifier,
    default_ttl: Type.Optional(Type.Integer({ minimum: 1, maximum: 31_536_000 })),
    max_ttl: Type.Optional(Type.Integer({ minimum: 1, maximum: 31_536_000 })),
    max_active_leases: Type.Optional(Type.Integer({ minimum: 1, maximum: 100_000 })),
    connection_limit: Type.Optional(Type.Integer({ minimum: -1, maximum: 10_000 })),
    assume_role: Type.Optional(Type.Boolean()),
    enabled: Type.Optional(Type.Boolean()),
  },
  { additionalProperties: false },
);
export type PolicyInputBody = Static<typeof PolicyInput>;

export const Policy = Type.Object(
  {
    name: Type.String(),
    description: Type.String(),
    issuer: Type.String(),
    audience: Type.Union([Type.String(), Type.Null()]),
    claims: ClaimPatternsSchema,
    grant_role: Type.String(),
    database: Type.String(),
    default_ttl: Type.Integer(),
    max_ttl: Type.Integer(),
    max_active_leases: Type.Integer(),
    connection_limit: Type.Integer(),
    assume_role: Type.Boolean(),
    enabled: Type.Boolean(),
    created_at: Timestamp,
    updated_at: Timestamp,
  },
  { $id: 'Policy' },
);
export type PolicyBody = Static<typeof Policy>;

/** PUT's answer: the stored policy, and what about it deserves an admin's attention. */
export const PolicyWritten = Type.Object(
  {
    ...Policy.properties,
    warnings: Type.Optional(Type.Array(Type.String(), {
      description: 'Stored all the same, but worth fixing: for example credentials of this policy could connect to the broker\'s own database',
    })),
  },
  { $id: 'PolicyWritten' },
);

export const PolicyPage = Type.Object({ items: Type.Array(Policy), next_cursor: Type.Union([Type.String(), Type.Null()]) });
export const PolicyListQuery = Type.Object({ limit: Type.Optional(Limit), cursor: Type.Optional(Cursor) }, { additionalProperties: false });
export const PolicyNameParams = Type.Object({ name: PolicyName });

export const FailedClaim = Type.Object({ claim: Type.String(), patterns: Type.Array(Type.String()), value: Type.Unknown() });
export const Evaluation = Type.Object({
  issuer: Type.String(),
  subject: Type.String(),
  policies: Type.Array(
    Type.Object({
      name: Type.String(),
      admitted: Type.Boolean(),
      reason: Type.Optional(Type.String({ description: 'Why the policy does not admit this token, beyond claims' })),
      cannot_issue: Type.Optional(Type.String({
        description: 'On a policy that admits this token: why issuance under it is refused all the same (its grant_role has become unsafe, or its database is gone, until an admin fixes it; or this identity holds max_active_leases of its leases, until one ends)',
      })),
      failed_claims: Type.Array(FailedClaim),
    }),
  ),
});
