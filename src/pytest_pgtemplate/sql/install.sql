-- pytest-pgtemplate: reset tracking, installed into a template right after migrating.
CREATE SCHEMA _pgtemplate;
COMMENT ON SCHEMA _pgtemplate IS 'pytest-pgtemplate reset tracking (test databases only)';
CREATE UNLOGGED TABLE _pgtemplate.dirty (relid oid PRIMARY KEY);
CREATE TABLE _pgtemplate.tracked (
    relid oid PRIMARY KEY, relkind "char" NOT NULL, level integer NOT NULL DEFAULT 0,
    snapshot name, cols text);
CREATE UNLOGGED TABLE _pgtemplate.ddl (tag text NOT NULL, object text);
CREATE UNLOGGED TABLE _pgtemplate.refreshed (relid oid PRIMARY KEY);
-- Tables the generated statements of _pgtemplate.clear() leave to the general path, and why.
CREATE TABLE _pgtemplate.general (relid oid PRIMARY KEY, why text NOT NULL);
CREATE TABLE _pgtemplate.matviews (relid oid PRIMARY KEY, populated boolean NOT NULL);
CREATE TABLE _pgtemplate.seqs (
    seqrelid oid PRIMARY KEY, last_value bigint NOT NULL, is_called boolean NOT NULL,
    snap bigint, owner oid);

-- Marks the tables named by the trigger's arguments (a partition marks its root, an
-- inheritance parent marks its children too), else the table itself.
CREATE FUNCTION _pgtemplate.mark_dirty() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_NARGS = 0 THEN
        INSERT INTO _pgtemplate.dirty VALUES (TG_RELID) ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO _pgtemplate.dirty SELECT unnest(TG_ARGV::oid[]) ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $fn$;

CREATE VIEW _pgtemplate.user_tables AS
SELECT c.oid, c.relkind, c.relispartition FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_pgtemplate')
  AND n.nspname NOT LIKE 'pg\_toast%' AND n.nspname NOT LIKE 'pg\_temp%'
  AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e');

-- Partitions are reset through their root; everything else is tracked itself.
INSERT INTO _pgtemplate.tracked (relid, relkind)
SELECT oid, relkind FROM _pgtemplate.user_tables WHERE NOT relispartition;

DO $do$
DECLARE r record; args text; has_rows boolean; columns text; only_ text;
BEGIN
    FOR r IN SELECT oid, relkind, relispartition FROM _pgtemplate.user_tables LOOP
        IF r.relispartition THEN
            args := quote_literal(pg_partition_root(r.oid)::oid::text);
        ELSIF r.relkind = 'r' THEN
            WITH RECURSIVE d(child) AS (
                SELECT inhrelid FROM pg_inherits WHERE inhparent = r.oid
                UNION SELECT i.inhrelid FROM pg_inherits i JOIN d ON i.inhparent = d.child)
            SELECT quote_literal(r.oid::text) || ', ' || string_agg(quote_literal(child::text), ', ')
            INTO args FROM d;
        ELSE
            args := NULL;
        END IF;
        EXECUTE format('CREATE TRIGGER _pgtemplate_dirty AFTER INSERT OR UPDATE OR DELETE OR '
                       'TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION _pgtemplate.mark_dirty(%s)',
                       r.oid::regclass, coalesce(args, ''));
        CONTINUE WHEN r.relispartition;
        only_ := CASE WHEN r.relkind = 'p' THEN '' ELSE 'ONLY' END;
        EXECUTE format('SELECT EXISTS (SELECT FROM %s %s)', only_, r.oid::regclass) INTO has_rows;
        CONTINUE WHEN NOT has_rows;
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO columns
        FROM pg_attribute WHERE attrelid = r.oid AND attnum > 0 AND NOT attisdropped
          AND attgenerated = '';
        EXECUTE format('CREATE TABLE _pgtemplate.%I AS SELECT %s FROM %s %s', 's' || r.oid,
                       columns, only_, r.oid::regclass);
        UPDATE _pgtemplate.tracked SET snapshot = 's' || r.oid, cols = columns WHERE relid = r.oid;
    END LOOP;
