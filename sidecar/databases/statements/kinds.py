"""What each parse-tree node means for policy: its kind, and what is refused whatever
the rules say, with the reason an agent is told.

The node names are libpg_query's (PostgreSQL's own `parsenodes.h`), as pglast's JSON
output spells them.
"""

from __future__ import annotations

from typing import Final, get_args

from ...policy.databases import StatementKind

# Every kind a statement can have, in the order a rule's `statements:` lists them:
# the policy's own list, not a copy of it.
KINDS: Final = get_args(StatementKind)

# Kinds any agent that some rule names may run whatever its rule's `statements:`:
# drivers send them on their own (psycopg's BEGIN, SQLAlchemy's SHOW on connect,
# asyncpg's reset). The guards below still apply to them. EXECUTE runs a statement
# whose body was judged when it was prepared; EXPLAIN and PREPARE are judged as the
# statement they wrap.
HOUSEKEEPING: Final = frozenset(
    {"transaction", "show", "set", "reset", "execute", "explain", "prepare"}
)

# Statements that only end what the session started (cursors, prepared statements,
# LISTEN): like the housekeeping kinds, any agent a rule names may run them.
HOUSEKEEPING_STATEMENTS: Final = frozenset(
    {"UnlistenStmt", "ClosePortalStmt", "FetchStmt", "DeallocateStmt", "DiscardStmt"}
)

# Kinds that change data or the schema: refused on a `read_only` database
# (25006). COPY counts only when it copies into a table.
WRITE_KINDS: Final = frozenset({"insert", "update", "delete", "merge", "ddl", "grant", "vacuum"})

# The DML statements: kind and db.operation.name.
DML: Final[dict[str, tuple[str, str]]] = {
    "SelectStmt": ("select", "SELECT"),
    "InsertStmt": ("insert", "INSERT"),
    "UpdateStmt": ("update", "UPDATE"),
    "DeleteStmt": ("delete", "DELETE"),
    "MergeStmt": ("merge", "MERGE"),
}

# Statement nodes by kind, for the kinds that are not DML and not special-cased in
# the parser (SET, COPY, EXPLAIN, PREPARE, ...). A node named in none of these
# tables, and not refused, is "ddl" when it creates, alters or drops something,
# else "other".
SIMPLE: Final[dict[str, str]] = {
    "VariableShowStmt": "show",
    "TransactionStmt": "transaction",
    "ExecuteStmt": "execute",
    "DeallocateStmt": "prepare",
    "DiscardStmt": "reset",  # DISCARD ALL is refused in the parser: it holds RESET ALL
    "ClosePortalStmt": "other",
    "FetchStmt": "other",
    "CheckPointStmt": "other",
    "ListenStmt": "listen",
    "UnlistenStmt": "listen",
    "NotifyStmt": "listen",
    "LockStmt": "lock",
    "VacuumStmt": "vacuum",
    "ClusterStmt": "vacuum",
    "ReindexStmt": "vacuum",
    "GrantStmt": "grant",
    "GrantRoleStmt": "grant",
    "AlterDefaultPrivilegesStmt": "grant",
    "CallStmt": "call",
}

DDL_PREFIXES: Final = ("Create", "Alter", "Drop", "Define", "Rename", "Reassign")
DDL: Final = frozenset(
    {
        "IndexStmt",
        "ViewStmt",
        "TruncateStmt",
        "CommentStmt",
        "SecLabelStmt",
        "RefreshMatViewStmt",
        "CompositeTypeStmt",
    }
)

# DROP ... and the object kinds whose names are relations (rules name them as tables).
RELATION_OBJECTS: Final = frozenset(
    {
        "OBJECT_TABLE",
        "OBJECT_VIEW",
        "OBJECT_MATVIEW",
        "OBJECT_FOREIGN_TABLE",
        "OBJECT_SEQUENCE",
        "OBJECT_INDEX",
    }
)

