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

from mmer_cl.errors import StoreDamagedError
from mmer_cl.failures import describe_failure
from mmer_cl.interrupts import (exit_interrupted, ignore_further_interrupts, raise_from_now_on, remember_interrupts,
                                was_interrupted)
from mmer_cl.progress import Progress
from mmer_cl.table import Right, human_bytes, render_table

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
    from mmer_cl.provenance import store_format

    click.echo(f"mmer (mmer-cl) {__version__}\nstore format {store_format()} (registry schema; stores of "
               "earlier formats are upgraded when opened)")
    ctx.exit(0)


class MmerGroup(click.Group):
    """Turns every failure into a message and an exit code (see :mod:`mmer_cl.failures`); accepts global
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


@cli.command()
@click.option("--base", "base_path", required=True, metavar="PATH|ORG/NAME",
              help="The base LLM checkpoint directory (safetensors), or a Hub id in the local Hugging Face cache.")
@click.option("--name", help="A name for the base (default: its directory name).")
@click.pass_obj
def init(obj: Ctx, base_path: str, name: str | None) -> None:
    """Create a store for one base LLM (or add another base to a store).

    The base is referenced by path, not copied; its tensors' checksums are
    recorded, and every later read is checked against them.

    \b
    Example:
      mmer --store my-store init --base ./llama-base --name llama
    """
    from mmer_cl.hub import resolve_checkpoint
    from mmer_cl.names import validate_name
    from mmer_cl.store import Store

    if name is not None:
        validate_name(name, "base name")
    base_path = resolve_checkpoint(base_path, "base")
    raise_from_now_on()  # as in Ctx.open: the store is about to be written
    with obj.progress("fingerprinting base") as bar:
        store = Store.init(obj.store_path, base_path, base_name=name, actor=obj.actor, url=obj.db_url, progress=bar,
                           objects=obj.objects)
    b = store.init_result
    where = store.blobs.location if obj.objects and obj.db_url else obj.store_path
    store.close()
    if obj.json:
        emit_json({"created": store.init_created, "store": str(where), "base": {"name": b.name,
                   "fingerprint": b.fingerprint, "path": str(base_path)}})
        return
    if not store.init_created:
        click.echo(f"{where} already holds this base as {b.name!r} ({b.fingerprint[:12]}); nothing changed")
        return
    click.echo(f"initialised {where} with base {b.name!r} ({b.fingerprint[:12]})")


@cli.command()
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--name", required=True, help="Entry name (letters, digits, . _ -).")
@click.option("--modality", help="vision, audio, video, text, ... (required, except with --update: the entry's).")
@click.option("--task", help="What it was fine-tuned for [default; with --update: the entry's].")
@click.option("--llm-prefix", help="Prefix of the LLM tensors when not a known one (e.g. 'decoder.').")
@click.option("--max-change", type=float, default=0.5, show_default=True,
              help="Refuse when ||theta - theta_0|| / ||theta_0|| exceeds this (likely another base).")
@click.option("--update", is_flag=True, help="Register a new revision of the existing entry NAME (the old one stays "
              "in history and in the versions that hold it).")
@click.option("--description", default="", help="A description of the entry.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A tag on the entry (repeatable).")
@click.option("--reference", is_flag=True, help="Keep the checkpoint's path and per-tensor sha256 instead of a copy "
              "of its task vector (the checkpoint must then stay where it is, unchanged).")
@click.option("--codec", default="lossless", show_default=True, metavar="lossless|bitdelta",
              help="How the LLM delta is stored: lossless (the exact task vector, merged by expand) or bitdelta "
              "(the sign of each matrix's change plus one scale per matrix: about 1 bit per parameter against 16-32 "
              "for the exact task vector; lossy, never merged, served from its own delta at every version).")
@click.option("--base", help="Base name, when the store holds several.")
@click.pass_obj
def register(obj: Ctx, checkpoint: str, name: str, modality: str | None, task: str | None, llm_prefix: str | None,
             max_change: float, update: bool, description: str, tags: tuple[str, ...], reference: bool,
             codec: str, base: str | None) -> None:
    """Record a fine-tuned multimodal checkpoint (or a peft LoRA adapter) as a new entry.

    CHECKPOINT is a directory (safetensors) or a Hub id ORG/NAME already in the
    local Hugging Face cache (mmer never downloads). Stores its LLM task vector
    (fine-tuned minus base; for a LoRA adapter, B @ A * scaling), its
    encoder/projector and its config files, compressed; the source may be
    deleted afterwards. Registering the same checkpoint again under its name
    is recognised and changes nothing; under another name it is refused (exit
    2), naming the entry that holds it. A taken name needs --update, which
    keeps the entry's modality and task unless given. Run `expand` afterwards.
    With --reference the task vector is not copied: expansions read the
    checkpoint again, checking every tensor's sha256 (exports never need it).
    With --codec bitdelta only the sign of each LLM matrix's change and one
    scale per matrix are kept (1-D tensors exactly): lossy, and never merged;
    `export --entry NAME` serves base + that delta at every version.

    \b
    Examples:
      mmer register ./llava-vision --name vision --modality vision --task vqa
      mmer register ./llava-audio --name audio --modality audio --codec bitdelta
      mmer register /models/llava-audio --name audio --modality audio --reference
      mmer register ./lora-adapter --name chat --modality text --tag owner=ana
      mmer register ./llava-vision-v2 --name vision --update
    """
    from mmer_cl.hub import resolve_checkpoint
    from mmer_cl.names import validate_name

    validate_name(name, "entry name")  # before any store or checkpoint is opened
    for value, what in ((modality, "modality"), (task, "task"), (base, "base name")):
        if value is not None:
            validate_name(value, what)
    parsed_tags = parse_tags(tags)
    if not max_change > 0 or max_change != max_change or max_change == float("inf"):
        raise click.BadParameter(f"must be a finite number > 0, got {max_change}", param_hint="--max-change")
    if modality is None and not update:
        raise click.UsageError("give the entry's modality: --modality vision (or audio, video, text, ...)")
    if codec not in ("lossless", "bitdelta"):
        raise click.BadParameter(f"{codec!r} is not a codec; choose lossless (the exact task vector, the default) "
                                 "or bitdelta (1-bit deltas: lossy, never merged)", param_hint="--codec")
    if codec != "lossless" and reference:
        raise click.UsageError("--reference keeps the checkpoint itself and --codec bitdelta a 1-bit copy of its "
                               "delta; choose one")
    path = resolve_checkpoint(checkpoint)
    with obj.open() as store, obj.progress(f"registering {name}") as bar:
        result = store.register(path, name, modality, task, llm_prefix=llm_prefix, base=base,
                                actor=obj.actor, max_relative_change=max_change, progress=bar, update=update,
                                description=description, tags=parsed_tags, reference=reference, codec=codec)
    if result.skipped_files:
        click.echo(f"warning: not copied from {checkpoint} (not a known config, tokenizer, processor, template or "
                   f"model card file): {', '.join(result.skipped_files)}", err=True)
    e = result.entry
    if obj.json:
        emit_json({"created": result.created, "entry": e, "summary": result.keymap_summary,
                   "relative_change": e.stats.get("relative_change"), "skipped_files": list(result.skipped_files)})
        return
    if not result.created:
        click.echo(f"already registered as entry {e.label!r}; nothing changed")
        return
    rev = f" revision {e.revision}" if e.revision > 1 else ""
    lossy = (f"; stored as 1-bit deltas (lossy, never merged: `mmer export --entry {e.label}` serves it)"
             if e.codec == "bitdelta" else "")
    click.echo(f"registered {name!r}{rev} ({e.modality}/{e.task}): {result.keymap_summary}; "
               f"relative change {e.stats['relative_change']:.4f}{lossy}")


@cli.command()
@click.option("--method", type=click.Choice(["ties", "task_arithmetic", "average", "dare_ties"]),
              help="Merge of the task vectors [default: the current version's, else ties].")
@click.option("--density", type=float, help="Fraction kept by trimming (ties, dare_ties) [0.2].")
@click.option("--alpha", type=float, help="Scale of the merged vector [1.0].")
@click.option("--mask-rule", type=click.Choice(["mmer", "emr", "consensus"]), help="Mask rule [mmer].")
@click.option("--lambda", "lam", type=float, help="lambda of the mmer rule; smaller keeps more [1.0].")
@click.option("--k", type=int, help="Models that must agree, for consensus [2].")
@click.option("--seed", type=int, help="Seed of dare_ties [0].")
@click.option("--config", "config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A YAML recipe (method, density, alpha, lambda, mask_rule, members, lambda_per_entry, ...); "
              "options given beside it override it. Stored with the version.")
@click.option("--members", help="Comma-separated entries to merge [all active entries].")
@click.option("--description", default="", help="A description of the new version.")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="A tag on the new version (repeatable).")
@click.option("--base", help="Base name, when the store holds several.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Run the tensor groups as Ray tasks: on the cluster at ADDRESS (host:port, ray://host:10001, "
              "auto), or with no ADDRESS the one RAY_ADDRESS names / a local one. Workers read and write the "
              "shared blob location (--objects), so it must be reachable from every node.")
@click.option("--json", "as_json", is_flag=True, help="Print the new version as JSON.")
@click.pass_obj
def expand(obj: Ctx, base: str | None, ray_address: str | None, as_json: bool, config: Path | None,
           members: str | None, description: str, tags: tuple[str, ...], **overrides) -> None:
    """Merge all registered entries into a new version and make it current.

    With ties and unchanged merge parameters, only the entries added since
    the current version are folded into its stored accumulators; every
    entry's mask is recomputed, so earlier modalities stay retained.

    \b
    Examples:
      mmer expand
      mmer expand --density 0.3 --lambda 0.8
      mmer expand --config recipe.yaml --tag stage=staging
      mmer --db-url postgresql://db/mmer --objects s3://bucket/mmer expand --ray ray://head:10001
    """
    from mmer_cl.params import MergeParams

    as_json = as_json or obj.json
    recipe = None
    if config is not None:
        from mmer_cl.recipe import load_recipe

        recipe = load_recipe(config)
    given = {k: v for k, v in overrides.items() if v is not None}
    MergeParams(**{**(recipe.params.to_dict() if recipe else {}), **given})  # checked before the store opens
    member_list = [m.strip() for m in members.split(",") if m.strip()] if members else \
        (recipe.members if recipe else None)
    from mmer_cl.names import validate_name

    for member in member_list or ():
        validate_name(member, "member name")
    version_tags = parse_tags(tags)
    with obj.open() as store:
        base_rec = store.base(base)
        wanted = str(recipe.info.get("base_fingerprint") or "") if recipe else None
        if wanted and wanted != base_rec.fingerprint:
            raise click.UsageError(f"{config} was made for base {recipe.info.get('base')!r} ({str(wanted)[:12]}); "
                                   f"this store's base {base_rec.name!r} is {base_rec.fingerprint[:12]}. Use it in a "
                                   "store of that base (or delete the base_fingerprint line to apply its parameters "
                                   "here anyway)")
        current = store.registry.version(base_rec.id)
        start = recipe.params if recipe else (MergeParams.from_dict(current.params) if current else MergeParams())
        params = MergeParams(**{**start.to_dict(), **given})
        runner = None
        if ray_address is not None:
            from mmer_cl.distributed.ray_expand import RayRunner

            runner = RayRunner(ray_address or None)
        with obj.progress("expanding (tensor groups)" if runner else "expanding") as bar:
            result = store.expand(params, base=base, actor=obj.actor, progress=bar, members=member_list,
                                  recipe=recipe.text if recipe else None,
                                  description=description or (recipe.description if recipe else ""),
                                  tags={**(recipe.tags if recipe else {}), **version_tags}, runner=runner)
    v = result.version
    moved = runner.summary() if runner is not None and result.created else None
    if as_json:
        emit_json({"created": result.created, "incremental": result.incremental, "version": v,
                   **({"distributed": moved} if moved else {})})
        return
    if moved:
        click.echo(f"ray: {moved['groups']} tensor groups on {len(moved['workers'])} worker processes; read "
                   f"{human_bytes(moved['read_bytes'])}, wrote {human_bytes(moved['written_bytes'])}")
    if not result.created:
        click.echo(f"version {v.number} is already current with these entries and parameters; nothing to do")
        return
    how = "incrementally" if result.incremental else "from all task vectors"
    click.echo(f"version {v.number} ({how}): " + ", ".join(
        f"{m.entry_name} mask {m.mask_density:.1%}" for m in v.members))


@cli.command()
@click.option("--base", help="Base name, when the store holds several.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def versions(obj: Ctx, base: str | None, as_json: bool) -> None:
    """List versions, their parameters and members; * marks current.

    \b
    Example:
      mmer versions --json
    """
    with obj.open() as store:
        vs = store.versions(base)
    if as_json or obj.json:
        emit_json(vs)
        return
    if not vs:
        click.echo("no versions yet; run `mmer expand`")
        return
    rows = []
    for v in vs:
        p = v.params
        rows.append(["*" if "current" in v.aliases else "", f"v{v.number}", f"{v.created_at:%Y-%m-%d %H:%M}",
                     v.created_by, f"{p['method']} d={p['density']} a={p['alpha']} {p['mask_rule']} l={p['lam']}",
                     ", ".join(m.entry_name + (f"@{m.revision}" if m.revision > 1 else "") for m in v.members),
                     ", ".join(v.aliases), "incremental" if v.details.get("incremental") else ""])
    click.echo(render_table(["", "version", "created", "by", "parameters", "members", "aliases", ""], rows))


@cli.command()
@click.option("--all", "include_removed", is_flag=True, help="Include removed entries.")
@click.option("--base", help="Base name, when the store holds several.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def entries(obj: Ctx, include_removed: bool, base: str | None, as_json: bool) -> None:
    """List registered entries.

    \b
    Example:
      mmer entries --all
    """
    with obj.open() as store:
        es = store.entries(include_removed, base)
    if as_json or obj.json:
        emit_json(es)
        return
    if not es:
        click.echo("no entries yet; run `mmer register CHECKPOINT --name NAME --modality MODALITY`")
        return
    rows = []
    for e in es:
        state = "" if e.active else ("(superseded)" if e.superseded_by else "(removed)")
        codec = "bitdelta (lossy)" if e.codec == "bitdelta" else e.codec
        rows.append([e.name, Right(f"r{e.revision}"), e.modality, e.task, codec, f"{e.created_at:%Y-%m-%d %H:%M}",
                     ", ".join(f"{k}={v}" for k, v in e.tags.items()), e.source_path, state])
    click.echo(render_table(["entry", "rev", "modality", "task", "codec", "created", "tags", "source", ""], rows))


@cli.command()
@click.argument("version")
@click.option("--base", help="Base name, when the store holds several.")
@click.pass_obj
def rollback(obj: Ctx, version: str, base: str | None) -> None:
    """Make VERSION (3, v3 or an alias) current again. Nothing is deleted; you can roll forward too.

    \b
    Examples:
      mmer rollback 2
      mmer rollback v2
      mmer rollback production
    """
    with obj.open() as store:
        before, after = store.rollback(version, base=base, actor=obj.actor)
    if obj.json:
        emit_json({"alias": "current", "before": before, "after": after})
        return
    click.echo(f"current: {before} -> {after}")


@cli.command()
@click.argument("name")
@click.option("--base", help="Base name, when the store holds several.")
@click.pass_obj
def remove(obj: Ctx, name: str, base: str | None) -> None:
    """Remove an entry: a new version without it becomes current.

    The new version holds the current version's members less this one.
    When an entry was registered or updated since the current version, it
    is refused (nothing changes): run `mmer expand` first, so that the new
    entry enters a version of its own. Earlier versions keep the removed
    entry, so a rollback brings it back.

    \b
    Example:
      mmer remove audio
    """
    from mmer_cl.names import validate_name

    validate_name(name, "entry name")
    with obj.open() as store, obj.progress("re-merging") as bar:
        v = store.remove(name, base=base, actor=obj.actor, progress=bar)
    if obj.json:
        emit_json({"removed": name, "version": v})
        return
    if v is None:
        click.echo(f"removed {name!r}; no version is current")
        return
    click.echo(f"removed {name!r}; version {v.number} is current: " + (", ".join(
        f"{m.entry_name}" + (f" r{m.revision}" if m.revision > 1 else "") for m in v.members)))


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--entry", "-e", help="The entry (modality model) to reconstruct.")
@click.option("--text", is_flag=True, help="Export the merged text-only LLM (base + merged) instead.")
@click.option("--version", "version", help="Version number or alias [current].")
@click.option("--no-mask", is_flag=True, help="Use the whole merged LLM, not the entry's mask (plain-merge baseline).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it holds an earlier mmer export (never anything "
              "else: not the store, a base, a registered source or a directory containing them).")
@click.option("--max-shard-size", help="Largest shard, e.g. 500MB, 5GB [like the registered checkpoint].")
@click.option("--base", help="Base name, when the store holds several.")
@click.pass_obj
def export(obj: Ctx, out_dir: Path, entry: str | None, text: bool, version: str | None, no_mask: bool,
           force: bool, max_shard_size: str | None, base: str | None) -> None:
    """Write a runnable checkpoint: an entry's base + mask * merged, or the merged text LLM.

    The entry is written in its own original layout (config, tokenizer and
    encoder copied), so `from_pretrained` of its original class loads it.

    \b
    Examples:
      mmer export --entry vision out/vision
      mmer export --entry vision --version 1 out/vision-v1
      mmer export --text out/text-llm
    """
    if bool(entry) == text:
        raise click.UsageError("give exactly one of --entry NAME or --text")
    shard = parse_size(max_shard_size) if max_shard_size else None
    if entry is not None:
        from mmer_cl.names import validate_name

        validate_name(entry, "entry name")
    with obj.open() as store, obj.progress("exporting") as bar:
        one_bit = store.bitdelta_entry(entry, version, base) if entry is not None else None
        if text:
            store.export_text(out_dir, version=version, base=base, overwrite=force, max_shard_bytes=shard,
                              progress=bar, actor=obj.actor)
        else:
            store.export(entry, out_dir, version=version, base=base, overwrite=force, max_shard_bytes=shard,
                         use_mask=not no_mask, progress=bar, actor=obj.actor)
        number = None if one_bit is not None else store.version(version, base).number
    codec = None if text else "bitdelta" if one_bit is not None else "lossless"
    if obj.json:
        emit_json({"path": str(out_dir), "entry": entry, "text": text, "version": number, "codec": codec,
                   "files": sorted(p.name for p in Path(out_dir).iterdir())})
        return
    if one_bit is not None:
        click.echo(f"wrote {out_dir} (entry {entry} rebuilt from its 1-bit delta: lossy, the same at every version)")
        return
    click.echo(f"wrote {out_dir} (version {number}; its recipe: {Path(out_dir) / 'mmer-recipe.yaml'})")


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


@cli.command()
@click.option("--version", "version", help="Version number or alias [current].")
@click.option("--ranks", default="8,16,64", show_default=True, help="LoRA ranks to compare against.")
@click.option("--no-svd", is_flag=True, help="Skip the SVD fidelity comparison (slow on big models).")
@click.option("--base", help="Base name, when the store holds several.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the bytes to serve every entry against task retention (with --eval) or the task "
              "vectors' reconstruction error: full copies, LoRA ranks, MMER as points, to this PNG.")
@click.option("--eval", "eval_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='Measured task retention for --plot: {"retention": {"mmer": 0.97, "full": 1.0, "lora": '
              '{"16": 0.95}}}, or the demo\'s examples/results/results.json.')
@click.pass_obj
def report(obj: Ctx, version: str | None, ranks: str, no_svd: bool, base: str | None, as_json: bool,
           plot: Path | None, eval_file: Path | None) -> None:
    """Storage cost of a version against full copies and LoRA adapters.

    Counts every byte the store holds on disk (task vectors, merged
    vectors, masks, modality sides, files, the registry; the total is what
    `du -sb` says), split into what serving a version needs (base + merged +
    masks + modality sides) and what is kept only to re-merge later; against
    N full fine-tuned copies and N LoRA adapters of each rank on all linear
    layers; per entry, each mask's density, bits per parameter and the
    entropy bound H(density); and the relative error of LoRA extracted from
    each task vector by SVD next to MMER's own.

    \b
    Examples:
      mmer report --ranks 8,64 --json
      mmer report --plot size-vs-error.png
      mmer report --plot size-vs-retention.png --eval examples/results/results.json
    """
    try:
        rank_list = [int(r) for r in ranks.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"ranks must be integers separated by commas, got {ranks!r}") from None
    from mmer_cl.report import format_report, load_retention

    if eval_file is not None and plot is None:
        raise click.UsageError("--eval is read for the plot: add --plot FILE.png")
    retention = load_retention(eval_file) if eval_file is not None else None
    with obj.open() as store, obj.progress("measuring") as bar:
        r = store.report(version, base, rank_list, svd=not no_svd, progress=bar)
    emit_json(r) if as_json or obj.json else click.echo(format_report(r))
    if plot:
        from mmer_cl.report import plot_report

        plot_report(r, plot, retention, str(eval_file or ""))
        click.echo(f"wrote {plot}", err=as_json or obj.json)


@cli.command()
@click.option("--check-base", is_flag=True, help="Also re-hash every base tensor at its source path.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def audit(obj: Ctx, check_base: bool, as_json: bool) -> None:
    """Verify every blob's checksum, every row's references, and every
    entry and version row against its manifest in the blob store.

    Exits 1 and names each damaged or missing blob with the entries and
    versions it breaks. See `mmer history` for who did what when.

    \b
    Example:
      mmer audit --check-base
    """
    try:
        store = obj.open()
    except StoreDamagedError as exc:  # the database itself is a finding, like a damaged blob
        if as_json or obj.json:
            emit_json({"ok": False, "checked": 0, "damaged": [], "dangling": [], "base_problems": [],
                       "database_problems": [str(exc)], "unreferenced": 0, "manifest_problems": [],
                       "undescribed": 0})
        else:
            click.echo(f"PROBLEM registry: {exc}")
        sys.exit(1)
    with store, obj.progress("verifying") as bar:
        rep = store.audit(check_base=check_base, progress=bar)
    if as_json or obj.json:
        emit_json({"ok": rep.ok, **_jsonable(rep)})
    else:
        for d in rep.damaged:
            shown = "; ".join(d.owners[:5]) + (f"; and {len(d.owners) - 5} more" if len(d.owners) > 5 else "")
            click.echo(f"{d.problem.upper()} blob {d.digest}: breaks {shown}")
        for p in rep.database_problems:
            click.echo(f"PROBLEM registry: {p}")
        for p in rep.manifest_problems:
            click.echo(f"DAMAGE {p}")
        for p in rep.dangling + rep.base_problems:
            click.echo(f"PROBLEM {p}")
        if rep.manifest_problems or rep.dangling:
            click.echo("the registry differs from the manifests in the blob store: `mmer gc` refuses to run. "
                       "Restore the registry from a backup taken before the damage (registry.db, or your "
                       "--db-url database); the manifests make it work again.")
        if rep.undescribed:
            click.echo(f"note: {rep.undescribed} rows of an earlier release have no manifest yet (written on the "
                       "next command that can write to the store)")
        if rep.ok:
            click.echo(f"ok: {rep.checked} blobs verified" +
                       (f"; {rep.unreferenced} unreferenced (run `mmer gc`)" if rep.unreferenced else ""))
    if not rep.ok:
        sys.exit(1)


@cli.command()
@click.option("--limit", type=int, help="Only the last N events.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def history(obj: Ctx, limit: int | None, as_json: bool) -> None:
    """Print the audit log: who did what, when, before -> after.

    \b
    Example:
      mmer history --limit 20
    """
    with obj.open() as store:
        events = store.history(limit)
    if as_json or obj.json:
        emit_json(events)
        return
    click.echo(render_table(["when", "who", "action", "subject", "change"],
                            [[f"{e.at:%Y-%m-%d %H:%M:%S}", e.actor, e.action, e.subject,
                              f"{e.before or '-'} -> {e.after or '-'}"] for e in events]))


@cli.command()
@click.pass_obj
def gc(obj: Ctx) -> None:
    """Delete blobs that no entry or version references (left by crashes).

    Refuses to run while `mmer audit` finds the registry damaged (rows that
    differ from the manifests), and never removes a running export's files.

    \b
    Example:
      mmer gc
    """
    with obj.open() as store:
        result = store.gc(obj.actor)
    if obj.json:
        emit_json(result)
        return
    click.echo(f"removed {result.removed} blobs ({human_bytes(result.freed_bytes)}), "
               f"{result.temp_files} temp files, {result.partial_exports} partial exports")


@cli.group(cls=click.Group, invoke_without_command=True)
@click.option("--base", help="Base name, when the store holds several.")
@click.pass_context
def alias(ctx: click.Context, base: str | None) -> None:
    """Named pointers to versions (current, production, ...); every move is in the audit log.

    Without a subcommand, lists the aliases. `current` is the default of
    every command and moves with `expand` and `rollback`.

    \b
    Examples:
      mmer alias set production v3
      mmer alias rm production
      mmer alias
    """
    ctx.ensure_object(Ctx)
    ctx.meta["alias_base"] = base
    if ctx.invoked_subcommand is None:
        obj: Ctx = ctx.obj
        with obj.open() as store:
            aliases = store.aliases(base)
        if obj.json:
            emit_json(aliases)
            return
        click.echo(render_table(["alias", "version"],
                                [[a, f"v{n}" if n is not None else "none"] for a, n in aliases.items()]))


@alias.command("set")
@click.argument("name")
@click.argument("version")
@click.pass_context
def alias_set(ctx: click.Context, name: str, version: str) -> None:
    """Point alias NAME at VERSION (3, v3 or another alias).

    \b
    Example:
      mmer alias set production v3
    """
    obj: Ctx = ctx.obj
    with obj.open() as store:
        before, after = store.set_alias(name, version, base=ctx.meta.get("alias_base"), actor=obj.actor)
    if obj.json:
        emit_json({"alias": name, "before": before, "after": after})
        return
    click.echo(f"{name}: {before} -> {after}")


@alias.command("rm")
@click.argument("name")
@click.pass_context
def alias_rm(ctx: click.Context, name: str) -> None:
    """Remove alias NAME (the version stays; `current` cannot be removed).

    \b
    Example:
      mmer alias rm production
    """
    obj: Ctx = ctx.obj
    with obj.open() as store:
        before = store.remove_alias(name, base=ctx.meta.get("alias_base"), actor=obj.actor)
    if obj.json:
        emit_json({"alias": name, "before": before, "after": None})
        return
    click.echo(f"{name}: {before} -> none (removed)")


@cli.command()
@click.argument("pairs", nargs=-1, metavar="KEY=VALUE...")
@click.option("--entry", "-e", help="Tag this entry instead of a version.")
@click.option("--version", "version", help="The version to tag (3, v3 or an alias) [current].")
@click.option("--rm", "remove", multiple=True, metavar="KEY", help="Remove this tag (repeatable).")
@click.option("--base", help="Base name, when the store holds several.")
@click.pass_obj
def tag(obj: Ctx, pairs: tuple[str, ...], entry: str | None, version: str | None, remove: tuple[str, ...],
        base: str | None) -> None:
    """Set or remove key=value tags on a version (default: current) or an entry.

    \b
    Examples:
      mmer tag stage=production reviewed=yes
      mmer tag --version v2 --rm stage
      mmer tag --entry vision owner=ana
    """
    if not pairs and not remove:
        raise click.UsageError("give tags as KEY=VALUE and/or --rm KEY")
    bare = [p for p in pairs if "=" not in p]
    if bare:  # `mmer tag v1.0 v2`, as in git: a name for a version is an alias
        example = f"mmer alias set {bare[0]} {bare[1] if len(bare) > 1 else 'VERSION'}"
        raise click.UsageError(f"tags are KEY=VALUE (e.g. `mmer tag stage=production`); to give a version a name, "
                               f"use an alias: `{example}`")
    new_tags = parse_tags(pairs)
    with obj.open() as store:
        tags = store.tag(new_tags, remove=remove, entry=entry, version=version, base=base, actor=obj.actor)
    if obj.json:
        emit_json({"target": f"entry {entry}" if entry else f"version {version or 'current'}", "tags": tags})
        return
    click.echo(", ".join(f"{k}={v}" for k, v in tags.items()) or "no tags")


@cli.command()
@click.argument("text")
@click.option("--entry", "-e", help="Describe this entry instead of a version.")
@click.option("--version", "version", help="The version to describe (3, v3 or an alias) [current].")
@click.option("--base", help="Base name, when the store holds several.")
@click.pass_obj
def describe(obj: Ctx, text: str, entry: str | None, version: str | None, base: str | None) -> None:
    """Set the description of a version (default: current) or an entry.

    \b
    Examples:
      mmer describe "vision + audio, density 0.5"
      mmer describe --entry vision "LLaVA-1.5 fine-tune on VQAv2"
    """
    with obj.open() as store:
        store.describe(text, entry=entry, version=version, base=base, actor=obj.actor)
    if obj.json:
        emit_json({"target": f"entry {entry}" if entry else f"version {version or 'current'}",
                   "description": text})
        return
    click.echo("description set")


@cli.command()
@click.argument("version", required=False)
@click.option("--base", help="Base name, when the store holds several.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def show(obj: Ctx, version: str | None, base: str | None, as_json: bool) -> None:
    """One version in full: members, parameters, mask densities, sizes, recipe.

    VERSION is 3, v3 or an alias [current].

    \b
    Examples:
      mmer show
      mmer show v2 --json
    """
    from mmer_cl.versions import format_show

    with obj.open() as store:
        d = store.show(version, base)
    emit_json(d) if as_json or obj.json else click.echo(format_show(d))


@cli.command()
@click.argument("v1")
@click.argument("v2", required=False)
@click.option("--base", help="Base name, when the store holds several.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def diff(obj: Ctx, v1: str, v2: str | None, base: str | None, as_json: bool) -> None:
    """What changed from V1 to V2 [current]: members, parameters, mask densities per entry.

    \b
    Examples:
      mmer diff v1 v2
      mmer diff production
    """
    from mmer_cl.versions import format_diff

    with obj.open() as store:
        d = store.diff(v1, v2 if v2 is not None else "current", base)
    emit_json(d) if as_json or obj.json else click.echo(format_diff(d))


def main() -> None:
    """The ``mmer`` command (see :mod:`mmer_cl.entry`, which handles Ctrl-C before this module loads)."""
    # A file-size limit (ulimit -f) must end in EFBIG, a message and exit 1, not a kill by SIGXFSZ.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    remember_interrupts(clear=False, at_once=True)  # until the store opens (Ctx.open), as in mmer_cl.entry
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


if __name__ == "__main__":
    main()
