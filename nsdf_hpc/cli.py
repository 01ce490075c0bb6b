"""``nsdf-run``: the command line. The only module that prints or exits.

Exit codes: a command run in a container passes its own status through; 125 means nothing
ran because nsdf-run or the runtime failed first (podman/docker convention); 2 is bad input
(malformed --bind/--env/image reference, unknown runtime); 1 is any other error.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, TypeVar, cast

import click

from ._version import __version__

if TYPE_CHECKING:
    from .client import Client
    from .errors import NsdfError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_NOT_RUN = 125


def _error_exit(err: "NsdfError", not_run: bool = False) -> None:
    from .errors import ConfigError, SpecError
    click.echo(f"nsdf-run: error: {err}", err=True)
    if isinstance(err, (SpecError, ConfigError)):
        sys.exit(2)
    sys.exit(EXIT_NOT_RUN if not_run else getattr(err, "exit_code", 1))


def cli_errors(not_run: bool = False) -> Callable[[F], F]:
    """Turn an NsdfError into one clean line on stderr and an exit code."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from .errors import NsdfError
            try:
                return fn(*args, **kwargs)
            except NsdfError as err:
                _error_exit(err, not_run)
            except KeyboardInterrupt:
                click.echo("nsdf-run: interrupted", err=True)
                sys.exit(130)
        return cast(F, wrapper)
    return deco


def _client(ctx: click.Context, json_events: bool = False) -> "Client":
    from .client import Client
    obj: Dict[str, Any] = ctx.ensure_object(dict)
    progress = _progress_printer(json_events, obj.get("quiet", False))
    return Client(progress=progress)


def _progress_printer(json_events: bool, quiet: bool) -> Callable[[Dict[str, Any]], None]:
    if json_events:
        def emit(event: Dict[str, Any]) -> None:
            click.echo(json.dumps(event), err=True)
        return emit
    if quiet or not sys.stderr.isatty():
        return lambda event: None
    from ._progress import TerminalProgress
    return TerminalProgress()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nsdf-run")
