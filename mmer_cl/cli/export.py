"""``mmer export``: a version's entry (or its merged text model) as a runnable checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

import click

from mmer_cl.cli.app import Ctx, cli, emit_json, parse_size


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
        from mmer_cl.runtime.names import validate_name

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
