"""``nsdf-run pull | images | prune``: the image cache from the command line."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import click

from .._listing import human
from ._common import AGE, SIZE, cli_errors, make_client

if TYPE_CHECKING:
    from ..cache import Entry


@click.command()
@click.option("--runtime", "-r", metavar="NAME", help="Prepare for this runtime.")
@click.option("--platform", metavar="OS/ARCH",
              help="Prepare the image for this platform (linux/arm64), not this host's: for "
                   "nodes of that architecture (apptainer, charliecloud, podman, udocker).")
@click.option("--json", "as_json", is_flag=True, help="JSON events on stderr, the result on stdout.")
@click.argument("image")
@click.pass_context
@cli_errors()
def pull(ctx: click.Context, image: str, runtime: Optional[str], platform: Optional[str],
         as_json: bool) -> None:
    """Convert IMAGE to the runtime's native form and cache it by digest."""
    client = make_client(ctx, json_events=as_json)
    native = client.pull(image, runtime, platform=platform)
    if as_json:
        click.echo(native.model_dump_json())
    else:
        state = "cached" if native.cached else "pulled"
        click.echo(f"{state}: {native.source} -> {native.runtime}: {native.location}"
                   + (f" ({native.digest}" + (f", {native.platform}" if native.platform else "") + ")"
                      if native.digest else ""))


@click.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", is_flag=True,
              help="Re-hash every artifact and ask the runtimes' stores for their images (slow).")
@click.pass_context
@cli_errors()
def images(ctx: click.Context, as_json: bool, verify: bool) -> None:
    """List cached images: runtime, platform, digest, size, last use."""
    from .._listing import image_output, image_rows, remember_valid_settings
    client = make_client(ctx)
    # the settings are valid: later bare listings may go fast
    remember_valid_settings(client.env, client.settings.cache_dir, client.settings.site_cache_dirs)
    check = (lambda e: client.verify(e, full=True)) if verify else client.cache.check
    click.echo(image_output(image_rows(client.entries(), check), client.cache.root, as_json), nl=False)


@click.command()
@click.option("--older-than", type=AGE, metavar="AGE",
              help="Remove entries unused for AGE (30d, 12h, 90m; 0: all).")
@click.option("--max-size", type=SIZE, metavar="SIZE",
              help="Then shrink to SIZE (10G, 500M; 0: nothing left), least recently used first.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_context
@cli_errors()
def prune(ctx: click.Context, older_than: Optional[float], max_size: Optional[int], dry_run: bool) -> None:
    """Remove cached images safely while others may be using the cache."""
    from ..errors import SpecError
    if older_than is None and max_size is None:
        raise SpecError("say what to prune: --older-than AGE and/or --max-size SIZE")
    client = make_client(ctx)
    def kept(e: "Entry", why: str) -> None:
        click.echo(f"kept {e.runtime} {e.digest} ({human(e.size())}) {e.data.get('source')}: {why}",
                   err=True)
    removed = client.prune(older_than=older_than, max_size=max_size, dry_run=dry_run, on_kept=kept)
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        click.echo(f"{verb} {e.runtime} {e.digest} ({human(e.size())}) {e.data.get('source')}")
    click.echo(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
               f"{human(sum(e.size() for e in removed))}")
