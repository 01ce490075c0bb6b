"""The Builder contract: pure argv builders and parsers, and everything in which one image
builder differs from the others; effects live in :mod:`nsdf_hpc.build` and the executor.

A builder knows its tool's vocabulary and which runtime's cache receives what it builds:

* ``version_argv`` / ``parse_version``: the probe and how to read it;
* ``assess``: given :class:`~nsdf_hpc.host.HostFacts`, can this user build here, and if not, why;
* ``build_plan``: the steps (argv lists) that turn a recipe into the runtime's native image,
  and where the result and its digest are.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Mapping, Optional, Tuple

from ..host import HostFacts
from ..runtimes.base import Assessment, RuntimeContext, Step, parse_first_version

#: a recipe a builder reads: a Dockerfile, or an Apptainer definition file
RecipeKind = str
DOCKERFILE: RecipeKind = "dockerfile"
DEFINITION: RecipeKind = "def"


@dataclass(frozen=True)
class BuildJob:
    """What to build: the recipe file (already rewritten for the site's mirrors), the build
    context, the tag, and whether FROM's registry is plain HTTP."""

    recipe: str            # absolute path of the Dockerfile or definition to use
    context: str           # absolute path of the build context directory (every step's cwd)
    tag: str               # nsdf/NAME:vX.Y.Z
    workdir: str           # absolute path of the private work directory in the cache
    insecure: bool = False

    def out(self, name: str) -> str:
        """``name`` in the work directory (steps run in the context directory)."""
        return f"{self.workdir}/{name}"


@dataclass(frozen=True)
class BuildPlan:
    """Steps run in the build context; they write into the private work directory on the
    cache filesystem. Then either ``artifact`` (relative to the work directory) is published
    and the sha256 of ``checksum`` (default: the artifact) is the digest, or the image id written
    to ``iidfile`` is the digest and the location in the runtime's store."""

    steps: Tuple[Step, ...]
    artifact: Optional[str] = None
    #: ``(built, artifact)``: rename ``built`` to ``artifact`` after the steps (ch-image storage)
    move: Optional[Tuple[str, str]] = None
    checksum: Optional[str] = None   # the file whose sha256 is the digest (default: artifact)
    iidfile: Optional[str] = None
    cleanup: Tuple[str, ...] = ()    # relative paths removed before publishing


class Builder(abc.ABC):
    """An image builder that needs no daemon: its vocabulary as pure functions."""

    name: ClassVar[str]
    executables: ClassVar[Tuple[str, ...]]
    priority: ClassVar[int]
    #: the runtime whose cache receives the built image (it runs it without a conversion)
    runtime: ClassVar[str]
    #: recipe kinds it reads, preferred first
    reads: ClassVar[Tuple[RecipeKind, ...]] = (DOCKERFILE,)

    def __init__(self, path: Optional[str] = None, version: Optional[str] = None,
                 ctx: Optional[RuntimeContext] = None,
                 capabilities: Optional[Mapping[str, bool]] = None) -> None:
        self.path = path or self.executables[0]
        self.version = version
        self.ctx = ctx or RuntimeContext.current()
        #: what :meth:`assess` found (e.g. ``fakeroot``), which the argv builders read
        self.capabilities: Dict[str, bool] = dict(capabilities or {})

    def version_argv(self, path: str) -> List[str]:
        return [path, "--version"]

    def parse_version(self, stdout: str, stderr: str = "") -> str:
        return parse_first_version(stdout or stderr, f"{self.name} --version", f"{self.name} version")

    @abc.abstractmethod
    def assess(self, host: HostFacts, full_caps: Optional[bool] = None) -> Assessment:
        """Can this user build with it here, and if not, why (pure). ``full_caps``: whether
        this process's capability bounding set has every capability the kernel knows (root
        in a container often lacks some); None when unknown."""

    @abc.abstractmethod
    def build_plan(self, job: BuildJob) -> BuildPlan:
        """The steps that build ``job`` into the runtime's native image (pure)."""

    #: whether :meth:`push_argv` can push what this builder built (from the runtime's store)
    pushes: ClassVar[bool] = False

    def push_argv(self, image: str, destination: str, *, authfile: Optional[str], insecure: bool,
                  digestfile: str) -> List[str]:
        """How to push ``image`` (its location in the runtime's cache) to ``destination``
        (``registry/repository:tag``). Credentials travel only in ``authfile`` (a path) or in
        :meth:`push_env`, never on the command line. ``digestfile`` is where the tool writes
        the pushed manifest's digest, if it can (else the registry is asked)."""
        raise NotImplementedError(f"{self.name} cannot push")

    def push_env(self, user: Optional[str], password: Optional[str]) -> Dict[str, str]:
        """Variables the push needs in its environment (credentials the tool reads there)."""
        return {}
