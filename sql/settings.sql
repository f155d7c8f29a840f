-- Server settings walhook needs. Run as a superuser, then restart PostgreSQL
-- (wal_level only changes at server start).
ALTER SYSTEM SET wal_level = logical;
-- One slot and one WAL sender per walhook instance, plus headroom for reconnects.
ALTER SYSTEM SET max_replication_slots = 10;
ALTER SYSTEM SET max_wal_senders = 10;
-- Optional safety net: cap the WAL a stalled slot may hold (PostgreSQL 13+). A slot
-- that exceeds it is invalidated and walhook stops with a clear error instead of the
-- database filling its disk.
-- ALTER SYSTEM SET max_slot_wal_keep_size = '10GB';
