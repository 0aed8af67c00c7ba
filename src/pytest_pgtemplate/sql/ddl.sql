-- Event triggers (superuser only): note the schema changes a test makes, which no
-- truncate can undo, and the materialized views it refreshes, which the reset refreshes back.
CREATE FUNCTION _pgtemplate.note_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('pgtemplate.resetting', true) = 'on' THEN RETURN; END IF;
    INSERT INTO _pgtemplate.refreshed
    SELECT c.objid FROM pg_event_trigger_ddl_commands() c
    WHERE c.command_tag = 'REFRESH MATERIALIZED VIEW' ON CONFLICT DO NOTHING;
    INSERT INTO _pgtemplate.ddl
    SELECT c.command_tag, c.object_identity FROM pg_event_trigger_ddl_commands() c
    WHERE c.command_tag <> 'REFRESH MATERIALIZED VIEW'
      AND coalesce(c.schema_name, '') NOT LIKE 'pg\_temp%' AND NOT c.in_extension;
END $fn$;
CREATE FUNCTION _pgtemplate.note_drop() RETURNS event_trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('pgtemplate.resetting', true) = 'on' THEN RETURN; END IF;
    INSERT INTO _pgtemplate.ddl
    SELECT 'DROP ' || o.object_type, o.object_identity FROM pg_event_trigger_dropped_objects() o
    WHERE o.original AND NOT o.is_temporary;
END $fn$;
CREATE EVENT TRIGGER _pgtemplate_ddl ON ddl_command_end EXECUTE FUNCTION _pgtemplate.note_ddl();
CREATE EVENT TRIGGER _pgtemplate_drop ON sql_drop EXECUTE FUNCTION _pgtemplate.note_drop();
