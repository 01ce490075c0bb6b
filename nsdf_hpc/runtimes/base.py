"""The Runtime contract: pure argv builders and parsers, and every way in which one runtime
differs from the others; effects live in the image service and the executor.

A runtime class knows its tool's vocabulary and nothing else:

* ``version_argv`` / ``parse_version``: the probe and how to read it (flavour + version);
* ``assess``: given the version and :class:`~nsdf_hpc.host.HostFacts`, can this user run it,
  with which capabilities, and if not, why;
* ``image_plan``: the steps (argv lists) that turn an image source into the native form;
* ``run_invocation``: the argv and process environment that run a :class:`RunSpec`.

All of these are pure, so they are tested from recorded contracts for runtimes that cannot
be installed here (Shifter, SingularityCE, podman-hpc).
"""
from __future__ import annotations

import abc
import csv
import io
import os
from dataclasses import dataclass, field, replace
import shutil
import sys
from typing import Callable, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import RunError, SpecError, UnexpectedOutputError
from ..host import HostFacts
from ..models import Bind, NativeImage, RunSpec
from ..reference import ImageRef, ImageSource, Platform

from ..environment import PROCESS_ENV_KEEP, EnvEncoding

#: placeholder in a Step's env values, replaced by the absolute private work directory
WORKDIR = "{workdir}"
#: placeholder in a Step's ``expect``: the previous step's output
PREVIOUS = "{previous}"
#: placeholder in a Step's argv and ``expect``: the store name that the plan's import step
#: (``Step.names_import``) printed, read by ``Runtime.parse_import_output``
IMPORTED = "{imported}"


@dataclass(frozen=True)
class Step:
    """One external command of an image plan."""

    argv: Tuple[str, ...]
    description: str
    env: Mapping[str, Optional[str]] = field(default_factory=dict)   # overrides; None deletes
    timeout: Optional[float] = None
    check: bool = True
    #: text the step's output must contain, for tools that exit 0 although they failed
    #: (podman-hpc's migrate): without it the step failed. ``PREVIOUS`` stands for the
    #: previous step's output (stripped)
    expect: Optional[str] = None
    #: the step pulls from a registry: a failure is tried again with backoff and jitter
    #: (``registry_attempts``/``registry_backoff``), in an emptied work directory, unless a
    #: filesystem is full
    retry: bool = False
    #: the step talks to a registry (``retry`` implies it): its error names the registry, and
    #: it is stopped when its processes do no I/O for ``pull_stall_timeout`` s
    registry: bool = False
    #: the start of an output line that means the step failed although the tool exited 0
    #: (udocker 1.3.17's create prints "Error: while extracting image layer" on a full disk)
    fail_if: Optional[str] = None
    #: this step's output names the imported image (``Runtime.parse_import_output``): later
    #: steps may use ``IMPORTED``, and a plan located at ``"@stdout"`` is located there
    #: (without such a step: the last step's output)
    names_import: bool = False


@dataclass(frozen=True)
class ImagePlan:
    """How to build one cache entry: steps run in ``workdir`` (a private temp dir), then
    ``artifact`` (relative to the workdir) is published, or ``location`` names the result in
    the runtime's own store."""

    steps: Tuple[Step, ...]
    artifact: Optional[str] = None
    location: Optional[str] = None
    pre_extract: Optional[str] = None   # "rootfs": nsdf_hpc unpacks the offline source first
    checksum: Optional[str] = None      # the file whose sha256 guards the entry (default: artifact)
    #: steps that undo what the plan may have left in the runtime's own store when a step
    #: fails (run best effort, in order; a failure of theirs is logged, never raised)
    undo: Tuple[Step, ...] = ()


