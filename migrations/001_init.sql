-- Policies: which token claims admit a caller to which group role.
CREATE TABLE broker.policies (
  name              text PRIMARY KEY,
  description       text NOT NULL DEFAULT '',
  issuer            text NOT NULL,
  audience          text,
  claims            jsonb NOT NULL CHECK (jsonb_typeof(claims) = 'object' AND claims <> '{}'::jsonb),
  grant_role        text NOT NULL,
  database          text NOT NULL,
  default_ttl       integer NOT NULL CHECK (default_ttl >= 1),
  max_ttl           integer NOT NULL CHECK (max_ttl >= default_ttl),
  max_active_leases integer NOT NULL CHECK (max_active_leases >= 1),
  connection_limit  integer NOT NULL CHECK (connection_limit >= -1),
  assume_role       boolean NOT NULL DEFAULT false,
  enabled           boolean NOT NULL DEFAULT true,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX policies_issuer ON broker.policies (issuer) WHERE enabled;

-- Leases: one row per issued role. No foreign key to policies on purpose: deleting a policy
-- leaves its leases running until they end.
CREATE TABLE broker.leases (
  id              uuid PRIMARY KEY,
  username        text NOT NULL UNIQUE,
  policy          text NOT NULL,
  grant_role      text NOT NULL,
  database        text NOT NULL,
  issuer          text NOT NULL,
  subject         text NOT NULL,
  claims          jsonb NOT NULL DEFAULT '{}',
  state           text NOT NULL CHECK (state IN ('pending', 'active', 'revoking', 'expired', 'revoked', 'revoke_failed')),
  -- Millisecond precision so a keyset cursor carrying an RFC 3339 timestamp is exact.
  created_at      timestamptz NOT NULL DEFAULT date_trunc('milliseconds', now()),
  expires_at      timestamptz NOT NULL,
  max_expires_at  timestamptz NOT NULL,
  ended_at        timestamptz,
  ended_by        text,
  end_reason      text,
  attempts        integer NOT NULL DEFAULT 0,
  last_error      text,
  next_attempt_at timestamptz,
  client_ip       text,
  user_agent      text,
  request_id      text,
  CHECK (expires_at <= max_expires_at)
);
-- Quota checks and "revoke by subject".
CREATE INDEX leases_live_by_identity ON broker.leases (issuer, subject, policy) WHERE state IN ('pending', 'active');
-- The reaper's two queues: active leases past expiry, and ended leases awaiting teardown.
CREATE INDEX leases_active_expiry ON broker.leases (expires_at) WHERE state = 'active';
CREATE INDEX leases_teardown ON broker.leases (next_attempt_at) WHERE state IN ('revoking', 'revoke_failed', 'pending');
-- Keyset pagination, newest first, overall and under the common filters.
CREATE INDEX leases_page ON broker.leases (created_at DESC, id DESC);
CREATE INDEX leases_page_subject ON broker.leases (subject, created_at DESC, id DESC);
CREATE INDEX leases_page_policy ON broker.leases (policy, created_at DESC, id DESC);
CREATE INDEX leases_page_state ON broker.leases (state, created_at DESC, id DESC);

-- Audit events: append-only.
CREATE TABLE broker.audit_events (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at              timestamptz NOT NULL DEFAULT now(),
  type            text NOT NULL,
  issuer          text,
  subject         text,
  actor_verified  boolean NOT NULL DEFAULT true,
  lease_id        uuid,
  policy          text,
  username        text,
  reason          text,
  request_id      text,
  client_ip       text,
  detail          jsonb
);
CREATE INDEX audit_page ON broker.audit_events (id DESC);
CREATE INDEX audit_subject ON broker.audit_events (subject, id DESC);
CREATE INDEX audit_lease ON broker.audit_events (lease_id, id DESC) WHERE lease_id IS NOT NULL;
CREATE INDEX audit_at ON broker.audit_events (at);

CREATE FUNCTION broker.refuse_audit_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'broker.audit_events is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON broker.audit_events
  FOR EACH ROW EXECUTE FUNCTION broker.refuse_audit_change();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON broker.audit_events
  FOR EACH STATEMENT EXECUTE FUNCTION broker.refuse_audit_change();
