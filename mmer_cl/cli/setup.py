"""``mmer init`` and ``mmer register``: create a store for a base, add fine-tuned checkpoints to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mmer_cl.cli.app import Ctx, cli, emit_json, parse_tags
from mmer_cl.runtime.interrupts import raise_from_now_on

if TYPE_CHECKING:
    from mmer_cl.store import Store


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
    from mmer_cl.checkpoints.hub import resolve_checkpoint
    from mmer_cl.runtime.names import validate_name
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
    from mmer_cl.checkpoints.hub import resolve_checkpoint
    from mmer_cl.runtime.names import validate_name

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
