-- A token every change to broker.policies replaces, in the same transaction as the change.
-- Issuance keeps the policies it has read and checks the token inside its lease INSERT instead of
-- reading them again for every credential; a different token sends it back to read them. A
-- random token, not a counter: a counter can go back (a failover to a standby that lost the last
-- commits, a restore) and then meet an old value again with other policies behind it.
-- Statement triggers, so a change made with plain SQL counts as much as one through the API;
-- ENABLE ALWAYS, so they fire under session_replication_role = replica too (logical replication,
-- pg_restore --disable-triggers, bulk fixes).
CREATE TABLE broker.policy_version (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  token uuid NOT NULL
);
INSERT INTO broker.policy_version (token) VALUES (gen_random_uuid());

CREATE FUNCTION broker.bump_policy_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE broker.policy_version SET token = gen_random_uuid();
  RETURN NULL;
END
$$;

CREATE TRIGGER policies_version AFTER INSERT OR UPDATE OR DELETE ON broker.policies
  FOR EACH STATEMENT EXECUTE FUNCTION broker.bump_policy_version();
CREATE TRIGGER policies_version_truncate AFTER TRUNCATE ON broker.policies
  FOR EACH STATEMENT EXECUTE FUNCTION broker.bump_policy_version();
ALTER TABLE broker.policies ENABLE ALWAYS TRIGGER policies_version, ENABLE ALWAYS TRIGGER policies_version_truncate;