@click.option("-v", "--verbose", count=True, help="Log what nsdf-run does (-vv: every command).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Run Docker/OCI images on HPC clusters with Apptainer, Charliecloud, Shifter,
    Podman or UDocker, whichever this machine offers."""
    ctx.ensure_object(dict)["quiet"] = quiet
    if verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO,
                            format="nsdf-run: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _run_options(fn: F) -> F:
    opts = [
        click.option("--runtime", "-r", metavar="NAME", help="Use this runtime (never falls back)."),
        click.option("--bind", "-B", "binds", multiple=True, metavar="SRC[:DST[:ro]]",
                     help="Make a host path visible in the container (repeatable)."),
        click.option("--env", "-e", "envs", multiple=True, metavar="NAME=VALUE",
                     help="Set a variable in the container (repeatable)."),
        click.option("--workdir", "-w", metavar="DIR", help="Working directory in the container."),
        click.option("--gpu", is_flag=True, help="Make the host's GPUs available."),
        click.option("--no-network", is_flag=True, help="Run without network access."),
        click.option("--writable-tmpfs", is_flag=True, help="A writable, temporary overlay."),
        click.option("--fakeroot", is_flag=True, help="Run as (fake) root in the container."),
        click.option("--no-bind-cwd", is_flag=True,
                     help="Do not bind the current directory or start in it."),
        click.option("--runtime-arg", "runtime_args", multiple=True, metavar="ARG",
                     help="Pass ARG to the runtime verbatim (repeatable; escape hatch)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _spec_options(binds: Sequence[str], envs: Sequence[str], workdir: Optional[str], gpu: bool,
                  no_network: bool, writable_tmpfs: bool, fakeroot: bool, no_bind_cwd: bool,
                  runtime_args: Sequence[str]) -> Dict[str, Any]:
    return dict(binds=list(binds), env=list(envs), workdir=workdir, gpu=gpu, network=not no_network,
                writable_tmpfs=writable_tmpfs, fakeroot=fakeroot, bind_cwd=not no_bind_cwd,
                extra_args=tuple(runtime_args))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_run_options
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
    from .errors import NsdfError
    try:
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            raise click.UsageError("missing COMMAND after IMAGE (nsdf-run run IMAGE -- CMD...)")
        client = _client(ctx)
        spec = client.spec(image, command, **_spec_options(**options))
        if dry_run:
            inv, native, rt = client.plan(spec, runtime)
            click.echo(f"# runtime: {rt.name} {rt.version or ''}  image: {native.location}"
                       + ("" if native.cached else "  (not cached yet: `nsdf-run pull` would create it)"))
            for k in sorted(inv.env):
                click.echo(f"export {k}={shlex.quote(inv.env[k])}")
            click.echo(shlex.join(inv.argv))
            return
        inv, native, rt = client.invocation(spec, runtime)
        _save_launch(ctx, client, spec, inv, native)
        result = client.execute(inv, native, rt, capture=False)
    except NsdfError as err:
        _error_exit(err, not_run=True)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(result.returncode)


def _save_launch(ctx: click.Context, client: "Client", spec: Any, inv: Any, native: Any) -> None:
    """Record this planned run so the next identical call can skip planning (_launch.py)."""
    args = ctx.ensure_object(dict).get("argv")
    if not args or args[0] != "run" or os.environ.get("NSDF_HPC_NO_FAST_PATH"):
        return
    from . import _launch
    checks, exists, expires = client.launch_checks(spec, inv, native)
    _launch.save(args, os.environ, os.getcwd(), inv, spec.env, client.settings.env_allow,
                 client.settings.env_deny, checks, expires, exists)


@cli.command()
@click.option("--runtime", "-r", metavar="NAME", help="Prepare for this runtime.")
@click.option("--json", "as_json", is_flag=True, help="JSON events on stderr, the result on stdout.")
@click.argument("image")
@click.pass_context
@cli_errors()
def pull(ctx: click.Context, image: str, runtime: Optional[str], as_json: bool) -> None:
    """Convert IMAGE to the runtime's native form and cache it by digest."""
    client = _client(ctx, json_events=as_json)
    native = client.pull(image, runtime)
    if as_json:
        click.echo(native.model_dump_json())
    else:
        state = "cached" if native.cached else "pulled"
        click.echo(f"{state}: {native.source} -> {native.runtime}: {native.location}"
                   + (f" ({native.digest})" if native.digest else ""))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--refresh", is_flag=True, help="Probe again instead of using the cache.")
@click.pass_context
@cli_errors()
def runtimes(ctx: click.Context, as_json: bool, refresh: bool) -> None:
    """Every runtime, found or not, which one would be chosen, and why."""
    from .errors import NsdfError
    client = _client(ctx)
    infos = client.detect(refresh=refresh)
    try:
        choice = client.choose()
        chosen, source, rejected, error = choice.name, choice.source, choice.rejected, None
    except NsdfError as err:
        chosen, source, rejected, error = None, None, {}, str(err)
    if as_json:
        click.echo(json.dumps({"chosen": chosen, "source": source, "error": error,
                               "runtimes": [json.loads(i.model_dump_json()) for i in infos],
                               "rejected": rejected}, indent=2))
        return
    for i in infos:
        mark = "*" if i.name == chosen else (" " if i.usable else "-")
        if i.found:
            caps = ", ".join(k for k, v in i.capabilities.items() if v) or "none"
            flav = f" ({i.flavour})" if i.flavour and i.flavour != i.name else ""
            click.echo(f"{mark} {i.name:<13} {i.version or '?':<10}{flav} {i.path}")
            click.echo(f"      {'usable' if i.usable else 'NOT USABLE'}; capabilities: {caps}")
        else:
            click.echo(f"{mark} {i.name:<13} not found")
        for n in i.notes:
            if i.found:
                click.echo(f"      note: {n}")
    click.echo("")
    if chosen:
        how = {"argument": "asked for", "auto": "first usable in NSDF's order"}.get(source or "", f"set by {source}")
        click.echo(f"chosen: {chosen} ({how})")
        for name, why in rejected.items():
            click.echo(f"  not {name}: {why}")
    else:
        click.echo(f"no runtime can be chosen: {error}")


@cli.command()
@click.pass_context
@cli_errors()
def doctor(ctx: click.Context) -> None:
    """Diagnose this machine and say how to fix what is wrong."""
    from .doctor import diagnose
    client = _client(ctx)
    findings = diagnose(client)
    worst = 0
    for f in findings:
        click.echo(f"[{f.level:>4}] {f.message}")
        if f.fix:
            click.echo(f"       fix: {f.fix}")
        worst = max(worst, {"ok": 0, "info": 0, "warn": 0, "FAIL": 1}[f.level])
    sys.exit(worst)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--verify", is_flag=True, help="Re-hash every artifact (slow).")
@click.pass_context
@cli_errors()
def images(ctx: click.Context, as_json: bool, verify: bool) -> None:
    """List cached images: digest, runtime, size, last use."""
    import time
    client = _client(ctx)
    rows = []
    for e in client.images():
        ok = client.cache.verify_full(e) if verify else client.cache.check(e)
        rows.append({"runtime": e.runtime, "digest": e.digest, "source": e.data.get("source"),
                     "location": e.location, "size": e.size(), "last_use": e.last_use(),
                     "tier": e.tier, "ok": ok})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no cached images in {client.cache.root}")
        return
    click.echo(f"{'RUNTIME':<13} {'DIGEST':<19} {'SIZE':>9}  {'LAST USE':<16} SOURCE")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_use"]))
        flag = "" if r["ok"] else "  [BROKEN]"
        click.echo(f"{r['runtime']:<13} {r['digest'][:19]:<19} {_human(r['size']):>9}  {when:<16} "
                   f"{r['source']}{' (site)' if r['tier'] == 'site' else ''}{flag}")


@cli.command()
@click.option("--older-than", metavar="AGE", help="Remove entries unused for AGE (30d, 12h, 90m).")
@click.option("--max-size", metavar="SIZE", help="Then shrink to SIZE (10G, 500M), least recently used first.")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.pass_context
@cli_errors()
def prune(ctx: click.Context, older_than: Optional[str], max_size: Optional[str], dry_run: bool) -> None:
    """Remove cached images safely while others may be using the cache."""
    from .errors import SpecError
    if not older_than and not max_size:
        raise SpecError("say what to prune: --older-than AGE and/or --max-size SIZE")
    client = _client(ctx)
    removed = client.prune(older_than=_parse_age(older_than) if older_than else None,
                           max_size=_parse_size(max_size) if max_size else None, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        click.echo(f"{verb} {e.runtime} {e.digest} ({_human(e.size())}) {e.data.get('source')}")
    click.echo(f"{verb} {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
               f"{_human(sum(e.size() for e in removed))}")


def _parse_age(text: str) -> float:
    from .errors import SpecError
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, IndexError):
        raise SpecError(f"invalid age {text!r}: use e.g. 30d, 12h, 90m") from None


def _parse_size(text: str) -> int:
    from .errors import SpecError
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().rstrip("B").rstrip("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise SpecError(f"invalid size {text!r}: use e.g. 10G, 500M") from None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


from .cli_slurm import register as _register_slurm  # noqa: E402
_register_slurm(cli)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of the ``nsdf-run`` console script and ``python -m nsdf_hpc``."""
    args = sys.argv[1:] if argv is None else list(argv)
    cli.main(args=args, prog_name="nsdf-run", obj={"argv": args})
