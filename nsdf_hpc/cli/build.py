"""``nsdf-run build | push | recipe convert``: recipes to images without a Docker daemon."""
from __future__ import annotations

import json
import shlex
from typing import Optional

import click

from ._common import cli_errors, make_client


@click.command()
@click.option("--builder", "-b", metavar="NAME",
              help="Build with this builder (podman, buildah, ch-image, apptainer).")
@click.option("--runtime", "-r", metavar="NAME", help="Build for this runtime's cache.")
@click.option("--tag", "-t", metavar="nsdf/NAME:vX.Y.Z", help="Override the recipe's title/version labels.")
@click.option("--dry-run", is_flag=True, help="Show the builder's commands (and a converted "
              "definition) without building.")
@click.option("--push", "do_push", is_flag=True, help="Push the image after building it.")
@click.option("--to", metavar="REGISTRY", help="With --push: push to this registry.")
@click.option("--json", "as_json", is_flag=True, help="JSON events on stderr, the result on stdout.")
@click.argument("recipe", type=click.Path(exists=True))
@click.pass_context
@cli_errors()
def build(ctx: click.Context, recipe: str, builder: Optional[str], runtime: Optional[str],
          tag: Optional[str], dry_run: bool, do_push: bool, to: Optional[str], as_json: bool) -> None:
    """Build RECIPE (a directory, a Dockerfile or an Apptainer definition) into
    nsdf/NAME:vX.Y.Z, ready to run with `nsdf-run run` on the runtime that goes with the
    builder. The builder is chosen like the runtime, and the choice is explained."""
    client = make_client(ctx, json_events=as_json)
    result = client.build(recipe, builder=builder, runtime=runtime, tag=tag, dry_run=dry_run)
    choice = result.choice
    assert choice is not None
    pushed = client.push(result.tag, to=to) if do_push and not dry_run else None
    if as_json:
        click.echo(result.model_dump_json() if pushed is None else
                   json.dumps({**json.loads(result.model_dump_json()), "push": json.loads(pushed.model_dump_json())}))
        return
    quiet = ctx.obj.get("quiet") if ctx.obj else False
    if not quiet or dry_run:
        click.echo(f"builder: {choice.explain()}", err=not dry_run)
        for name, why in choice.rejected.items():
            click.echo(f"  not {name}: {why}", err=not dry_run)
    if dry_run:
        if result.definition:
            click.echo("# the Apptainer definition converted from the Dockerfile (spython), FROM "
                       f"through the site's mirrors:\n{result.definition}")
        for argv in result.argv:
            click.echo(shlex.join(argv))
        return
    assert result.image is not None
    click.echo(f"built: {result.tag} -> {result.runtime}: {result.image.location} ({result.digest})")
    if pushed:
        click.echo(f"pushed: {pushed.tag} -> {pushed.destination} ({pushed.digest})")


@click.command()
@click.argument("tag")
@click.option("--to", metavar="REGISTRY", help="Push to this registry (default: the tag's own).")
@click.option("--json", "as_json", is_flag=True, help="The result as JSON.")
@click.pass_context
@cli_errors()
def push(ctx: click.Context, tag: str, to: Optional[str], as_json: bool) -> None:
    """Push TAG, an image built here with `nsdf-run build`, to a registry. Credentials come
    from NSDF_HPC_REGISTRY_USER/NSDF_HPC_REGISTRY_PASSWORD or the Docker/Podman auth files."""
    client = make_client(ctx, json_events=as_json)
    pushed = client.push(tag, to=to)
    if as_json:
        click.echo(pushed.model_dump_json())
    else:
        click.echo(f"pushed: {pushed.tag} -> {pushed.destination} ({pushed.digest}; "
                   f"credentials: {pushed.credentials})")


@click.group()
def recipe() -> None:
    """Work with build recipes."""


@recipe.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Write it here instead of stdout.")
@cli_errors()
def convert(path: str, output: Optional[str]) -> None:
    """Convert the Dockerfile at PATH to an Apptainer definition (spython), or refuse naming
    the line that cannot be converted faithfully."""
    from ..build import convert as to_def
    text = to_def(path)
    if output:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        click.echo(text, nl=False)
