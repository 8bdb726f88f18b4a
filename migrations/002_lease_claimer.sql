-- Who is tearing a lease down right now: the backend pid of the connection that claimed it.
-- A claim whose backend is gone belonged to a broker that crashed (or lost the database), so
-- nobody is working on that lease any more: it is due at once instead of after CLAIM_SECONDS.
ALTER TABLE broker.leases ADD COLUMN claimed_by_pid integer;
