"""``mmer report``, ``mmer audit`` and ``mmer gc``: what a version costs, checking and cleaning the store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mmer_cl.cli.app import Ctx, _jsonable, cli, emit_json
from mmer_cl.errors import StoreDamagedError
from mmer_cl.runtime.table import human_bytes


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
    from mmer_cl.store.report_tables import format_report, load_retention

    if eval_file is not None and plot is None:
        raise click.UsageError("--eval is read for the plot: add --plot FILE.png")
    retention = load_retention(eval_file) if eval_file is not None else None
    with obj.open() as store, obj.progress("measuring") as bar:
        r = store.report(version, base, rank_list, svd=not no_svd, progress=bar)
    emit_json(r) if as_json or obj.json else click.echo(format_report(r))
    if plot:
        from mmer_cl.store.report_tables import plot_report

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