_CODE = "it defines code that later runs unchecked by the sidecar's rules"
_ROLE = "it changes roles or the settings every new session starts with"
_REMOTE = "it connects the database to other servers"

# Statements refused whatever the rules: why, in words an agent can act on.
REFUSED_STATEMENTS: Final[dict[str, str]] = {
    "DoStmt": "DO runs an anonymous code block the sidecar cannot check",
    "CreateFunctionStmt": f"CREATE FUNCTION/PROCEDURE: {_CODE}",
    "AlterFunctionStmt": f"ALTER FUNCTION/PROCEDURE: {_CODE}",
    "CreateTrigStmt": f"CREATE TRIGGER: {_CODE}",
    "CreateEventTrigStmt": f"CREATE EVENT TRIGGER: {_CODE}",
    "AlterEventTrigStmt": f"ALTER EVENT TRIGGER: {_CODE}",
    "RuleStmt": f"CREATE RULE: {_CODE}",
    "DefineStmt": f"CREATE AGGREGATE/OPERATOR/TYPE: {_CODE}",
    "CreateCastStmt": f"CREATE CAST: {_CODE}",
    "CreateTransformStmt": f"CREATE TRANSFORM: {_CODE}",
    "CreateConversionStmt": f"CREATE CONVERSION: {_CODE}",
    "CreateOpClassStmt": f"CREATE OPERATOR CLASS: {_CODE}",
    "CreateOpFamilyStmt": f"CREATE OPERATOR FAMILY: {_CODE}",
    "AlterOpFamilyStmt": f"ALTER OPERATOR FAMILY: {_CODE}",
    "CreatePLangStmt": f"CREATE LANGUAGE: {_CODE}",
    "CreateExtensionStmt": f"CREATE EXTENSION: {_CODE}",
    "AlterExtensionStmt": f"ALTER EXTENSION: {_CODE}",
    "AlterExtensionContentsStmt": f"ALTER EXTENSION: {_CODE}",
    "CreateFdwStmt": f"CREATE FOREIGN DATA WRAPPER: {_REMOTE}",
    "AlterFdwStmt": f"ALTER FOREIGN DATA WRAPPER: {_REMOTE}",
    "CreateForeignServerStmt": f"CREATE SERVER: {_REMOTE}",
    "AlterForeignServerStmt": f"ALTER SERVER: {_REMOTE}",
    "CreateUserMappingStmt": f"CREATE USER MAPPING: {_REMOTE}",
    "AlterUserMappingStmt": f"ALTER USER MAPPING: {_REMOTE}",
    "ImportForeignSchemaStmt": f"IMPORT FOREIGN SCHEMA: {_REMOTE}",
    "CreateSubscriptionStmt": f"CREATE SUBSCRIPTION: {_REMOTE}",
    "AlterSubscriptionStmt": f"ALTER SUBSCRIPTION: {_REMOTE}",
    "CreateRoleStmt": f"CREATE ROLE: {_ROLE}",
    "AlterRoleStmt": f"ALTER ROLE: {_ROLE}",
    "AlterRoleSetStmt": f"ALTER ROLE ... SET: {_ROLE}",
    "DropRoleStmt": f"DROP ROLE: {_ROLE}",
    "AlterDatabaseSetStmt": f"ALTER DATABASE ... SET: {_ROLE}",
    "AlterSystemStmt": "ALTER SYSTEM changes the server's configuration",
    "LoadStmt": "LOAD loads a shared library into the server",
    "CreateTableSpaceStmt": "CREATE TABLESPACE uses a directory on the database server",
}

