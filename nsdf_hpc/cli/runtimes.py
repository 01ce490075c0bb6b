"""``nsdf-run runtimes | doctor``: what this machine offers, which runtime would be chosen and
why, and how to fix what is wrong."""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, Optional

import click

from ._common import cli_errors, make_client


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--refresh", is_flag=True, help="Probe again instead of using the cache.")
@click.pass_context
@cli_errors()
def runtimes(ctx: click.Context, as_json: bool, refresh: bool) -> None:
    """Every runtime, found or not, which one would be chosen, and why."""
    from ..errors import NsdfError
    client = make_client(ctx)
    infos = client.detect(refresh=refresh)
    chosen: Optional[str]
    source: Optional[str]
    rejected: Dict[str, Any]
    error: Optional[str]
    try:
        choice = client.choose()
        chosen, source, rejected, error = choice.name, choice.source, choice.rejected, None
    except NsdfError as err:
        chosen, source, rejected, error = None, None, {}, str(err)
    text = _output(infos, chosen, source, rejected, error, as_json)
    click.echo(text, nl=False)
    if not refresh:
        # a later `nsdf-run runtimes` prints it while what it was made from holds
        made_from = client.detection_inputs()
        if made_from is not None:
            from .._runtimes_answer import remember_answer
            remember_answer(client.env, "--json" if as_json else "", text, made_from)


def _output(infos: Any, chosen: Optional[str], source: Optional[str], rejected: Dict[str, Any],
            error: Optional[str], as_json: bool) -> str:
    """The whole standard output of ``nsdf-run runtimes`` (``--json``)."""
    if as_json:
        return json.dumps({"chosen": chosen, "source": source, "error": error,
                           "runtimes": [json.loads(i.model_dump_json()) for i in infos],
                           "rejected": rejected}, indent=2) + "\n"
    lines = []
    for i in infos:
        mark = "*" if i.name == chosen else (" " if i.usable else "-")
        if i.found:
            caps = ", ".join(k for k, v in i.capabilities.items() if v) or "none"
            flav = f" ({i.flavour})" if i.flavour and i.flavour != i.name else ""
            lines.append(f"{mark} {i.name:<13} {i.version or '?':<10}{flav} {i.path}")
            lines.append(f"      {'usable' if i.usable else 'NOT USABLE'}; capabilities: {caps}")
        else:
            lines.append(f"{mark} {i.name:<13} not found")
        for n in i.notes:
            if i.found:
                lines.append(f"      note: {n}")
    lines.append("")
    if chosen:
        how = {"argument": "asked for", "auto": "first usable in NSDF's order"}.get(
            source or "", f"set by {source}")
        lines.append(f"chosen: {chosen} ({how})")
        for name, why in rejected.items():
            lines.append(f"  not {name}: {why}")
    else:
        lines.append(f"no runtime can be chosen: {error}")
    return "".join(line + "\n" for line in lines)


@click.command()
@click.pass_context
@cli_errors()
def doctor(ctx: click.Context) -> None:
    """Diagnose this machine and say how to fix what is wrong."""
    from ..doctor import diagnose
    client = make_client(ctx)
    findings = diagnose(client)
    worst = 0
    for f in findings:
        click.echo(f"[{f.level:>4}] {f.message}")
        if f.fix:
            click.echo(f"       fix: {f.fix}")
        worst = max(worst, {"ok": 0, "info": 0, "warn": 0, "FAIL": 1}[f.level])
    sys.exit(worst)
