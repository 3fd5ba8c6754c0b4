"""Versions and what they hold: ``versions``, ``entries``, ``rollback``, ``alias``, ``tag``, ``describe``, ``show``,
``diff``, ``history``.
"""

from __future__ import annotations

import json

import click

from mmer_cl.cli.app import Ctx, cli, emit_json, parse_tags
from mmer_cl.runtime.table import Right, render_table


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
    from mmer_cl.store.version_tables import format_show

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
    from mmer_cl.store.version_tables import format_diff

    with obj.open() as store:
        d = store.diff(v1, v2 if v2 is not None else "current", base)
    emit_json(d) if as_json or obj.json else click.echo(format_diff(d))
