-- A least-privilege role for walhook: it may stream replication and read the
-- configured tables, nothing else. Replace the password and the table list.
CREATE ROLE walhook WITH LOGIN REPLICATION PASSWORD 'change-me';
GRANT USAGE ON SCHEMA public TO walhook;
GRANT SELECT ON public.customers TO walhook;
-- walhook creates its slot itself (the REPLICATION attribute allows that). To let it
-- create the publication too, the role must own the tables; otherwise run
-- publication.sql as the tables' owner and pass --publication walhook.
-- pg_hba.conf must allow the role to connect to the database, e.g.:
--   host  app  walhook  10.0.0.0/8  scram-sha-256
