"""``mmer expand`` and ``mmer remove``: each makes a new version of the store.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mmer_cl.cli.app import Ctx, cli, emit_json, parse_tags
from mmer_cl.runtime.table import human_bytes


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
    from mmer_cl.method.params import MergeParams

    as_json = as_json or obj.json
    recipe = None
    if config is not None:
        from mmer_cl.store.recipe import load_recipe

        recipe = load_recipe(config)
    given = {k: v for k, v in overrides.items() if v is not None}
    MergeParams(**{**(recipe.params.to_dict() if recipe else {}), **given})  # checked before the store opens
    member_list = [m.strip() for m in members.split(",") if m.strip()] if members else \
        (recipe.members if recipe else None)
    from mmer_cl.runtime.names import validate_name

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
    from mmer_cl.runtime.names import validate_name

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
