"""The one exception tree of nsdf_hpc.

Every error the library raises is defined here; the CLI turns each into a clean
message and an exit code (``exit_code``). A container's own non-zero exit status is
*not* an error: ``run`` returns it as data.

::

    NsdfError                     base; .exit_code for the CLI (1)
    ├── ConfigError               bad config file, env value, unknown runtime name (2)
    ├── SpecError                 invalid image reference, bind, env, job spec (2)
    ├── ToolNotFoundError         an executable is missing (runtime binary, sbatch, ...)
    │   ├── RuntimeNotFoundError  no usable runtime, or the requested one is unusable
    │   └── BuilderNotFoundError  no usable image builder, or the requested one is unusable
    ├── CommandError              an external tool exited non-zero (.argv .returncode .stderr)
    │   └── CommandTimeoutError   ... or ran past its timeout
    ├── ImageError                pull/convert/cache failed (wraps the CommandError)
    │   ├── RegistryError         registry unreachable, image missing, auth refused
    │   └── PreflightError        not enough space, noexec temp dir, ... (names the variable)
    ├── RunError                  the run cannot be set up here (a mount point, the cwd bind)
    ├── SchedulerError            sbatch/sacct/scancel failed or the job cannot be tracked
    │   └── SubmitError           .transient is True when a retry may succeed
    └── UnexpectedOutputError     a parser could not read a tool's output (.tool .output)
"""
from __future__ import annotations

import shlex
from typing import Optional, Sequence

__all__ = [
    "NsdfError", "ConfigError", "SpecError", "ToolNotFoundError", "RuntimeNotFoundError", "BuilderNotFoundError",
    "CommandError", "CommandTimeoutError", "ImageError", "RegistryError", "PreflightError",
    "RunError", "SchedulerError", "SubmitError", "UnexpectedOutputError",
]


class NsdfError(Exception):
    """Base of every error nsdf_hpc raises."""

    exit_code = 1


class ConfigError(NsdfError):
    """A config file, an environment variable or a runtime name is invalid."""

    exit_code = 2


class SpecError(NsdfError, ValueError):
    """User input is invalid (image reference, bind, env, resources); retrying fails again."""

    exit_code = 2


class ToolNotFoundError(NsdfError):
    """An executable is not installed or not on PATH."""

    def __init__(self, tool: str, hint: str = "") -> None:
        self.tool = tool
        super().__init__(f"`{tool}` not found on PATH" + (f": {hint}" if hint else ""))


class RuntimeNotFoundError(ToolNotFoundError):
    """No usable container runtime, or the one asked for cannot be used here."""

    def __init__(self, message: str) -> None:  # noqa: D107 - message is built by the caller
        self.tool = ""
        NsdfError.__init__(self, message)


class BuilderNotFoundError(RuntimeNotFoundError):
    """No usable image builder, or the one asked for (``--builder``) cannot be used here."""


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class CommandError(NsdfError):
    """An external tool exited with a non-zero status."""

    def __init__(self, argv: Sequence[str], returncode: int, stdout: str = "", stderr: str = "") -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = _tail(stderr or stdout) or "(no output)"
        super().__init__(f"`{shlex.join(self.argv)}` exited with status {returncode}:\n{tail}")


class CommandTimeoutError(CommandError):
    """An external tool ran past its timeout and was killed."""

    def __init__(self, argv: Sequence[str], timeout: float, stdout: str = "", stderr: str = "") -> None:
        self.timeout = timeout
        CommandError.__init__(self, argv, -9, stdout, stderr)
        self.args = (f"`{shlex.join(self.argv)}` did not finish within {timeout:g} s and was killed",)

    def __str__(self) -> str:
        return str(self.args[0])


class ImageError(NsdfError):
    """An image could not be pulled, converted or cached."""


class RegistryError(ImageError):
    """A registry could not be reached, refused access, or does not have the image."""


class PreflightError(ImageError):
    """A check before a pull failed (free space, noexec temp dir); names what to set."""


class RunError(NsdfError):
    """A run cannot be set up on this runtime (a bind it cannot express, a mount point it
    cannot create); nothing ran, so the CLI exits 125."""


class SchedulerError(NsdfError):
    """A scheduler command failed or a job could not be tracked."""


class SubmitError(SchedulerError):
    """A job could not be submitted; ``transient`` tells whether a retry may succeed."""

    def __init__(self, message: str, transient: bool = False) -> None:
        self.transient = transient
        super().__init__(message)


class UnexpectedOutputError(NsdfError):
    """A tool printed something its parser could not read."""

    def __init__(self, tool: str, output: str, expected: str = "", note: Optional[str] = None) -> None:
        self.tool = tool
        self.output = output
        shown = _tail(output, 5) or "(empty)"
        msg = f"could not read the output of `{tool}`"
        if expected:
            msg += f" (expected {expected})"
        msg += f":\n{shown}"
        if note:
            msg += f"\n{note}"
        super().__init__(msg)
