-- The policy's max_ttl a lease was issued under. A renewal compares it with the policy's current
-- max_ttl: lowering max_ttl brings the leases already issued under the policy closer to their end
-- by the same amount, so renewals cannot carry them to the old bound. NULL on leases issued
-- before this column existed, which keep the bound they were issued with.
ALTER TABLE broker.leases ADD COLUMN max_ttl integer CHECK (max_ttl > 0);
