"""The ``mmer`` command line: a thin layer over :class:`mmer_cl.store.Store`.

Exit codes: 0 success, 1 failure (damage found, an unexpected error),
2 bad usage or bad input (the message says what to fix).

Start-up stays fast (``mmer --help`` loads no torch): modules that need torch,
transformers or SQLAlchemy are imported inside the commands that use them.
Global options (``--store``, ``--actor``, ``--db-url``, ``--objects``, ``-q``,
``--json``, ``--debug``) may come before or after the subcommand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import traceback
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from mmer_cl.runtime.failures import describe_failure
from mmer_cl.runtime.interrupts import (exit_interrupted, ignore_further_interrupts, raise_from_now_on,
                                        remember_interrupts, was_interrupted)
from mmer_cl.runtime.progress import Progress

if TYPE_CHECKING:
    from mmer_cl.store import Store


ENV_STORE = "MMER_STORE"
ENV_OBJECTS = "MMER_OBJECTS"
ENV_DEBUG = "MMER_DEBUG"
DEFAULT_STORE = "mmer-store"
GLOBAL_VALUE_OPTIONS = ("--store", "--actor", "--db-url", "--objects")
GLOBAL_FLAGS = ("-q", "--quiet", "--debug", "--json")


def hoist_global_options(args: list[str]) -> list[str]:
    """Move global options given after the subcommand in front of it, so both orders work.

    ``mmer versions --store S -q`` becomes ``mmer --store S -q versions``; a
    ``--`` ends the scan, and options of the subcommand are left alone. A value
    option given last without its value is refused here, with its name.

    Hand-written because click has no options shared by a group and its
    subcommands (each subcommand would otherwise repeat all of them).
    """
    i = 0
    while i < len(args):  # skip what precedes the subcommand
        a = args[i]
        if a in GLOBAL_VALUE_OPTIONS:
            i += 2
        elif a.startswith("-"):
            i += 1
        else:
            break
    if i >= len(args):
        return list(args)
    moved: list[str] = []
    kept: list[str] = []
    rest = args[i + 1:]
    j = 0
    while j < len(rest):
        a = rest[j]
        if a == "--":
            kept += rest[j:]
            break
        if a in GLOBAL_VALUE_OPTIONS:
            if j + 1 >= len(rest):
                raise click.BadOptionUsage(a, f"Option '{a}' requires an argument, e.g. {a} {a[2:].upper()}.")
            moved += rest[j:j + 2]
            j += 2
            continue
        if a.split("=", 1)[0] in GLOBAL_VALUE_OPTIONS and "=" in a or a in GLOBAL_FLAGS:
            moved.append(a)
        else:
            kept.append(a)
        j += 1
    return list(args[:i]) + moved + [args[i]] + kept


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


def emit_json(obj) -> None:
    """Strict JSON (no NaN/Infinity): inputs are validated so that such values cannot arise."""
    click.echo(json.dumps(_jsonable(obj), indent=2, allow_nan=False))


@dataclasses.dataclass
class Ctx:
    store_path: Path
    actor: str | None
    db_url: str | None
    quiet: bool
    json: bool = False
    objects: str | None = None

    def open(self) -> "Store":
        from mmer_cl.store import Store

        raise_from_now_on()  # torch and the store are loaded: a Ctrl-C now raises, so writes roll back
        return Store.open(self.store_path, url=self.db_url, objects=self.objects)

    def progress(self, label: str) -> Progress:
        return Progress(label, self.quiet)


def show_version(ctx: click.Context, value: bool) -> None:
    """``mmer --version``: the package's release and, separately, the store format (the registry schema
    version, which changes only when the store's layout does; older stores are upgraded on open)."""
    if not value or ctx.resilient_parsing:
        return
    from mmer_cl import __version__
    from mmer_cl.store.provenance import store_format

    click.echo(f"mmer (mmer-cl) {__version__}\nstore format {store_format()} (registry schema; stores of "
               "earlier formats are upgraded when opened)")
    ctx.exit(0)


