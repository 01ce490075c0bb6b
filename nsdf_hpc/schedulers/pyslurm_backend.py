"""pyslurm, used only when it imports AND was built for the cluster's Slurm major.minor.

pyslurm links against one Slurm release and breaks on every upgrade, so nsdf-hpc checks
``pyslurm.__version__`` (``"22.5.1"`` -> 22.05) against ``sinfo --version`` first; in every
other case the Slurm commands are used and ONE log line says why. Only the status query goes
through pyslurm (the part that matters at scale); submit, cancel and the exit-code fallback
are the commands' in both backends, so behaviour is the same.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Optional, Sequence, Tuple

from .._exec import CommandRunner
from ..config import SlurmSettings
from ..errors import ConfigError, NsdfError
from .slurm import Slurm
from .states import JobStatus, final_reason, slurm_state

logger = logging.getLogger(__name__)


def pyslurm_version(module: Any) -> Optional[Tuple[int, int]]:
    """``"22.5.1"`` / ``"24.11.0"`` -> ``(22, 5)`` / ``(24, 11)``."""
    text = str(getattr(module, "__version__", "") or getattr(module, "version", lambda: "")())
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def compatible(pyslurm_ver: Optional[Tuple[int, int]], slurm_ver: Tuple[int, int]) -> Tuple[bool, str]:
    """Whether pyslurm built for ``pyslurm_ver`` can talk to Slurm ``slurm_ver``, and why not."""
    if pyslurm_ver is None:
        return False, "pyslurm does not report a version"
    if pyslurm_ver != slurm_ver:
        return False, (f"pyslurm {pyslurm_ver[0]}.{pyslurm_ver[1]:02d} does not match Slurm "
                       f"{slurm_ver[0]}.{slurm_ver[1]:02d}")
    return True, "versions match"


class PyslurmSlurm(Slurm):
    """The command backend with the status query done in-process by pyslurm."""

    backend = "pyslurm"

    def __init__(self, module: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pyslurm = module

    def status(self, job_ids: Sequence[str]) -> Dict[str, JobStatus]:  # pragma: no cover - needs pyslurm
        if self.accounting == "none":
            return super().status(job_ids)
        try:
            db = self._pyslurm.db
            ids = [int(str(j).split("_")[0]) for j in job_ids]
            jobs = db.Jobs.load(db.JobFilter(ids=ids))
            out: Dict[str, JobStatus] = {}
            for job in jobs.values():
                key = str(job.id)
                if getattr(job, "array_id", None) and getattr(job, "array_task_id", None) is not None:
                    key = f"{job.array_id}_{job.array_task_id}"
                st = slurm_state(str(job.state), f"{job.exit_code or 0}:{job.exit_code_signal or 0}")
                out[key] = st.model_copy(update={"job_id": key, "name": job.name, "source": "pyslurm",
                                                 "reason": final_reason(st.state, job.state_reason) or st.reason})
            return out
        except Exception as err:  # noqa: BLE001 - any pyslurm failure: use the commands
            logger.warning("pyslurm status failed (%s); using sacct", err)
            return super().status(job_ids)


def select_backend(runner: Optional[CommandRunner] = None, settings: Optional[SlurmSettings] = None,
                   **overrides: Any) -> Slurm:
    """The configured backend (``backend`` in ``[slurm]`` / ``NSDF_HPC_SLURM_BACKEND``); with
    ``auto``, pyslurm when it imports and matches ``sinfo --version``, else the commands.
    slurmrestd (``rest``) is used only when configured.

    The reason is logged and kept on the backend as ``choice_reason``.
    """
    commands = Slurm(runner, settings, **overrides)
    wanted = commands.settings.backend
    where = commands.settings.source("backend")
    if wanted == "rest":
        from .rest import RestSlurm     # http.client only: imported when asked for
        rest = RestSlurm(runner, commands.settings, **overrides)
        rest.choice_reason = f"backend = rest (from {where})"
        logger.info("using slurmrestd at %s: %s", rest.url, rest.choice_reason)
        return rest
    if wanted == "commands":
        commands.choice_reason = f"backend = commands (from {where})"
        return commands
    try:
        import pyslurm
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken build (undefined symbol)
        if wanted == "pyslurm":
            raise ConfigError(f"backend = pyslurm (from {where}), but pyslurm cannot be imported "
                              f"({err}); no PyPI release builds against this Slurm, see README") from None
        logger.info("using the Slurm commands: pyslurm cannot be imported (%s)", err)
        commands.choice_reason = f"auto: pyslurm cannot be imported ({err})"
        return commands
    try:
        slurm_ver = commands.version()
    except NsdfError as err:
        if wanted == "pyslurm":
            raise ConfigError(f"backend = pyslurm (from {where}), but `sinfo --version` "
                              f"cannot be read ({err})") from None
        logger.info("using the Slurm commands: cannot read `sinfo --version` (%s)", err)
        commands.choice_reason = f"auto: cannot read `sinfo --version` ({err})"
        return commands
    ok, why = compatible(pyslurm_version(pyslurm), slurm_ver)
    if not ok:
        if wanted == "pyslurm":
            raise ConfigError(f"backend = pyslurm (from {where}), but {why}")
        logger.info("using the Slurm commands: %s", why)
        commands.choice_reason = f"auto: {why}"
        return commands
    logger.info("using pyslurm %s for status queries (%s)", getattr(pyslurm, "__version__", "?"), why)
    chosen = PyslurmSlurm(pyslurm, runner, commands.settings, env=overrides.get("env"))
    chosen.choice_reason = f"{'auto' if wanted == 'auto' else f'backend = pyslurm (from {where})'}: {why}"
    return chosen
