"""PostgreSQL specifics of the registry: URL spelling and the append-only audit log.

``postgresql://`` and ``postgres://`` URLs are read with psycopg 3 (the
``postgres`` extra). The audit log is enforced by a trigger function that
raises on any UPDATE or DELETE of ``events``; it is installed idempotently,
under a transaction-scoped advisory lock so that several hosts opening the
registry at once do not race.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

from registry import urls

SCHEMA_LOCK_KEY = 0x6D6D6572_73636801  # "mmersch" + 1: serialises schema setup across hosts

APPEND_ONLY_FUNCTION = """
CREATE OR REPLACE FUNCTION mmer_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only (% on events refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql
"""

APPEND_ONLY_TRIGGERS = [
    ("events_no_update", "BEFORE UPDATE ON events FOR EACH ROW"),
    ("events_no_delete", "BEFORE DELETE ON events FOR EACH ROW"),
    ("events_no_truncate", "BEFORE TRUNCATE ON events FOR EACH STATEMENT"),
]


def normalise_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> ``postgresql+psycopg://`` (psycopg 3); other URLs unchanged.

    Every registry URL passes here first, so its password is remembered for :func:`registry.urls.scrub`.
    """
    urls.remember(url)
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def lock_schema(conn: Connection) -> None:
    """Hold a transaction-scoped advisory lock while the schema is created or checked."""
    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})


def install_append_only(conn: Connection) -> None:
    """Create (or refresh) the trigger function and its triggers on ``events``; safe to run again."""
    conn.execute(text(APPEND_ONLY_FUNCTION))
    for name, when in APPEND_ONLY_TRIGGERS:
        exists = conn.execute(text("SELECT 1 FROM pg_trigger WHERE tgname = :n AND tgrelid = 'events'::regclass"),
                              {"n": name}).first()
        if not exists:
            conn.execute(text(f"CREATE TRIGGER {name} {when} EXECUTE FUNCTION mmer_events_append_only()"))