class MmerGroup(click.Group):
    """Turns every failure into a message and an exit code (see :mod:`mmer_cl.runtime.failures`); accepts global
    options anywhere."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(args))

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:
            name = args[0] if args else ""
            hint = COMMAND_HINTS.get(name)
            if hint is None or self.get_command(ctx, name) is not None:
                raise
            raise click.UsageError(f"No such command {name!r}. {hint}", ctx) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure becomes a message, never a traceback
            debug = bool(ctx.params.get("debug")) or os.environ.get(ENV_DEBUG, "") not in ("", "0")
            if debug:
                traceback.print_exc()
            if was_interrupted():  # also a Ctrl-C that library code turned into another error (numba's import)
                exit_interrupted()  # the stores are closed by now; one line, exit 130
            message, code = describe_failure(exc)
            click.echo(message, err=True)
            sys.exit(code)


COMMAND_HINTS = {  # what users of git and other tools type, and the mmer command that does it
    "log": "The audit log is `mmer history` (versions: `mmer versions`).",
    "status": "See `mmer show` (the current version) and `mmer entries`.",
    "list": "Use `mmer entries` or `mmer versions`.", "ls": "Use `mmer entries` or `mmer versions`.",
    "checkout": "To make a version current again: `mmer rollback VERSION`.",
    "revert": "To make a version current again: `mmer rollback VERSION`.",
    "reset": "To make a version current again: `mmer rollback VERSION`.",
    "add": "To add a checkpoint: `mmer register CHECKPOINT --name NAME --modality MODALITY`.",
    "merge": "To merge the registered entries into a new version: `mmer expand`.",
    "rm": "To remove an entry: `mmer remove NAME`; an alias: `mmer alias rm NAME`.",
    "delete": "To remove an entry: `mmer remove NAME`; an alias: `mmer alias rm NAME`.",
    "verify": "To check every blob: `mmer audit`.", "fsck": "To check every blob: `mmer audit`.",
    "prune": "To delete unreferenced blobs: `mmer gc`.",
}


def parse_tags(pairs: tuple[str, ...]) -> dict:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"write tags as KEY=VALUE, got {pair!r}", param_hint="--tag")
        tags[key] = value
    return tags


@click.group(cls=MmerGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--store", "store_path", type=click.Path(path_type=Path), envvar=ENV_STORE, default=DEFAULT_STORE,
              show_default=True, help=f"Store directory (or set {ENV_STORE}).")
@click.option("--actor", envvar="MMER_ACTOR", help="Who is acting, for the audit log (default: $MMER_ACTOR or "
              "your user name).")
@click.option("--db-url", envvar="MMER_DB_URL", help="SQLAlchemy URL of the registry (default: SQLite in the store).")
@click.option("--objects", envvar=ENV_OBJECTS, metavar="URL",
              help="Where blobs live: a directory or an fsspec URL such as s3://bucket/prefix (default: objects/ in "
              f"the store; or set {ENV_OBJECTS}). S3 credentials come from the standard AWS environment/config.")
@click.option("-q", "--quiet", is_flag=True, help="No progress (bars in a terminal, periodic lines in a log).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output, on every command (before or after "
              "it); one JSON document per command, described in docs/json.md.")
@click.option("--debug", is_flag=True, envvar=ENV_DEBUG,
              help=f"Show the traceback of a failure (or set {ENV_DEBUG}=1), for bug reports.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=lambda c, p, v: show_version(c, v),
              help="Show mmer-cl's version and the store format it reads and writes, then exit.")
@click.pass_context
def cli(ctx: click.Context, store_path: Path, actor: str | None, db_url: str | None, objects: str | None,
        quiet: bool, as_json: bool, debug: bool) -> None:
    """mmer: give one base LLM many modalities, without training (MMER).

    Fine-tuned multimodal models of one base are registered into a store;
    `expand` merges their LLM task vectors and computes a binary mask per
    model, so each modality runs on base + mask * merged with its own
    encoder. Every expansion is an immutable version you can roll back to.

    Global options (--store, --actor, --db-url, -q, --json) go before or after
    the command. Versions are named 3, v3 or by an alias (current, production).

    \b
    Typical session:
      mmer --store my-store init --base ./llama-base
      mmer --store my-store register ./llava-vision --name vision --modality vision
      mmer --store my-store register ./llava-audio --name audio --modality audio
      mmer --store my-store expand
      mmer --store my-store export --entry vision out/vision
      mmer --store my-store report
    """
    ctx.obj = Ctx(store_path, actor, db_url, quiet, as_json, objects)


def parse_size(text: str) -> int:
    """``500MB``, ``5GB``, ``512MiB`` or a byte count as bytes.

    Hand-written: huggingface_hub's ``parse_size_to_int`` is private and refuses binary units (MiB, GiB).
    """
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * mult)
    if t.isdigit():
        return int(t)
    raise click.BadParameter(f"cannot read size {text!r}; write it like 500MB or 5GB")


def main() -> None:
    """The ``mmer`` command (see :mod:`mmer_cl.cli.entry`, which handles Ctrl-C before this module loads)."""
    # A file-size limit (ulimit -f) must end in EFBIG, a message and exit 1, not a kill by SIGXFSZ.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    remember_interrupts(clear=False, at_once=True)  # until the store opens (Ctx.open), as in mmer_cl.cli.entry
    try:
        code = cli.main(prog_name="mmer", standalone_mode=False)  # click's standalone mode prints "Aborted!"
        code = code if isinstance(code, int) else 0
    except click.exceptions.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except SystemExit as exc:  # a command's failure, already reported by MmerGroup.invoke
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - Ctrl-C while click parses, or click.Abort made of it
        if was_interrupted() or isinstance(exc, (KeyboardInterrupt, click.exceptions.Abort)):
            exit_interrupted()
        message, code = describe_failure(exc)
        click.echo(message, err=True)
    if was_interrupted() and code not in (0, 130):  # reported above as another failure: say what happened
        exit_interrupted()
    exit_now(code)


def exit_now(code: int | str | None) -> NoReturn:
    """End the process with ``code`` (as ``sys.exit`` reads it) without the interpreter's teardown.

    Unloading torch and numba takes about 0.45 s here, on every command. By now each command has closed
    its store (so SQLite has folded and removed its log), every write has been fsynced and every worker
    thread joined, and mmer registers no exit handlers: only the output streams need flushing, and a
    local Ray cluster that ``expand --ray`` started needs stopping (Ray does that at a normal exit).
    """
    ignore_further_interrupts()  # the command is over: a Ctrl-C now must not turn the exit into a traceback
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        ray.shutdown()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits with 1
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


# The commands register on `cli` when their modules are imported (last: they import the names above).
from mmer_cl.cli import setup, expand, versions, export, report  # noqa: E402,F401
