-- Keyset pages under the remaining filters of GET /audit and GET /leases stay index scans at
-- millions of rows. (subject and lease_id already have theirs in 001.)
CREATE INDEX audit_policy ON broker.audit_events (policy, id DESC) WHERE policy IS NOT NULL;
CREATE INDEX audit_type ON broker.audit_events (type, id DESC);
CREATE INDEX audit_username ON broker.audit_events (username, id DESC) WHERE username IS NOT NULL;
CREATE INDEX leases_page_issuer ON broker.leases (issuer, created_at DESC, id DESC);
