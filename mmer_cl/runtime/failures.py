"""Every failure as a message and an exit code, never a traceback.

=============================================  =====  ==========================================
failure                                        exit   message
=============================================  =====  ==========================================
:class:`MmerError` (bad input)                 2      the error's own message (says what to fix)
:class:`MmerError` with ``exit_code = 1``      1      e.g. damaged store, damaged/missing blob
database locked / unreachable / malformed,     1      what happened and what to do
invalid URL (SQLAlchemy errors)
disk full, file too large, permission          1      what happened and what to do
denied, read-only file system (OSError)
Ctrl-C                                         130    "interrupted"; every write path is atomic
anything else                                  1      "internal error ...; rerun with --debug"
=============================================  =====  ==========================================

Every write path is atomic (blobs: temp file + rename; registry: one
transaction; exports: temp directory + rename), so after any of these the
store holds either the state before or the state after the command, plus at
worst unreferenced blobs or a partial export directory that ``mmer gc``
removes.
"""

from __future__ import annotations

import errno
import sqlite3

from mmer_cl.errors import MmerError

CONSISTENT = "The store is unchanged or fully updated (writes are atomic); `mmer gc` removes any leftovers."

_OS_ADVICE = {
    errno.ENOSPC: "the disk is full{where}. Free some space (or choose a store/output on another disk) and rerun.",
    errno.EDQUOT: "the disk quota is exceeded{where}. Free some space or raise the quota, then rerun.",
    errno.EFBIG: "a file grew larger than allowed{where} (a file-size limit such as `ulimit -f`, or the file "
                 "system's maximum). Raise the limit or write to another file system, then rerun.",
    errno.EACCES: "permission denied{where}. Check the owner and mode of that path (or run as a user who may "
                  "write there), then rerun.",
    errno.EPERM: "operation not permitted{where}. Check the owner and mode of that path, then rerun.",
    errno.EROFS: "the file system is read-only{where}. Remount it read-write or choose another location.",
    errno.EIO: "an input/output error{where}: the disk may be failing. Check it (dmesg), then run `mmer audit`.",
}


def _os_message(exc: OSError) -> str | None:
    advice = _OS_ADVICE.get(exc.errno)
    if advice is None:
        return None
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    return advice.format(where=where)


def _sqlalchemy_message(exc: BaseException) -> str | None:
    try:
        from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        return None
    if not isinstance(exc, (SQLAlchemyError, sqlite3.Error)):
        return None
    text = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
    low = text.lower()
    if isinstance(exc, (ArgumentError, NoSuchModuleError)):
        return (f"the registry database URL is not usable ({text}). Write it like "
                "sqlite:////path/registry.db or postgresql://user@host/dbname, and install that database's driver.")
    if "locked" in low or "busy" in low:
        return ("the registry database is locked by another process for longer than the busy timeout "
                f"({text}). Wait for the other mmer command to finish, then rerun.")
    if "disk is full" in low or "disk full" in low:
        return f"the disk holding the registry is full ({text}). Free some space and rerun. " + CONSISTENT
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return (f"the registry database is damaged ({text}). Restore registry.db from a backup copy; "
                "mmer never recreates it over existing data.")
    if "readonly" in low or "read-only" in low:
        return f"the registry database is read-only ({text}). Check its permissions and the file system."
    if "unable to open" in low:
        return (f"cannot open the registry database ({text}). Check that the path exists and that you may "
                "read and write it.")
    if isinstance(exc, (DBAPIError, sqlite3.Error)):
        return (f"the registry database failed ({text}). Check that it is reachable (server running, URL, user "
                "and password right), then rerun.")
    return f"the registry database failed ({text}). Rerun with --debug and report it if it persists."


def describe_failure(exc: BaseException) -> tuple[str, int]:
    """The message a user sees for ``exc`` and the exit status; never a password of a database URL
    (every secret of the URLs opened so far is masked, see :mod:`registry.urls`)."""
    from registry.urls import scrub

    message, code = _describe(exc)
    return scrub(message), code


def _describe(exc: BaseException) -> tuple[str, int]:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted. " + CONSISTENT, 130
    if isinstance(exc, MmerError):
        code = getattr(exc, "exit_code", 2)
        return ("error: " if code == 2 else "failure: ") + str(exc), code
    message = _sqlalchemy_message(exc)
    if message is not None:
        return "failure: " + message, 1
    if isinstance(exc, OSError):
        message = _os_message(exc)
        if message is not None:
            return "failure: " + message, 1
        return f"failure: {exc.strerror or exc} ({exc.filename or 'no file'}). " + CONSISTENT, 1
    if isinstance(exc, MemoryError):
        return "failure: out of memory. Close other programs or use a machine with more memory. " + CONSISTENT, 1
    inner, depth = exc.__cause__ or exc.__context__, 0
    while inner is not None and depth < 5:  # e.g. a library error wrapping "No space left on device"
        if isinstance(inner, OSError) or _sqlalchemy_message(inner) is not None:
            return _describe(inner)
        inner, depth = inner.__cause__ or inner.__context__, depth + 1
    return (f"internal error ({type(exc).__name__}: {exc}). This is a bug in mmer-cl: rerun with --debug and "
            "report it with the traceback. " + CONSISTENT), 1