# Functions that act outside the query: the server's files, other sessions, the
# server's configuration, other servers, or that run a query given as text (which
# the table rules cannot see). Compared lower-case, without their schema.
REFUSED_FUNCTIONS: Final = frozenset(
    {
        "set_config",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_switch_wal",
        "pg_create_restore_point",
        "pg_backup_start",
        "pg_backup_stop",
        "pg_start_backup",
        "pg_stop_backup",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_stat_get_activity",
        "pg_stat_statements",
        "pg_stat_statements_reset",
        "lo_import",
        "lo_export",
        "query_to_xml",
        "query_to_xmlschema",
        "query_to_xml_and_xmlschema",
        "cursor_to_xml",
        "cursor_to_xmlschema",
        "table_to_xml",
        "table_to_xmlschema",
        "table_to_xml_and_xmlschema",
        "schema_to_xml",
        "schema_to_xmlschema",
        "schema_to_xml_and_xmlschema",
        "database_to_xml",
        "database_to_xmlschema",
        "database_to_xml_and_xmlschema",
        "ts_stat",
        "pg_import_system_collations",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_show_all_file_settings",
        "pg_get_replication_slots",
    }
)
# ... and whole families: server files (pg_read_file, pg_ls_dir, adminpack's
# pg_file_write), dblink_*, replication slots and WAL.
REFUSED_FUNCTION_PREFIXES: Final = (
    "pg_read_",
    "pg_ls_",
    "pg_stat_file",
    "pg_file_",
    "pg_logdir_",
    "pg_logfile_",
    "dblink",
    "postgres_fdw_",
    "pg_logical_",
    "pg_replication_",
    "pg_create_logical_",
    "pg_create_physical_",
    "pg_drop_replication_",
    "pg_copy_",
    "pg_wal_replay_",
    "pg_stat_get_backend",  # other sessions' statements
    "pg_log_",
)

# Large objects live outside any table a rule can name: their functions count as
# reading pg_catalog.pg_largeobject, which only a rule naming it (or "*") allows.
LARGE_OBJECT_FUNCTIONS: Final = ("lo_", "loread", "lowrite")


def refused_function(name: str) -> bool:
    return name in REFUSED_FUNCTIONS or name.startswith(REFUSED_FUNCTION_PREFIXES)


# Settings the sidecar sets on every upstream session (or that decide who the session
# is, or which table an unqualified name means): no statement may change or reset them.
GUARDED_SETTINGS: Final[dict[str, str]] = {
    "default_transaction_read_only": "it would undo the database's read-only guard",
    "transaction_read_only": "it would undo the database's read-only guard",
    "statement_timeout": "it would undo the sidecar's statement timeout",
    "search_path": "it would change which table an unqualified name means, which the rules rely on",
    "role": "it would change the database role the sidecar signed in as",
    "session_authorization": "it would change the database role the sidecar signed in as",
    "session_replication_role": "it would turn off triggers and foreign keys",
    # With it off the server reads backslashes in '...' as escapes, and so a string the
    # sidecar read as data could be code to the server.
    "standard_conforming_strings": "the sidecar reads strings as PostgreSQL does with it on",
}

# Schemas whose relations describe the database rather than hold its data. Any agent a
# rule lets run SELECT may read them (drivers and SQLAlchemy's reflection do), except
# the relations below; nobody may write them.
CATALOG_SCHEMAS: Final = frozenset({"pg_catalog", "information_schema"})
# Catalog relations that expose other sessions' statements, column statistics (sample
# values), credentials or server files: read only where a rule names them.
SENSITIVE_CATALOG: Final = frozenset(
    {
        "pg_stat_activity",
        "pg_stat_statements",
        "pg_stat_statements_info",
        "pg_statistic",
        "pg_statistic_ext_data",
        "pg_stats",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
        "pg_largeobject",
        "pg_authid",
        "pg_shadow",
        "pg_user_mapping",
        "pg_user_mappings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_file_settings",
        "pg_backend_memory_contexts",
        "pg_stat_replication",
        "pg_replication_slots",
        "pg_subscription",
    }
)

# The lexer's literal tokens: what telemetry replaces with "?".
LITERAL_TOKENS: Final = frozenset({"ICONST", "FCONST", "SCONST", "USCONST", "BCONST", "XCONST"})
COMMENT_TOKENS: Final = frozenset({"SQL_COMMENT", "C_COMMENT"})
