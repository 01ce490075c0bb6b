"""The read-only fast path of ``nsdf-run status JOBID...``: the same one ``sacct`` call as the
click command, through the same executor (``_exec.SubprocessRunner``), parsed and printed by
the same code (:mod:`._slurm_text`), without importing click, pydantic and the settings and
status models (about 0.25 s of imports on a login node for a query that takes slurmdbd about
0.1 s).

It answers only the plain case, and leaves everything else to the click command, which also
reports every error:

* bare job ids (``N``: no array task ``N_M``, no option such as ``--json``);
* the Slurm settings the click command validated and remembered (``status`` writes them with
  ``_listing.remember_valid``: the config files' text, the ``NSDF_HPC_*`` variables and
  ``HOME`` unchanged; a relative ``work_dir`` only in the same directory), with the command
  backend (``backend = commands``, or ``auto`` where no ``pyslurm`` module can be found) and
  accounting other than ``none``;
* a sacct answer with exactly one line per job: no array task lines, no line slurmdbd has not
  completed yet, no OOM kill (its exit-code file holds the status), and no job nsdf-hpc
  submitted as an array or as several ``sbatch`` calls (its ``by-id`` provenance).

Anything else (sacct missing, failing, timing out, saying accounting is disabled or not
listing a job yet) goes to the click command, which asks again: a second sacct call only then.
"""
from __future__ import annotations

import json
import os
# not `from typing import ...` at run time: this module is on the start-up path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Mapping, Optional, Sequence

from ._listing import remember_valid, validated
from ._slurm_text import ACCOUNTING_DISABLED, is_partial, sacct_fields, status_argv, status_row

#: the stamp's name (``_listing.STAMP_FILES``)
STAMP = "slurm"


def remember_slurm(env: Mapping[str, str], work_dir: str, accounting: str, backend: str,
                   chosen: str, command_timeout: float, follows_cwd: bool) -> None:
    """Called by the click command with the Slurm settings it validated (``backend``: the
    setting) and the backend it chose: only the command backend is remembered."""
    if chosen != "commands" or backend not in ("auto", "commands"):
        return
    try:
        cwd = os.getcwd() if follows_cwd else None
    except OSError:         # the directory was removed meanwhile: nothing to remember
        return
    remember_valid(env, STAMP, {"work_dir": work_dir, "accounting": accounting, "backend": backend,
                                "command_timeout": command_timeout, "cwd": cwd})


def _settings(env: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    """The remembered settings when they still hold here, else None."""
    data = validated(env, STAMP)
    if data is None or data.get("accounting") not in ("auto", "sacct"):
        return None
    if not isinstance(data.get("work_dir"), str) or not isinstance(data.get("command_timeout"), (int, float)):
        return None
    if data.get("cwd") is not None and data["cwd"] != os.getcwd():
        return None
    if data.get("backend") != "commands":
        # auto: pyslurm is tried first where it imports (pyslurm_backend.select_backend)
        import importlib.util   # noqa: PLC0415
        if importlib.util.find_spec("pyslurm") is not None:
            return None
    return data


def _plain_job(work_dir: str, job_id: str) -> bool:
    """Whether the click command would show ``job_id`` as one plain job: not one that
    nsdf-hpc submitted as an array or split over several sbatch calls (``Slurm.attach``)."""
    link = os.path.join(work_dir, "by-id", job_id)
    if not os.path.islink(link):
        return True
    try:
        with open(os.path.join(os.path.realpath(link), "provenance.json")) as fh:
            prov = json.load(fh)
    except (OSError, ValueError):
        return True                 # no provenance: a job like any other
    if not isinstance(prov, dict):
        return True
    known = tuple(prov.get("job_ids") or ())
    return not prov.get("array") and (job_id not in known or known == (job_id,))


def status_rows(job_ids: Sequence[str], stdout: str) -> Optional[List[str]]:
    """The rows of ``nsdf-run status`` from sacct's answer, or None when the click command
    would look further (a job missing, array tasks, a partial line, an OOM kill)."""
    fields = sacct_fields(stdout)
    rows: List[str] = []
    for j in job_ids:
        mine = [k for k in fields if k.split("_", 1)[0] == j]
        if mine != [j]:
            return None
        st = fields[j]
        if is_partial(st["source"], st["native_state"], st["exit_code"], st["signal"]) or (
                st["native_state"].startswith("OUT_OF_MEMORY") and not st["exit_code"]):
            return None
        rows.append(status_row(j, st["state"], st["native_state"], st["exit_code"], st["signal"],
                               st["reason"], True))
    return rows


def fast_status(args: Sequence[str], env: Mapping[str, str],
                interrupted: Sequence[int] = ()) -> Optional[str]:
    """The whole output of ``nsdf-run status N [N...]`` when the plain case holds, else None
    (the click command answers)."""
    ids = list(args[1:])
    if len(args) < 2 or args[0] != "status" or not all(i.isascii() and i.isdigit() for i in ids):
        return None
    try:
        conf = _settings(env)
        if conf is None or not all(_plain_job(conf["work_dir"], j) for j in ids):
            return None
        if interrupted:             # a Ctrl-C that Python passed over (``_entry``): start nothing
            raise KeyboardInterrupt
        from ._exec import SubprocessRunner   # noqa: PLC0415 (the one place that starts processes)
        res = SubprocessRunner().run(status_argv(list(dict.fromkeys(ids))), check=False,
                                     timeout=conf["command_timeout"],
                                     env={k: v for k, v in env.items() if not k.startswith("SBATCH_")})
        out = res.stdout
        if res.returncode != 0 or ACCOUNTING_DISABLED.lower() in (res.stderr + out).lower():
            return None
        rows = status_rows(ids, out)
    except Exception:   # noqa: BLE001 - the click command answers instead, and says what is wrong
        return None
    return None if rows is None else "".join(r + "\n" for r in rows)
