"""nsdf_hpc: run Docker/OCI images on any HPC cluster, whatever runtime it offers.

>>> import nsdf_hpc
>>> result = nsdf_hpc.run("nsdf/image-name:v1.0.0", ["python3", "-V"])   # doctest: +SKIP
>>> result.returncode, result.stdout                                        # doctest: +SKIP

The public API is re-exported here and imported lazily, so ``nsdf-run --version`` stays fast.
"""
from __future__ import annotations

# not `from typing import TYPE_CHECKING`: importing typing alone costs more than the rest of
# `import nsdf_hpc` (issue 11: the import stays under 20 ms); type checkers treat this name
# as typing.TYPE_CHECKING
TYPE_CHECKING = False
if TYPE_CHECKING:
    # Type checkers see the real objects; at run time they are imported on first use (PEP 562,
    # below), so `nsdf-run --version` and the launch fast path import none of them.
    from typing import Any

    from .api import attach, build, detect, pull, run, submit, submit_array, wait_all
    from .client import Client
    from .config import Settings, load_settings
    from .executor import CallFuture, Executor
    from .errors import (CommandError, CommandTimeoutError, ConfigError, ImageError, NsdfError,
                         PreflightError, DiskFullError, PlatformError, RegistryError, RuntimeNotFoundError,
                         SchedulerError, SpecError, SubmitError, ToolNotFoundError, UnexpectedOutputError,
                         ExecutorError, InterpreterMismatchError, WorkerDiedError, RemoteError)
    from ._result import RunResult
    from .models import Bind, BuildResult, NativeImage, RunSpec, RuntimeChoice, RuntimeInfo
    from .reference import ImageRef, Platform, parse_reference
    from .schedulers import Job, JobSpec, JobState, JobStatus

from ._version import __version__

_EXPORTS = {
    "Client": "client", "detect": "api", "pull": "api", "run": "api", "build": "api",
    "BuildResult": "models",
    "Bind": "models", "RunSpec": "models", "RunResult": "_result", "RuntimeInfo": "models",
    "RuntimeChoice": "models", "NativeImage": "models", "ImageRef": "reference",
    "parse_reference": "reference", "Settings": "config", "load_settings": "config",
    "NsdfError": "errors", "ConfigError": "errors", "SpecError": "errors",
    "ToolNotFoundError": "errors", "RuntimeNotFoundError": "errors", "CommandError": "errors",
    "CommandTimeoutError": "errors", "ImageError": "errors", "RegistryError": "errors",
    "PreflightError": "errors", "DiskFullError": "errors", "PlatformError": "errors",
    "SchedulerError": "errors", "Platform": "reference",
    "SubmitError": "errors", "UnexpectedOutputError": "errors",
    "Executor": "executor", "CallFuture": "executor", "ExecutorError": "errors",
    "InterpreterMismatchError": "errors", "WorkerDiedError": "errors", "RemoteError": "errors",
    "submit": "api", "submit_array": "api", "attach": "api", "wait_all": "api",
    "Job": "schedulers", "JobSpec": "schedulers", "JobState": "schedulers", "JobStatus": "schedulers",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nsdf_hpc' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(__all__)