@dataclass(frozen=True)
class Invocation:
    """The exact process to start for a run, kept in parts so that a launch record and a
    Slurm batch script can re-encode another container environment the same way:
    ``argv = head + encoding.argv_words(container_env) + tail + command``."""

    head: Tuple[str, ...]             # the runtime and its options, before the env words
    tail: Tuple[str, ...]             # after the env words, before the command (the image, "--")
    command: Tuple[str, ...]          # what runs in the container (as the runtime needs it)
    static_env: Dict[str, str]        # the runtime process's own variables (not the container's)
    encoding: EnvEncoding
    container_env: Dict[str, str] = field(default_factory=dict)
    #: the part of ``container_env`` that does not come from the host (``--env`` values and
    #: what the runtime adds itself); the rest is rebuilt from each task's own environment
    explicit_env: Dict[str, str] = field(default_factory=dict)
    mkdirs: Tuple[str, ...] = ()      # directories to create first (mount points)
    mkfiles: Tuple[str, ...] = ()     # empty files to create first (mount points of file binds)
    #: ``(image, copy)``: run from ``copy``, a private hard-link copy of the directory image
    #: made on first use, so that mount points never change the cached image itself
    tree: Optional[Tuple[str, str]] = None
    #: signals (names: "SIGINT") the runtime's process starts with blocked, because it takes
    #: them itself (sigwaitinfo): one that comes while it starts then waits for it instead of
    #: reaching it before it is ready (the udocker relay, a Python script, lost a SIGINT while
    #: its interpreter started)
    blocked_signals: Tuple[str, ...] = ()

    @property
    def argv(self) -> Tuple[str, ...]:
        return (*self.head, *self.encoding.argv_words(self.container_env), *self.tail, *self.command)

    @property
    def env(self) -> Dict[str, str]:
        return self.encoding.process_env(self.static_env, self.container_env)

    def with_options(self, options: Sequence[str]) -> "Invocation":
        """The same invocation with ``options`` added after the runtime's own (a run's name)."""
        return replace(self, head=(*self.head, *options))


@dataclass(frozen=True)
class OrphanGuard:
    """Options that name one run's container, the argv that removes that container if it
    outlived the runtime's process (printing what it removed, nothing when nothing was left),
    a file the runtime writes once the container exists (None: cannot tell), and a file it
    writes with the container's process ID (``started``; None: none). With ``started``, a
    signal is held while that file is empty or its process still runs under one of the
    runtime's ``startup_names`` (the OCI runtime's own, before the command starts)."""

    options: Tuple[str, ...]
    remove: Tuple[str, ...]
    created: Optional[str] = None
    started: Optional[str] = None


@dataclass(frozen=True)
class RuntimeContext:
    """The host facts a runtime's builders read, passed in (tests pass their own)."""

    uid: int
    gid: int
    user: str
    which: Callable[[str], Optional[str]] = shutil.which
    #: the Python that runs nsdf_hpc's own helper scripts (udocker's signal relay); None
    #: when there is none to name (recorded contracts, an embedded interpreter)
    python: Optional[str] = None
    #: whether a path exists (``os.path.lexists``); a builder may look into a store runtime's
    #: unpacked image with it (udocker: is there a /bin/sh), tests pass their own
    exists: Callable[[str], bool] = os.path.lexists

    @classmethod
    def current(cls, env: Optional[Mapping[str, str]] = None) -> "RuntimeContext":
        env = os.environ if env is None else env
        return cls(os.getuid(), os.getgid(), env.get("USER") or env.get("LOGNAME") or _user_name(),
                   python=sys.executable or None)

    @property
    def is_root(self) -> bool:
        return self.uid == 0


def _user_name() -> str:
    try:
        import pwd   # noqa: PLC0415  (only when $USER is unset)
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, ImportError):
        return str(os.getuid())


@dataclass(frozen=True)
class Assessment:
    usable: bool
    capabilities: Dict[str, bool]
    notes: Tuple[str, ...] = ()


