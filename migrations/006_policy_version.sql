-- A counter every change to broker.policies moves, in the same transaction as the change.
-- Issuance keeps the policies it has read and checks the counter inside its lease INSERT instead
-- of reading them again for every credential; a changed counter sends it back to read them.
-- Statement triggers, so a change made with plain SQL counts as much as one through the API.
CREATE TABLE broker.policy_version (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  version bigint NOT NULL
);
INSERT INTO broker.policy_version (version) VALUES (1);

CREATE FUNCTION broker.bump_policy_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE broker.policy_version SET version = version + 1;
  RETURN NULL;
END
$$;

CREATE TRIGGER policies_version AFTER INSERT OR UPDATE OR DELETE ON broker.policies
  FOR EACH STATEMENT EXECUTE FUNCTION broker.bump_policy_version();
CREATE TRIGGER policies_version_truncate AFTER TRUNCATE ON broker.policies
  FOR EACH STATEMENT EXECUTE FUNCTION broker.bump_policy_version();
