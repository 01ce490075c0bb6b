"""``nsdf-run run``: run a command in a container and exit with its exit code.

Planning, the launch record and execution are the library's one run pipeline
(:meth:`nsdf_hpc.client.Client.run`); this module only prints ``--dry-run`` plans.
"""
from __future__ import annotations

import shlex
import sys
from typing import Any, Dict, Optional, Sequence

import click

from ._common import container_command, exit_on_errors, make_client, run_options, spec_options


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@run_options
@click.option("--dry-run", is_flag=True, help="Print the exact argv and environment; run nothing.")
@click.argument("image")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, image: str, command: Sequence[str], runtime: Optional[str],
        dry_run: bool, **options: Any) -> None:
    """Run COMMAND in IMAGE and exit with its exit code (put `--` before COMMAND).

    IMAGE is a registry reference (`nsdf/name:v1.0.0`, `ghcr.io/o/i:tag`, `...@sha256:...`),
    `docker-archive:FILE`, `oci-archive:FILE`, `oci:DIR`, or a native image (`x.sif`, `x.sqfs`,
    a directory). The current directory is bound and is the working directory by default.
    """
    with exit_on_errors(not_run=True, say_interrupted=False):
        argv = container_command(command, "run")
        returncode = _plan_and_run(ctx, image, argv, runtime, dry_run, spec_options(**options))
    sys.exit(returncode)


def _plan_and_run(ctx: click.Context, image: str, command: Sequence[str], runtime: Optional[str],
                  dry_run: bool, spec_opts: Dict[str, Any]) -> int:
    """Plan the run (print the plan for ``--dry-run``), record it for the fast path, execute
    it with the terminal attached; returns the exit code to exit with."""
    client = make_client(ctx)
    # a terminal on both ends: the runtimes that need to be told (podman -t) allocate one
    spec = client.spec(image, command, tty=sys.stdin.isatty() and sys.stdout.isatty(), **spec_opts)
    if dry_run:
        inv, native, rt = client.plan(spec, runtime)
        click.echo(f"# runtime: {rt.name} {rt.version or ''}  image: {native.location}"
                   + ("" if native.cached else "  (not cached yet: `nsdf-run pull` would create it)"))
        for k in sorted(inv.env):
            click.echo(f"export {k}={shlex.quote(inv.env[k])}")
        click.echo(shlex.join(inv.argv))
        return 0
    args = ctx.ensure_object(dict).get("argv")
    return client.run(image, command, runtime=runtime, spec=spec, capture=False, record=args).returncode