class Runtime(abc.ABC):
    """A container runtime: its vocabulary as pure functions, and everything in which it
    differs from the others (so that no caller branches on a runtime's name)."""

    name: ClassVar[str]
    executables: ClassVar[Tuple[str, ...]]
    priority: ClassVar[int]
    #: "file" runtimes run an artifact from the cache (SIF, SquashFS, dir); "store" runtimes
    #: run a name from their own image store (podman, udocker, shifter).
    storage: ClassVar[str] = "file"
    #: native artifacts it runs as they are (file suffixes, "dir" for a directory)
    native_kinds: ClassVar[Tuple[str, ...]] = ()
    #: False when the version probe's exit status says nothing (udocker exits 1 after printing)
    probe_status_matters: ClassVar[bool] = True
    #: characters this runtime's bind syntax cannot carry in a path (``SRC:DST`` splits at ':')
    bind_unsafe: ClassVar[str] = ""
    #: the names the runtime's own processes run under while it sets a container up, when a
    #: signal that reaches it then can be lost: the executor holds a signal until a process of
    #: another name (the command) exists in its tree (``_exec._forward_signals``), or, for a
    #: runtime whose container is not its child (``OrphanGuard.started``), until the
    #: container's process runs under another name
    startup_names: ClassVar[Tuple[str, ...]] = ()

    def __init__(self, path: Optional[str] = None, flavour: Optional[str] = None,
                 version: Optional[str] = None, ctx: Optional[RuntimeContext] = None) -> None:
        self.path = path or self.executables[0]
        self.flavour = flavour or self.name
        self.version = version
        self.ctx = ctx or RuntimeContext.current()

    # ---------------------------------------------------------------- probe
    @classmethod
    def preferred_candidates(cls) -> List[str]:
        """Executables probed before PATH's (e.g. the one installed with this interpreter)."""
        return []

    def version_argv(self, path: str) -> List[str]:
        return [path, "--version"]

    def probe_env(self, env: Mapping[str, str]) -> Dict[str, str]:
        """The environment for the version probe."""
        return process_env(env)

    @abc.abstractmethod
    def parse_version(self, stdout: str, stderr: str = "") -> Tuple[str, str]:
        """``(flavour, version)`` from the probe output; raises UnexpectedOutputError."""

    @abc.abstractmethod
    def assess(self, host: HostFacts, version: str, flavour: str) -> Assessment:
        """Can this user use it here, and with which capabilities (from ``host``, the version,
        and what :meth:`assessment_inputs` names)."""

    def assessment_inputs(self) -> Optional[Tuple[Sequence[str], Sequence[str]]]:
        """The files and environment variables :meth:`assess` reads besides the host's facts
        and the probe: a kept ``nsdf-run runtimes`` answer holds while they are unchanged
        (``_runtimes_answer.py``). None: it cannot say (the answer is never kept)."""
        return (), ()

    # ---------------------------------------------------------------- images
    def runtime_env(self, env: Mapping[str, str], cache_root: str) -> Dict[str, str]:
        """Variables every call of this runtime gets (its caches pointed at ours)."""
        return {}

    def preflight(self, cache_root: str, mount_options: Sequence[str]) -> Optional[str]:
        """Why the cache at ``cache_root`` (mounted with ``mount_options``) cannot hold this
        runtime's images, or None."""
        return None

    #: whether this runtime's pull can prepare an image for another platform than the host's
    #: (an arm64 image on an x86_64 login node, for an arm64 partition): ``image_plan`` then
    #: gets ``platform``. Running such an image needs a host of that architecture (or an
    #: emulator registered in binfmt_misc) whatever the runtime.
    foreign_platforms: ClassVar[bool] = False

    @abc.abstractmethod
    def image_plan(self, source: ImageSource, ref: Optional[ImageRef], key: str,
                   insecure: bool = False, platform: Optional[Platform] = None) -> ImagePlan:
        """Steps that make the native image; ``ref`` is the digest-pinned, mirrored reference
        (for an image index: pinned to the manifest of the platform wanted). ``platform`` is
        set only when that is not the host's (and only where ``foreign_platforms``)."""

    def login_env(self, user: str, password: str, authfile: str) -> Dict[str, str]:
        """Variables that give this runtime's pull the registry credentials (pure): always the
        process environment, never argv, which every user can read in /proc/PID/cmdline.
        ``authfile`` is a private containers-auth.json nsdf-hpc has written for the pull's
        registry. Empty: this runtime's pulls cannot log in through nsdf-hpc."""
        return {}

    def parse_import_output(self, stdout: str) -> str:
        """The store name an import printed (plans whose location is ``"@stdout"``)."""
        lines = [ln.strip() for ln in stdout.strip().splitlines() if ln.strip()]
        if not lines:
            raise UnexpectedOutputError(f"{self.name} import", stdout, expected="the image id")
        return lines[-1]

    def store_path(self, location: str, runtime_env: Mapping[str, str]) -> Optional[str]:
        """The directory that a store runtime keeps for an entry outside the cache (it must
        exist for the entry to be usable, and its size counts), or None."""
        return None

    def partial_downloads(self, runtime_env: Mapping[str, str]) -> List[str]:
        """Files a killed pull of this runtime may leave in its own layer cache (partial
        blobs under a temporary name); the image service removes the ones nothing wrote to
        lately after it stopped a stalled pull. Default: none."""
        return []

    def remove_argv(self, location: str) -> Optional[List[str]]:
        """How to remove an entry's image from the runtime's own store (None: nothing to do)."""
        return None

    def claim_plan(self, location: str, owner: str) -> Optional[ImagePlan]:
        """Steps that give the store image at ``location`` a name only one cache entry uses
        (``owner`` is unique to the entry); the plan's ``location`` is that name.

        A store that several caches share (podman's per-user store) then holds one name per
        entry, and ``remove_argv`` removes only this entry's name: the store deletes the image
        with its last name, never while another cache still names it. None (the default):
        the entry owns what it runs.
        """
        return None

    def holds_argv(self, location: str) -> Optional[List[str]]:
        """How to ask the runtime's store whether it still holds an entry's image: exit 0 yes,
        exit 1 no, anything else cannot tell (None: nothing to ask; see ``store_path``).
        ``parse_holds`` reads the answer."""
        return None

    def parse_holds(self, returncode: int, stdout: str) -> Optional[bool]:
        """What ``holds_argv``'s result says: True (held), False (gone) or None (cannot tell,
        the entry is kept and the run reports the runtime's own error)."""
        return {0: True, 1: False}.get(returncode)

    def store_image_problem(self, location: str, env: Mapping[str, str]
                            ) -> Optional[Tuple[str, Optional[ImagePlan]]]:
        """What is wrong with the files that the runtime's store keeps for an image a plan made
        (read from the store, never by starting a process), with a plan that makes them again
        (None: cannot be repaired here); None when nothing is known to be wrong. ``env`` is
        the runtime's process environment. Default: nothing to read."""
        return None

    def store_holds(self, location: str, env: Mapping[str, str]) -> Optional[bool]:
        """Whether the store holds an entry's image, read from the store's files without
        starting a process; None: ask ``holds_argv``. Default: None."""
        return None

    def store_has_shell(self, location: str, env: Mapping[str, str]) -> Optional[bool]:
        """Whether the image a plan made has ``/bin/sh``, read from the store's files when its
        root filesystem is a host directory; None (the default): start the image once to find
        out (``ImageManager``'s shell probe)."""
        return None

    def store_size_argv(self, location: str) -> Optional[List[str]]:
        """How to ask the runtime's store for the bytes an entry's image takes there (read by
        ``parse_store_size``); None: the cache entry's own files are the whole size."""
        return None

    def parse_store_size(self, stdout: str) -> int:
        """The size printed by ``store_size_argv`` (a byte count alone on its line)."""
        text = stdout.strip()
        if not text.isdigit():
            raise UnexpectedOutputError(f"{self.name} image size", stdout, expected="a byte count")
        return int(text)

    def orphan_guard(self, name: str, scratch: str) -> Optional[OrphanGuard]:
        """How a run's container can outlive the runtime's own process, and how to remove it.

        Where the runtime's process is the container's only parent (Apptainer, ch-run, udocker)
        nothing can be left behind: None (the default). Podman's container belongs to conmon,
        and a signal that reaches the podman client before it proxies signals (while it
        creates and starts the container) ends the client but not the container. The guard
        names the container (``name`` is unique to the run; ``scratch`` is a path of its own
        in a private directory), so that the executor (``_exec.run_guarded``) can remove it
        after a signal and tell whether the run ended by that signal.
        """
        return None

    # ---------------------------------------------------------------- run
    def listing_argv(self, native: NativeImage, paths: Sequence[str]) -> Optional[List[str]]:
        """How to list which of ``paths`` a read-only image file has, when the runtime can
        bind only onto existing paths (None: nothing to list)."""
        return None

    def parse_listing(self, stdout: str) -> Dict[str, str]:
        """``{path: "d" | "f"}`` from the output of :meth:`listing_argv`."""
        return {}

    def check_binds(self, spec: RunSpec) -> None:
        """Refuse binds this runtime cannot express: one the user gave is bad input
        (SpecError); the automatic bind of the current directory means nothing can run here
        as asked (RunError, exit 125), with the way out named."""
        unsafe = [c for c in self.bind_unsafe if c in (spec.cwd or "")]
        if spec.bind_cwd and unsafe and not any(b.target == spec.cwd for b in spec.binds):
            raise RunError(f"{self.name} cannot bind the current directory {spec.cwd!r} "
                           f"({unsafe[0]!r} in the path); use --no-bind-cwd, or run from another "
                           "directory")
        require_paths(spec.binds, self.name, self.bind_unsafe)

    #: the in-container start of every command when the image has /bin/sh: the shell's own
    #: exec reports a missing command as 127 and a non-executable one as 126 with its name, as
    #: POSIX says, where each runtime has its own code (apptainer 255, ch-run 1, udocker 2,
    #: podman under --init 1); exec keeps signals and the exit status the command's. SHLVL and
    #: PWD, which the shell would add, are removed again.
    exec_script: ClassVar[str] = 'unset SHLVL PWD; exec "$@"'

    def wrap_command(self, command: Sequence[str], explicit_env: Mapping[str, str]) -> Tuple[str, ...]:
        """``command`` started through the image's /bin/sh (see :attr:`exec_script`)."""
        script = self.exec_script
        keep = [v for v in ("SHLVL", "PWD") if v in explicit_env]
        if keep:   # a value the user set explicitly stays
            names = [v for v in ("SHLVL", "PWD") if v not in keep]
            script = script.replace("unset SHLVL PWD", f"unset {' '.join(names)}" if names else ":")
        return ("/bin/sh", "-c", script, "sh", *command)

    @abc.abstractmethod
    def run_invocation(self, spec: RunSpec, native: NativeImage, container_env: Mapping[str, str],
                       host_env: Mapping[str, str]) -> Invocation:
        """The argv and process environment that run ``spec`` (pure)."""


