-- Which deployment this broker schema belongs to. Leases, the reaper's lock and policies are
-- shared by everyone who connects here, so two deployments (two marker roles) in one schema
-- would claim each other's expired leases and fail to drop them; migrate() refuses the second.
CREATE TABLE broker.deployment (
  singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  managed_role text NOT NULL,
  bound_at timestamptz NOT NULL DEFAULT now()
);
