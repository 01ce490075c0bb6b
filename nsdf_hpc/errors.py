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
    │   └── CommandTimeoutError   ... or ran past its timeout, or stalled (no I/O; .stalled)
    ├── ImageError                pull/convert/cache failed (wraps the CommandError)
    │   ├── RegistryError         registry unreachable, throttling or failing after the
    │   │                         retries, image missing, auth refused
    │   ├── PreflightError        not enough space, noexec temp dir, ... (names the variable)
    │   ├── DiskFullError         a filesystem filled during the pull/conversion (names the
    │   │                         variable: NSDF_HPC_CACHE, or the runtime's own directory)
    │   └── PlatformError         the image has no variant for the platform wanted (lists the
    │                             platforms it offers), or it cannot run on this host's
    ├── RunError                  the run cannot be set up here (a mount point, the cwd bind)
    ├── SchedulerError            sbatch/sacct/scancel failed or the job cannot be tracked
    │   └── SubmitError           .transient is True when a retry may succeed
    ├── ExecutorError             a function call in a container (nsdf_hpc.Executor) failed
    │   ├── InterpreterMismatchError  the image's Python cannot load what the host pickles (2)
    │   ├── WorkerDiedError       the container ended before the worker wrote a result
    │   │                         (.returncode .log_tail)
    │   ├── RemoteError           the call raised an exception that cannot be rebuilt here
    │   │                         (.type_name .remote_traceback)
    │   └── RemoteTraceback       the __cause__ of a re-raised remote exception: its traceback text
    └── UnexpectedOutputError     a parser could not read a tool's output (.tool .output)
"""
from __future__ import annotations

import shlex
from typing import Optional, Sequence

__all__ = [
    "NsdfError", "ConfigError", "SpecError", "ToolNotFoundError", "RuntimeNotFoundError", "BuilderNotFoundError",
    "CommandError", "CommandTimeoutError", "ImageError", "RegistryError", "PreflightError",
    "DiskFullError", "PlatformError",
    "RunError", "SchedulerError", "SubmitError", "UnexpectedOutputError",
    "ExecutorError", "InterpreterMismatchError", "WorkerDiedError", "RemoteError", "RemoteTraceback",
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

    def __init__(self, argv: Sequence[str], timeout: float, stdout: str = "", stderr: str = "",
                 stalled: bool = False) -> None:
        self.timeout = timeout
        #: True when it was stopped for making no progress (no I/O) for ``timeout`` s
        self.stalled = stalled
        CommandError.__init__(self, argv, -9, stdout, stderr)
        if stalled:
            tail = _tail(stderr or stdout, 5)
            self.args = (f"`{shlex.join(self.argv)}` made no progress (read and wrote nothing) for "
                         f"{timeout:g} s and was killed" + (f":\n{tail}" if tail else ""),)
        else:
            self.args = (f"`{shlex.join(self.argv)}` did not finish within {timeout:g} s and was killed",)

    def __str__(self) -> str:
        return str(self.args[0])


class ImageError(NsdfError):
    """An image could not be pulled, converted or cached."""


class RegistryError(ImageError):
    """A registry could not be reached, refused access, or does not have the image."""


class PreflightError(ImageError):
    """A check before a pull failed (free space, noexec temp dir); names what to set."""


class DiskFullError(ImageError):
    """A filesystem filled up during a pull or conversion (ENOSPC, EDQUOT); nothing was
    published and the private work directory is gone. ``path`` is the full directory and
    ``variable`` the setting that moves it (``NSDF_HPC_CACHE`` for the cache)."""

    def __init__(self, message: str, path: str = "", variable: str = "") -> None:
        self.path = path
        self.variable = variable
        super().__init__(message)


class PlatformError(ImageError):
    """The image offers no variant for the platform wanted (``offered`` lists the ones it
    has: ``("linux/arm64",)``), the runtime cannot prepare another platform's image, or a
    prepared image is for another platform than this host's, which has no emulator for it."""

    def __init__(self, message: str, wanted: str = "", offered: Sequence[str] = ()) -> None:
        self.wanted = wanted
        self.offered = tuple(offered)
        super().__init__(message)


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


class ExecutorError(NsdfError):
    """A function call in a container (:class:`nsdf_hpc.Executor`) could not be completed."""


class InterpreterMismatchError(ExecutorError, SpecError):
    """The image's Python differs from the host's in major.minor: what cloudpickle writes on
    the host cannot be loaded there. Raised before anything runs."""

    exit_code = 2


class WorkerDiedError(ExecutorError):
    """The container ended (killed, out of memory, a non-zero exit, a cancelled job) before the
    worker wrote the call's result."""

    def __init__(self, message: str, returncode: Optional[int] = None, log_tail: str = "") -> None:
        self.returncode = returncode
        self.log_tail = log_tail
        super().__init__(message + (f"\nlast lines of its output:\n{log_tail}" if log_tail.strip()
                                    else "\n(it wrote no output)"))


class RemoteError(ExecutorError):
    """The call raised an exception that cannot be rebuilt on the host (unpicklable, or its
    class is not importable here); its type name and the remote traceback are kept."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        self.type_name = type_name
        self.remote_traceback = remote_traceback
        super().__init__(f"{type_name}: {message}\n\nremote traceback:\n{remote_traceback}")


class RemoteTraceback(ExecutorError):
    """Attached as ``__cause__`` of an exception re-raised from a container: its traceback."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.text}\"\"\""


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