def process_env(env: Mapping[str, str], extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The minimal host environment a runtime process needs (the container gets its own)."""
    out = {k: env[k] for k in PROCESS_ENV_KEEP if k in env}
    out.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if extra:
        out.update(extra)
    return out


def effective_binds(spec: RunSpec) -> Tuple[List[Bind], Optional[str]]:
    """The binds to make and the working directory, with the current-directory default
    (``spec.cwd``: the caller fills in the host's working directory)."""
    binds = list(spec.binds)
    workdir = spec.workdir
    if spec.bind_cwd:
        cwd = spec.cwd or "/"
        if not any(b.target == cwd for b in binds):
            binds.append(Bind(source=cwd, target=cwd))
        workdir = workdir or cwd
    return binds, workdir


def parse_first_version(text: str, tool: str, prefix: str = "") -> str:
    """The first token after ``prefix`` on the first non-empty line (``"podman version 4.3.1"``)."""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if prefix and line.lower().startswith(prefix):
            rest = line[len(prefix):].strip().split()
            if rest:
                return rest[0]
        elif not prefix:
            return line.split()[0]
    raise UnexpectedOutputError(tool, text, expected=f"'{prefix} X.Y.Z'" if prefix else "a version")


def csv_field(text: str) -> str:
    """Quote one field for CSV-style option values (``--mount type=bind,"src=a,b"``)."""
    if any(c in text for c in ',"\n\r'):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="").writerow([text])
        return buf.getvalue()
    return text


def version_tuple(version: Optional[str]) -> Tuple[int, ...]:
    parts: List[int] = []
    for piece in (version or "").replace("-", ".").split("."):
        if piece.isdigit():
            parts.append(int(piece))
        else:
            # leading digits only: "1+ds2" (Ubuntu's 4.1.1+ds2) is 1, not 12
            digits = ""
            for c in piece:
                if not c.isdigit():
                    break
                digits += c
            if digits:
                parts.append(int(digits))
            break
    return tuple(parts)


def require_paths(binds: Sequence[Bind], runtime: str, forbidden: str = "") -> None:
    for b in binds:
        for p in (b.source, b.target):
            bad = [c for c in forbidden if c in p]
            if bad:
                raise SpecError(f"{runtime} cannot bind a path containing {bad[0]!r}: {p!r}")