END $do$;

INSERT INTO _pgtemplate.matviews
SELECT c.oid, c.relispopulated FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND n.nspname NOT IN ('pg_catalog', 'information_schema');

DO $do$
DECLARE r record; lv bigint; called boolean;
BEGIN
    FOR r IN SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S'
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', '_pgtemplate') LOOP
        EXECUTE format('SELECT last_value, is_called FROM %s', r.oid::regclass) INTO lv, called;
        INSERT INTO _pgtemplate.seqs VALUES (
            r.oid, lv, called, CASE WHEN called THEN lv END,
            (SELECT d.refobjid FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
             AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
             LIMIT 1));
    END LOOP;
END $do$;

-- One round trip, one transaction: terminate leaked sessions, empty the dirty tables,
-- re-insert the template's rows, refresh refreshed matviews, restore sequences.
CREATE FUNCTION _pgtemplate.reset(replica boolean, wait_ms integer) RETURNS integer[]
LANGUAGE plpgsql AS $fn$
DECLARE
    dirty oid[];
    targets oid[] := '{}';
    enable_again text[] := '{}';
    statement text;
    r record;
    n_seq integer := 0;
    n_term integer;
    term_info text;
    general boolean := false;
BEGIN
    PERFORM set_config('lock_timeout', wait_ms || 'ms', true);
    PERFORM set_config('pgtemplate.resetting', 'on', true);  -- our own DDL is not the test's
    -- A test database need not survive a server crash: do not wait for the WAL flush.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- A session the test left inside a transaction would hold locks (and its rows
    -- are uncommitted anyway): terminate it rather than wait on it.
    -- (The per-backend functions cost a third of a pg_stat_activity scan, paid per test.)
    -- Who they were is kept in pgtemplate.terminated (described before they end) for the
    -- plugin to report.
    SELECT count(pg_terminate_backend(t.pid)), string_agg(t.who, '; ') INTO n_term, term_info
    FROM (SELECT b.pid, (SELECT format('pid %s (%s, its transaction open for %s s): %s', b.pid,
                                       coalesce(nullif(a.application_name, ''), 'no application_name'),
                                       round(extract(epoch FROM now() - a.xact_start)::numeric, 1),
                                       quote_literal(left(a.query, 200)))
                         FROM pg_stat_get_activity(b.pid) a) AS who
          FROM pg_stat_get_backend_idset() id, LATERAL (SELECT pg_stat_get_backend_pid(id) AS pid) b
          WHERE pg_stat_get_backend_dbid(id) = (SELECT oid FROM pg_database WHERE datname = current_database())
            AND b.pid <> pg_backend_pid()
            AND pg_stat_get_backend_xact_start(id) IS NOT NULL  -- inside a transaction
            AND EXISTS (SELECT FROM pg_stat_get_activity(b.pid) a WHERE a.backend_type = 'client backend')
            -- Only sessions this role may end (a superuser's, say, it may not): the others
            -- make the reset wait, and a blocked reset names them.
            AND EXISTS (SELECT FROM pg_roles me, pg_roles them
                        WHERE me.rolname = current_user AND them.oid = pg_stat_get_backend_userid(id)
                          AND (me.rolsuper OR (NOT them.rolsuper AND (pg_has_role(them.oid, 'USAGE')
                                               OR pg_has_role('pg_signal_backend', 'USAGE')))))) t;
    IF n_term > 0 THEN
        PERFORM set_config('pgtemplate.terminated', term_info, false);
    END IF;
    SELECT coalesce(array_agg(relid), '{}') INTO dirty FROM _pgtemplate.dirty;
    IF cardinality(dirty) > 0 THEN
        -- The usual case: statements generated at install time (plans cached by the
        -- session), FK checks and triggers on.  NULL: a target needs the general path.
        targets := _pgtemplate.clear(dirty);
    END IF;
    IF cardinality(dirty) > 0 AND targets IS NULL THEN
        general := true;
        IF replica THEN
            -- Triggers (ours included) and FK checks off: each table on its own.
            PERFORM set_config('session_replication_role', 'replica', true);
            targets := dirty;
            FOR r IN SELECT relid, relkind FROM _pgtemplate.tracked WHERE relid = ANY (dirty) LOOP
                EXECUTE format('DELETE FROM %s %s',
                               CASE WHEN r.relkind = 'p' THEN '' ELSE 'ONLY' END, r.relid::regclass);
            END LOOP;
        ELSE
            -- FK checks on: every table referencing an emptied one goes too, and the
            -- tables' own triggers (TRUNCATE, INSERT) are off meanwhile.
            WITH RECURSIVE closure(relid) AS (
                SELECT unnest(dirty)
                UNION
                SELECT c.conrelid FROM pg_constraint c JOIN closure ON c.confrelid = closure.relid
                WHERE c.contype = 'f')
            SELECT array_agg(relid) INTO targets FROM closure;
            FOR r IN SELECT tgrelid, tgname FROM pg_trigger WHERE tgrelid = ANY (targets)
                     AND NOT tgisinternal AND tgenabled = 'O' AND tgname <> '_pgtemplate_dirty' LOOP
                EXECUTE format('ALTER TABLE %s DISABLE TRIGGER %I', r.tgrelid::regclass, r.tgname);
                enable_again := enable_again || format('ALTER TABLE %s ENABLE TRIGGER %I',
                                                       r.tgrelid::regclass, r.tgname);
            END LOOP;
            EXECUTE 'TRUNCATE ' || (
                SELECT string_agg(CASE WHEN c.relkind = 'p' THEN '' ELSE 'ONLY ' END || c.oid::regclass,
                                  ', ')
                FROM pg_class c WHERE c.oid = ANY (targets));
        END IF;
        FOR r IN SELECT relid, snapshot, cols FROM _pgtemplate.tracked
                 WHERE relid = ANY (targets) AND snapshot IS NOT NULL ORDER BY level LOOP
            EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM _pgtemplate.%I',
                           r.relid::regclass, r.cols, r.cols, r.snapshot);
        END LOOP;
        FOREACH statement IN ARRAY enable_again LOOP
            EXECUTE statement;
        END LOOP;
    END IF;
    IF cardinality(dirty) > 0 THEN
        DELETE FROM _pgtemplate.dirty;
    END IF;
    IF EXISTS (SELECT FROM _pgtemplate.refreshed) THEN  -- rare: skip the DELETE's cost
        FOR r IN SELECT m.relid, m.populated FROM _pgtemplate.refreshed f
                 JOIN _pgtemplate.matviews m USING (relid) LOOP
            EXECUTE format('REFRESH MATERIALIZED VIEW %s %s', r.relid::regclass,
                           CASE WHEN r.populated THEN '' ELSE 'WITH NO DATA' END);
        END LOOP;
        DELETE FROM _pgtemplate.refreshed;
    END IF;
    -- Sequences: a changed one (also by a rolled-back insert), or any owned by a table
    -- we emptied (catches setval(..., false) on a sequence never called in the template).
    FOR r IN SELECT seqrelid, last_value, is_called FROM _pgtemplate.seqs
             WHERE pg_sequence_last_value(seqrelid) IS DISTINCT FROM snap OR owner = ANY (targets) LOOP
        PERFORM setval(r.seqrelid, r.last_value, r.is_called);
        n_seq := n_seq + 1;
    END LOOP;
    RETURN ARRAY[cardinality(dirty), n_seq, n_term, (SELECT count(*) FROM _pgtemplate.ddl)::integer,
                 general::integer];
END $fn$;
