"""Validated, frozen data: what to run, where, and what was found (no I/O)."""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import SpecError
from .paths import split_bind
from .reference import ImageSource, Platform

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def unencodable(value: str) -> bool:
    """Whether ``value`` cannot be passed to a process: a lone surrogate that is not one of
    the ``surrogateescape`` bytes a non-UTF-8 argv or path decodes to (``'\\ud800'``)."""
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        return True
    return False


class Model(BaseModel):
    """Base of every nsdf_hpc model: frozen, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class Bind(Model):
    """A host path made visible in the container: ``SRC:DST[:ro]``."""

    source: str
    target: str
    read_only: bool = False

    @field_validator("source", "target")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value or "\0" in value:
            raise ValueError("a bind path must be a non-empty string without NUL bytes")
        if not value.startswith("/"):
            raise ValueError(f"bind path {value!r} is not absolute")
        if unencodable(value):
            raise ValueError(f"bind path {value!r} is not valid text (a lone surrogate)")
        return os.path.normpath(value) if value != "/" else value

    @classmethod
    def parse(cls, text: str) -> "Bind":
        """Parse ``SRC``, ``SRC:DST``, ``SRC:DST:ro`` or ``SRC:DST:rw`` (SRC may be relative)."""
        if not text:
            raise SpecError("empty --bind value (expected SRC[:DST[:ro|rw]])")
        try:
            source, target, read_only = split_bind(text)
        except ValueError as err:
            raise SpecError(f"invalid --bind {text!r}: {err}") from None
        try:
            return cls(source=source, target=target, read_only=read_only)
        except ValueError as err:
            raise SpecError(f"invalid --bind {text!r}: {first_error(err)}") from None

    def __str__(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.read_only else "")


def parse_env(text: str) -> Tuple[str, str]:
    """Parse ``NAME=VALUE`` (the value may contain anything, '=' and newlines included)."""
    name, sep, value = text.partition("=")
    if not sep:
        raise SpecError(f"invalid --env {text!r}: expected NAME=VALUE")
    check_env_name(name)
    if "\0" in value:
        raise SpecError(f"invalid --env {name}: the value contains a NUL byte")
    return name, value


def check_env_name(name: str) -> str:
    if not _ENV_NAME.match(name):
        raise SpecError(f"invalid environment variable name {name!r}: "
                        "use letters, digits and '_', not starting with a digit")
    return name


class RunSpec(Model):
    """What to execute in a container; the same spec means the same result on every runtime.

    ``env`` holds explicit values; the host allowlist is added by the runtime layer, never
    the denylist. ``bind_cwd`` binds the current directory at the same path and makes it the
    working directory unless ``workdir`` says otherwise (Apptainer's habit, on every runtime).
    """

    image: str
    #: the parsed ``image`` (set by ``Client.spec``), so it is parsed once and then carried
    source: Optional[ImageSource] = Field(default=None, exclude=True)
    command: Tuple[str, ...]
    binds: Tuple[Bind, ...] = ()
    env: Dict[str, str] = Field(default_factory=dict)
    workdir: Optional[str] = None
    gpu: bool = False
    network: bool = True
    writable_tmpfs: bool = False
    fakeroot: bool = False
    bind_cwd: bool = True
    tty: bool = False                  # stdin and stdout are a terminal (podman then needs -t)
    cwd: Optional[str] = None          # the host directory for bind_cwd (default: os.getcwd())
    extra_args: Tuple[str, ...] = ()   # passed to the runtime verbatim, before the image
    #: the platform to prepare the image for ("linux/arm64"; None: this host's), for a job on
    #: nodes of another architecture than the submit host's
    platform: Optional[str] = None

    @field_validator("platform")
    @classmethod
    def _platform(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        try:
            return str(Platform.parse(value))
        except SpecError as err:
            raise ValueError(str(err)) from None

    @field_validator("command")
    @classmethod
    def _command(cls, value: Tuple[str, ...]) -> Tuple[str, ...]:
        if not value:
            raise ValueError("the command is empty")
        if any("\0" in a for a in value):
            raise ValueError("a command argument contains a NUL byte")
        if any(unencodable(a) for a in value):
            raise ValueError("a command argument is not valid text (a lone surrogate)")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: Mapping[str, str]) -> Dict[str, str]:
        for k, v in value.items():
            check_env_name(k)
            if "\0" in v:
                raise ValueError(f"environment value of {k} contains a NUL byte")
            if unencodable(v):
                raise ValueError(f"environment value of {k} is not valid text (a lone surrogate)")
        return dict(value)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"workdir {value!r} must be an absolute path in the container")
        if value is not None and ("\0" in value or unencodable(value)):
            raise ValueError(f"workdir {value!r} contains a NUL byte or a lone surrogate")
        return value


class RuntimeInfo(Model):
    """What a probe found out about one runtime on this host, for this user."""

    name: str
    found: bool = False
    usable: bool = False
    path: Optional[str] = None
    flavour: Optional[str] = None        # apptainer | singularityce | singularity | podman | podman-hpc ...
    version: Optional[str] = None
    capabilities: Dict[str, bool] = Field(default_factory=dict)
    notes: Tuple[str, ...] = ()          # why it is unusable, or what limits it
    priority: int = 100


class RuntimeChoice(Model):
    """The runtime that will be used, where that choice came from, and why others were not."""

    name: str
    source: str                          # argument | env:NSDF_HPC_RUNTIME | config:<path> | auto
    info: RuntimeInfo
    rejected: Dict[str, str] = Field(default_factory=dict)

    def explain(self) -> str:
        how = {"argument": "asked for explicitly", "auto": "first usable in NSDF's order"}.get(
            self.source, f"set by {self.source}")
        return f"{self.name} ({how})"


class NativeImage(Model):
    """An image in one runtime's native form: a file (SIF, SquashFS) or a name in its store."""

    runtime: str
    source: str                          # what the user asked for
    digest: Optional[str] = None         # manifest digest (sha256:...) when known
    location: str                        # absolute path, or a name in the runtime's store
    size: Optional[int] = None
    cached: bool = False                 # True when no conversion ran
    #: whether the image has /bin/sh (probed once when converted; None: not known), which
    #: lets every runtime report a missing or non-executable command as 127 / 126
    shell: Optional[bool] = None
    #: the image's platform ("linux/arm64") when known: recorded from the registry at the pull
    platform: Optional[str] = None
    #: for a read-only image file: which of the run's mount points it has (path -> "d" for a
    #: directory, "f" for anything else), as listed at planning time; None when not listed
    present: Optional[Dict[str, str]] = Field(default=None, exclude=True)


def first_error(err: Exception) -> str:
    """The first message of a pydantic ValidationError, in one line."""
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            e = errors()[0]
            loc = ".".join(str(x) for x in e.get("loc", ()))
            msg = str(e.get("msg"))
            # pydantic prefixes our validators' own messages with "Value error, ": noise here
            msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
            return f"{loc}: {msg}" if loc else msg
        except (IndexError, TypeError, KeyError):
            pass
    return str(err)


class BuilderInfo(Model):
    """What a probe found out about one image builder on this host, for this user."""

    name: str
    runtime: str                          # the runtime whose cache receives its images
    reads: Tuple[str, ...] = ("dockerfile",)
    found: bool = False
    usable: bool = False
    path: Optional[str] = None
    version: Optional[str] = None
    capabilities: Dict[str, bool] = Field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    priority: int = 100


class BuilderChoice(Model):
    """The builder that will be used, where that choice came from, and why others were not."""

    name: str
    source: str                           # argument | auto
    info: BuilderInfo
    rejected: Dict[str, str] = Field(default_factory=dict)

    def explain(self) -> str:
        how = "asked for with --builder" if self.source == "argument" else \
            f"first usable builder for the {self.info.runtime} runtime"
        return f"{self.name} ({how})"


class BuildResult(Model):
    """The outcome of ``build``: the tag, the digest, and the image in the runtime's cache."""

    tag: str                              # nsdf/NAME:vX.Y.Z
    builder: str
    runtime: str
    digest: Optional[str] = None          # sha256 of the SIF/SquashFS, or podman's image id
    image: Optional[NativeImage] = None
    recipe: str                           # the recipe file that was built (after conversion)
    definition: Optional[str] = None      # the Apptainer definition made from a Dockerfile (as built: FROM mirrored)
    argv: Tuple[Tuple[str, ...], ...] = ()
    dry_run: bool = False
    choice: Optional[BuilderChoice] = None   # the builder choice and why not the others


class PushResult(Model):
    """The outcome of ``push``: where the image went and the digest the registry gave it."""

    tag: str                              # nsdf/NAME:vX.Y.Z as built here
    destination: str                      # registry/repository:tag
    digest: Optional[str] = None          # the manifest digest in the registry
    runtime: str                          # the runtime whose built image was pushed
    credentials: str                      # where they came from (never their value)
