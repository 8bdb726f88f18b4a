-- Runs once, as the postgres superuser, when the compose PostgreSQL volume is first created
-- (mounted into /docker-entrypoint-initdb.d). It prepares the cluster the way an operator would
-- for the broker on PostgreSQL 16+. To run it again, remove the volume: docker-compose down -v
--
-- LOCAL TRIALS ONLY: the passwords below are well known. In production, create the broker role
-- with a generated password (or a SCRAM verifier) and keep DATABASE_URL in a secret.

\set ON_ERROR_STOP on

-- The broker's own login: CREATEROLE so it can create and drop the short-lived roles, and
-- nothing more (no SUPERUSER, BYPASSRLS or REPLICATION). On PG 16+ CREATEROLE only reaches
-- roles the broker created itself or holds ADMIN OPTION on, which is what keeps it small.
-- (The name must not start with pg_: PostgreSQL reserves that prefix.)
CREATE ROLE credential_broker LOGIN CREATEROLE PASSWORD 'broker-dev-password';

-- The broker keeps its schema (policies, leases, audit) in a database of its own, which the
-- issued roles have no business connecting to.
CREATE DATABASE broker OWNER credential_broker;
REVOKE CONNECT, TEMPORARY ON DATABASE broker FROM PUBLIC;

-- A sample group role for policies to map tokens onto. It must be NOLOGIN and unprivileged:
-- the broker refuses group roles that are, or inherit from, SUPERUSER, CREATEROLE, BYPASSRLS,
-- REPLICATION or a predefined pg_* role.
CREATE ROLE app_readers NOLOGIN;

-- PG 16+: to put issued roles IN ROLE app_readers the broker needs ADMIN OPTION on the group.
-- The grant is for handing the group out, so INHERIT FALSE and SET FALSE: it gives the broker's
-- own sessions neither the group's privileges nor SET ROLE to it. (PG 15 has no INHERIT/SET
-- options, and there CREATEROLE can grant any non-superuser role anyway; see
-- deploy/kubernetes/README.md.)
GRANT app_readers TO credential_broker WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;

-- The database credentials are issued for, with a little sample data.
CREATE DATABASE app;
REVOKE CONNECT, TEMPORARY ON DATABASE app FROM PUBLIC;
GRANT CONNECT ON DATABASE app TO app_readers;
-- Teardown connects to each database where an ended role owns or holds something, to
-- REASSIGN/DROP OWNED there.
GRANT CONNECT ON DATABASE app TO credential_broker;

\connect app

CREATE SCHEMA demo;
CREATE TABLE demo.orders (
  id        int PRIMARY KEY,
  item      text NOT NULL,
  placed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO demo.orders (id, item) VALUES (1, 'sprocket'), (2, 'gear'), (3, 'flange');
GRANT USAGE ON SCHEMA demo TO app_readers;
GRANT SELECT ON ALL TABLES IN SCHEMA demo TO app_readers;
ALTER DEFAULT PRIVILEGES IN SCHEMA demo GRANT SELECT ON TABLES TO app_readers;
