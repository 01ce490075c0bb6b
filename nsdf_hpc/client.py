"""The facade: settings, the runtime choice, the image service, the one run pipeline and the
Slurm submission, on one runner. It names no runtime: their differences live in their classes."""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set,
                    Tuple, Union)

from . import _launch
from ._exec import CommandRunner, SubprocessRunner, run_guarded, run_scratch
from .cache import Entry, ImageCache, rmtree
from .config import Settings, cache_dir, load_settings
from .environment import container_env, launcher_dirs
from .errors import NsdfError, PlatformError, RunError, SpecError
from .host import HostFacts, emulator, probe_host
from .images import ImageService
from ._result import RunResult
from .models import (Bind, NativeImage, RunSpec, RuntimeChoice, RuntimeInfo, first_error,
                     parse_env)
from .paths import user_state_dir
from .reference import ImageSource, Platform
from .runtimes import choose, detect_all, detection_inputs, runtime_class
from .runtimes.base import Invocation, Runtime, RuntimeContext, effective_binds, process_env

if TYPE_CHECKING:
    from .build import BuildService
    from .models import BuilderInfo, BuildResult, PushResult
    from .schedulers.job import Job
    from .schedulers.slurm import Slurm
    from .schedulers.submit import Prepared
    from .schedulers.spec import JobSpec

logger = logging.getLogger(__name__)

Progress = Callable[[Dict[str, Any]], None]


class Client:
    """Detect runtimes, prepare images and run containers with one configuration.

    Parameters
    ----------
    settings:
        Effective settings; default: :func:`nsdf_hpc.config.load_settings` from the files and
        ``NSDF_HPC_*`` variables.
    runner:
        The command executor (tests pass a fake); default: :class:`SubprocessRunner`.
    env:
        The host environment to work from; default: ``os.environ``.
    progress:
        Called with one dict per event (``{"event": "step", ...}``); the library never prints.
    """

    def __init__(self, settings: Optional[Settings] = None, runner: Optional[CommandRunner] = None,
                 env: Optional[Mapping[str, str]] = None, progress: Optional[Progress] = None,
                 **overrides: Any) -> None:
        self.env: Mapping[str, str] = dict(os.environ if env is None else env)
        self.settings = settings or load_settings(self.env, **overrides)
        self.runner: CommandRunner = runner or SubprocessRunner()
        self.progress = progress or (lambda event: None)
        self._infos: Optional[List[RuntimeInfo]] = None
        self._some: Dict[Tuple[str, ...], List[RuntimeInfo]] = {}   # detect(only=...)
        self._host: Optional[HostFacts] = None
        self._slurm: Optional["Slurm"] = None
        self.cache = ImageCache(str(cache_dir(self.settings, self.env)), self.settings.site_cache_dirs)
        self.images = ImageService(self.settings, self.env, self.runner, self.cache,
                                   lambda: self.host, self.progress)

    # ---------------------------------------------------------------- runtimes
    @property
    def host(self) -> HostFacts:
        if self._host is None:
            self._host = probe_host(self.env)
        return self._host

    def _detect_cache_file(self) -> Optional[str]:
        if not self.settings.detect_cache:
            return None
        # per user and host, not per image cache: it describes this machine's binaries
        return os.path.join(user_state_dir(self.env), f"detect-{os.uname().nodename}-{os.getuid()}.json")

    def detect(self, refresh: bool = False, only: Optional[Sequence[str]] = None) -> List[RuntimeInfo]:
        """Every known runtime (or those in ``only``), found or not, with version,
        capabilities and notes."""
        if only and self._infos is None:
            # kept for the client's life, as the full detection is (an Executor submitting
            # call after call asked again each time: half a millisecond of every submit)
            key = tuple(only)
            if refresh or key not in self._some:
                self._some[key] = detect_all(
                    self.runner, env=self.env, runtime_paths=self.settings.runtime_paths,
                    timeout=self.settings.probe_timeout, host=self.host, only=only,
                    cache_file=self._detect_cache_file(), refresh=refresh)
            return self._some[key]
        if self._infos is None or refresh:
            self._some.clear()
            self._infos = detect_all(self.runner, env=self.env, runtime_paths=self.settings.runtime_paths,
                                     timeout=self.settings.probe_timeout,
                                     cache_file=self._detect_cache_file(), host=self.host, refresh=refresh)
        return self._infos

    def detection_inputs(self) -> Optional[Dict[str, Any]]:
        """What :meth:`detect` of every runtime was made from, as plain data (the kept answer
        of ``nsdf-run runtimes``); None without a detection cache or when a runtime cannot
        say what its assessment reads."""
        cache_file = self._detect_cache_file()
        if cache_file is None:
            return None
        return detection_inputs(self.detect(), env=self.env, runtime_paths=self.settings.runtime_paths,
                                host=self.host, cache_file=cache_file)

    def choose(self, runtime: Optional[str] = None) -> RuntimeChoice:
        """The runtime to use and why; ``runtime`` is an explicit request (never a fallback).

        An explicit request probes only that runtime (a cold start costs one probe, not seven);
        the automatic choice probes all of them.
        """
        if runtime and self._infos is None:
            runtime_class(runtime)   # unknown name: ConfigError before any probe
            infos = self.detect(only=[runtime])
            if not any(i.usable for i in infos):   # the error lists everything that was found
                infos = self.detect()
        else:
            infos = self.detect()
        return choose(infos, explicit=runtime, configured=self.settings.runtime,
                      configured_source=self.settings.sources.get("runtime", "config"))

    def runtime(self, runtime: Union[None, str, RuntimeChoice] = None) -> Runtime:
        choice = runtime if isinstance(runtime, RuntimeChoice) else self.choose(runtime)
        cls = runtime_class(choice.name)
        return cls(choice.info.path, choice.info.flavour, choice.info.version,
                   RuntimeContext.current(self.env))

    # ---------------------------------------------------------------- run
    # ---------------------------------------------------------------- images (the service)
    def parse_image(self, image: str) -> ImageSource:
        return self.images.parse_image(image)

    def resolve(self, source: ImageSource, max_age: float = 0.0,
                platform: Union[None, str, Platform] = None) -> Tuple[str, Optional[int]]:
        """The digest (and, when read, compressed size) of the image ``source`` stands for on
        ``platform`` (default: this host's; for a multi-arch index, its entry's digest)."""
        return self.images.resolve(source, max_age, _platform(platform))

    def pull(self, image: Union[str, ImageSource], runtime: Union[None, str, Runtime] = None,
             *, max_age: float = 0.0, platform: Union[None, str, Platform] = None) -> NativeImage:
        """Make ``image`` available to ``runtime`` in its native form (cached by digest).

        ``platform`` ("linux/arm64"; default: this host's) prepares another architecture's
        image, for nodes of that architecture, on the runtimes that can
        (``Runtime.foreign_platforms``; the README's support table); an image that offers no variant for the
        platform is a PlatformError listing the platforms it has."""
        p = _platform(platform)   # bad input before any runtime probe
        rt = runtime if isinstance(runtime, Runtime) else self.runtime(runtime)
        return self.images.pull(image, rt, max_age=max_age, platform=p)

    def entries(self) -> List[Entry]:
        """The cache entries, site tiers first."""
        return self.images.entries()

    def prune(self, *, older_than: Optional[float] = None, max_size: Optional[int] = None,
              dry_run: bool = False, on_kept: Optional[Callable[[Entry, str], None]] = None) -> List[Entry]:
        """Remove entries unused for ``older_than`` seconds, then the least recently used
        until the cache holds at most ``max_size`` bytes; returns what was (or would be) removed.
        An entry that a run uses (a running container, a Slurm task) or that a queued or
        running Slurm job was submitted with is kept and passed to ``on_kept`` with the reason."""
        return self.images.prune(self._runtime_for, older_than=older_than, max_size=max_size,
                                 dry_run=dry_run, on_kept=on_kept, jobs_alive=self._jobs_alive)

    def _jobs_alive(self, job_ids: Sequence[str]) -> Optional[Set[str]]:
        """Which of these Slurm jobs (or any task of these arrays) are not finished: one
        status query; None when the scheduler cannot answer."""
        try:
            table = self.scheduler().status(job_ids)
        except NsdfError as err:
            logger.warning("cannot ask Slurm about jobs %s: %s", ",".join(job_ids), err)
            return None
        return {key.split("_")[0] for key, st in table.items()
                if key.split("_")[0] in job_ids and not st.state.final}

    def verify(self, entry: Entry, full: bool = False) -> bool:
        """Whether a cache entry is usable: its files (``full``: re-hashed) and, for a store
        runtime installed here, its image in the runtime's store."""
        return self.images.verify(entry, self._runtime_for, full)

    def remove(self, entry: Entry) -> bool:
        """Remove one cache entry (and its runtime's store image)."""
        return self.images.remove(entry, self._runtime_for)

    def _runtime_for(self, name: str) -> Optional[Runtime]:
        """The installed runtime ``name`` (to clean its store), or None."""
        try:
            cls = runtime_class(name)
        except NsdfError:
            return None
        info = next((i for i in self.detect() if i.name == name), None)
        if info is None or not info.found:
            return None
        return cls(info.path, info.flavour, info.version)

    # ---------------------------------------------------------------- builds
    def _builds(self) -> "BuildService":
        from .build import BuildService   # noqa: PLC0415 (a run never needs the builders)
        return BuildService(self.settings, self.env, self.runner, self.images, lambda: self.host,
                            self.progress)

    def detect_builders(self) -> List["BuilderInfo"]:
        """Every known image builder, found or not, with version and notes."""
        return self._builds().detect()

    def build(self, path: str, *, builder: Optional[str] = None, runtime: Optional[str] = None,
              tag: Optional[str] = None, dry_run: bool = False) -> "BuildResult":
        """Build the recipe at ``path`` (a directory or a Dockerfile/definition) without a
        daemon, tag it ``nsdf/NAME:vX.Y.Z`` and put it into the cache of the runtime that runs
        it, so that ``run`` finds it with no registry.

        ``builder`` forces one (an unusable one is an error listing what was found); otherwise
        the builder follows the runtime (``runtime``, else the configured one, else the first
        usable runtime in NSDF's order that has a usable builder). The result carries the
        builder choice and its reasons (``choice``).
        """
        from .build import read_recipe   # noqa: PLC0415
        builds = self._builds()
        recipe = read_recipe(path, tag)
        # an explicit --builder outranks a configured runtime, as an explicit --runtime would
        wanted = self.choose(runtime) if runtime or (self.settings.runtime and not builder) else None
        if builder:
            choice = builds.choose(recipe, builder=builder, runtime=wanted)
        else:
            usable = [i.name for i in sorted(self.detect(), key=lambda i: i.priority) if i.usable]
            choice = builds.choose(recipe, builder=None, runtime=wanted, runtime_order=usable)
        rchoice = wanted or self.choose(choice.info.runtime)
        return builds.build(self.runtime(rchoice), choice, recipe, dry_run=dry_run)

    def push(self, tag: str, *, to: Optional[str] = None) -> "PushResult":
        """Push the image built here as ``tag`` to its registry or to ``to`` (credentials from
        NSDF_HPC_REGISTRY_USER/_PASSWORD or the Docker/Podman auth files, never in argv)."""
        return self._builds().push(tag, to=to)

    # ---------------------------------------------------------------- the run pipeline
    def spec(self, image: str, command: Sequence[str], *, binds: Optional[Sequence[Union[str, Bind]]] = (),
             env: Union[None, Mapping[str, str], Sequence[str]] = None, **options: Any) -> RunSpec:
        """Build a validated :class:`RunSpec` (``binds`` and ``env`` also accept CLI strings).

        The image reference is parsed here, once (a malformed one is bad input even where no
        runtime is usable), and the parsed source travels with the spec.
        """
        source = self.parse_image(image)
        b = tuple(x if isinstance(x, Bind) else Bind.parse(x) for x in binds or ())
        if env is None:
            e: Dict[str, str] = {}
        elif isinstance(env, Mapping):
            e = dict(env)
        else:
            e = dict(parse_env(x) for x in env)
        options.setdefault("cwd", None)
        if options["cwd"] is None:
            options["cwd"] = os.getcwd()
        try:
            return RunSpec(image=image, source=source, command=tuple(command), binds=b, env=e, **options)
        except ValueError as err:
            raise SpecError(f"invalid run options: {first_error(err)}") from None

    def _source(self, spec: RunSpec) -> ImageSource:
        return spec.source or self.parse_image(spec.image)

    def invocation(self, spec: RunSpec, runtime: Union[None, str, Runtime] = None,
                   native: Optional[NativeImage] = None, *, env: Optional[Mapping[str, str]] = None
                   ) -> Tuple[Invocation, NativeImage, Runtime]:
        """The exact argv and environment ``run`` would use (pulls the image if needed).

        ``env`` is the host environment the container variables come from (default: the
        client's; a batch script passes the submit host's minus the job-time variables).
        """
        for b in spec.binds:    # before any pull: bad input costs nothing and leaves nothing
            if not os.path.exists(b.source):
                raise SpecError(f"bind source {b.source} does not exist")
        rt = runtime if isinstance(runtime, Runtime) else self.runtime(runtime)
        rt.check_binds(spec)
        native = native or self.images.pull(self._source(spec), rt, max_age=self.settings.tag_ttl,
                                            platform=_platform(spec.platform))
        listing = rt.listing_argv(native, [b.target for b in effective_binds(spec)[0]])
        if listing:
            res = self.runner.run(listing, check=False, env=process_env(self.env))
            if res.returncode == 0:
                native = native.model_copy(update={"present": rt.parse_listing(res.stdout)})
        return self._assemble(spec, rt, native, self.env if env is None else env), native, rt

    def _assemble(self, spec: RunSpec, rt: Runtime, native: NativeImage, host: Mapping[str, str]) -> Invocation:
        """The invocation of ``spec`` once its image is ready (pure: no process, no pull)."""
        if native.shell and spec.command:
            spec = spec.model_copy(update={"command": rt.wrap_command(spec.command, spec.env)})
        spec = with_launcher_binds(spec, host)
        cenv = container_env(host, spec.env, self.settings.env_allow, self.settings.env_deny)
        host_env = dict(host)
        host_env.update(rt.runtime_env(host, self.cache.root))
        return rt.run_invocation(spec, native, cenv, host_env)

    def env_template(self, args: Sequence[str], spec: RunSpec, rt: Runtime, native: NativeImage,
                     inv: Invocation) -> Optional[Tuple[Dict[str, str], Invocation]]:
        """How a launch record serves any values of the ``--env`` variables of ``args``: each
        value's mark (mark -> name) and ``inv`` planned again with the marks as values. None
        when the record must stay with these values: the command line's ``--env`` options
        are not exactly ``spec.env``, or a value goes anywhere but the container environment
        and whole ``NAME=VALUE`` words (Apptainer's ``--home VALUE``, UDocker's in-container
        ``export``, a path), or the plan again differs in anything but the marks."""
        options = _launch.env_options(args)
        if not options or {n: v for _, n, _, v in options} != dict(spec.env):
            return None
        marks = {f"NSDFVALUE{os.urandom(6).hex()}N{i}": name for i, name in enumerate(spec.env)}
        by_name = {name: mark for mark, name in marks.items()}
        try:
            again = self._assemble(spec, rt, native, self.env)
            probed = self._assemble(spec.model_copy(update={"env": by_name}), rt, native, self.env)
        except (RunError, SpecError):
            return None

        def back(word: str) -> str:
            for mark, name in marks.items():
                word = word.replace(mark, spec.env[name])
            return word
        words = [*probed.head, *probed.tail, *probed.command]
        for mark, name in marks.items():
            if any(mark in w and not w.endswith(f"{name}={mark}") for w in words):
                return None
        paths = [*probed.mkdirs, *probed.mkfiles, *(probed.tree or ()), *probed.static_env.values()]
        if again != inv or any(m in p for m in marks for p in paths):
            return None
        if (tuple(map(back, probed.head)) != inv.head or tuple(map(back, probed.tail)) != inv.tail
                or tuple(map(back, probed.command)) != inv.command
                or {k: back(v) for k, v in probed.explicit_env.items()} != inv.explicit_env
                or probed.static_env != inv.static_env or probed.encoding != inv.encoding):
            return None
        return marks, probed

    def binds_template(self, args: Sequence[str], spec: RunSpec, rt: Runtime, native: NativeImage,
                       inv: Invocation, *, targets: bool = True) -> Optional[Tuple[Dict[str, str], Invocation]]:
        """How a launch record serves other directories in the ``--bind`` options of ``args``:
        each path's mark (mark -> ``-B<i>:source`` / ``-B<i>:target``) and ``inv`` planned
        again with the marks as the binds (``spec`` and ``inv`` may carry ``env_template``'s
        marks already). Without ``targets``, only the sources have marks: the record then
        serves other directories at the same destinations (each option must name one), which
        is what a runtime that plans mount points from the destination can take (Charliecloud
        on a directory image that has them). None when the record must stay with these binds: the command line's
        binds are not exactly ``spec.binds``; a source is not a directory; a destination is
        the current directory (its automatic bind) or takes an MPI launcher's directory; the
        runtime lists the image for its mount points (a SquashFS file); or the plan again
        differs in anything but the marks, or has them anywhere but in argv words and the
        mount points to make (Charliecloud's private copy of a directory image, made only
        for a destination the image lacks, is such a difference)."""
        options = _launch.bind_options(args)
        try:
            parsed = tuple(Bind.parse(text) for _, _, text in options)
        except SpecError:
            return None
        if not options or parsed != spec.binds or any(
                not os.path.isdir(b.source) or b.target in ("/", spec.cwd) for b in spec.binds):
            return None
        if not targets and not all(text.count(":") for _, _, text in options):
            return None
        if with_launcher_binds(spec, self.env) is not spec or \
                rt.listing_argv(native, [b.target for b in spec.binds]) is not None:
            return None
        tag = os.urandom(6).hex()
        marks: Dict[str, str] = {}
        values: Dict[str, str] = {}
        probe: List[Bind] = []
        for i, b in enumerate(spec.binds):
            s, t = f"/NSDFBIND{tag}S{i}X", f"/NSDFBIND{tag}T{i}X" if targets else b.target
            marks[s], values[s] = f"-B{i}:source", b.source
            if targets:
                marks[t], values[t] = f"-B{i}:target", b.target
            probe.append(Bind(source=s, target=t, read_only=b.read_only))
        try:
            again = self._assemble(spec, rt, native, self.env)
            probed = self._assemble(spec.model_copy(update={"binds": tuple(probe)}), rt, native, self.env)
        except (RunError, SpecError):
            return None

        def back(word: str) -> str:
            for mark, value in values.items():
                word = word.replace(mark, value)
            return word
        elsewhere = [*probed.command, *probed.explicit_env.values(), *probed.static_env.values(),
                     *probed.mkfiles, *(probed.tree or ())]
        if again != inv or any(m in w for m in marks for w in elsewhere):
            return None
        if (tuple(map(back, probed.head)) != inv.head or tuple(map(back, probed.tail)) != inv.tail
                or tuple(map(back, probed.mkdirs)) != inv.mkdirs or probed.command != inv.command
                or probed.explicit_env != inv.explicit_env or probed.static_env != inv.static_env
                or probed.encoding != inv.encoding or probed.mkfiles != inv.mkfiles or probed.tree != inv.tree):
            return None
        return marks, probed

    def bind_template(self, spec: RunSpec, rt: Runtime, native: NativeImage, inv: Invocation, *,
                      env: Mapping[str, str], probe: str) -> Optional[Tuple[Tuple[str, ...], Tuple[str, ...]]]:
        """How ``rt`` takes one more directory bind at job time (a batch script binds each
        rank's PMIx server directory): the runtime words to add before the image and the
        mount points to create, with ``probe`` standing for the path. Found by building the
        invocation of ``inv`` again with a ``probe:probe`` bind (no process is started); None
        when the runtime takes it as more than added words (a SquashFS image with no such
        mount point, a directory image that would need a private copy only for it)."""
        if native.shell and spec.command:
            spec = spec.model_copy(update={"command": rt.wrap_command(spec.command, spec.env)})
        host_env = dict(env)
        host_env.update(rt.runtime_env(env, self.cache.root))
        probed = spec.model_copy(update={"binds": spec.binds + (Bind(source=probe, target=probe),)})
        try:
            base = rt.run_invocation(spec, native, inv.container_env, host_env)
            new = rt.run_invocation(probed, native, inv.container_env, host_env)
        except (RunError, SpecError):
            return None
        if base.argv != inv.argv or new.tail != base.tail or new.tree != base.tree:
            return None
        added = len(new.head) - len(base.head)
        for i in range(len(base.head) + 1):
            if new.head[:i] == base.head[:i] and new.head[i + added:] == base.head[i:]:
                words = new.head[i:i + added]
                if added > 0 and any(probe in w for w in words):
                    mkdirs = tuple(d for d in new.mkdirs if probe in d and d not in base.mkdirs)
                    return tuple(words), mkdirs
        return None

    def plan(self, spec: RunSpec, runtime: Union[None, str, Runtime] = None, *,
             env: Optional[Mapping[str, str]] = None) -> Tuple[Invocation, NativeImage, Runtime]:
        """Like :meth:`invocation` but never converts: a cache miss gives the location the
        image *will* have (for ``--dry-run``)."""
        rt = runtime if isinstance(runtime, Runtime) else self.runtime(runtime)
        native = self.images.preview(self._source(spec), rt, _platform(spec.platform))
        return self.invocation(spec, rt, native, env=env)

    def run(self, image: str, command: Sequence[str], *, runtime: Optional[str] = None,
            capture: bool = True, record: Optional[Sequence[str]] = None,
            spec: Optional[RunSpec] = None, **options: Any) -> RunResult:
        """Run ``command`` in ``image``; returns its exit code (and output when captured).

        The one run pipeline (the CLI uses it too): spec -> plan -> optional launch record ->
        execute. ``record`` is the ``nsdf-run`` argument list a launch record is keyed by
        (``_launch.py``); the library's own callers leave it out. With ``capture=False`` the
        runtime gets this process's terminal or pipes, and SIGTERM/SIGINT/SIGHUP sent to this
        process are passed on to it and waited for (``_exec.py``).

        A non-zero exit of the command is data, not an error; errors are raised only when
        nothing could run (no runtime, bad input, image unavailable).
        """
        spec = spec or self.spec(image, command, **options)
        inv, native, rt = self.invocation(spec, runtime)
        self.check_runs_here(native)
        if record is not None:
            self.save_launch(record, spec, inv, native, rt)
        return self.execute(inv, native, rt, capture=capture)

    def execute(self, inv: Invocation, native: NativeImage, rt: Runtime, *, capture: bool = True) -> RunResult:
        """Run a planned invocation (mount points first); the exit code is data (a command
        killed by signal N gives 128+N)."""
        self.check_runs_here(native)
        self.prepare(inv, rt)
        with self.using(native, rt), run_scratch() as (name, scratch):
            # a runtime whose container can outlive its process (podman) names each run's
            # container, so that a signal passed on too early still ends the container
            guard = rt.orphan_guard(name, scratch)
            argv = inv.with_options(guard.options).argv if guard else inv.argv
            res = run_guarded(self.runner, argv, env=inv.env, capture=capture,
                              remove=guard.remove if guard else (), created=guard.created if guard else None,
                              hold=rt.startup_names, started=guard.started if guard else None,
                              blocked=inv.blocked_signals)
        return RunResult(returncode=res.returncode, stdout=res.stdout, stderr=res.stderr,
                         argv=argv, runtime=rt.name, image=native)

    def check_runs_here(self, native: NativeImage) -> None:
        """A PlatformError when ``native`` is another platform's image (prepared with
        ``platform=`` for nodes of that architecture) and this host has no emulator for it
        (binfmt_misc): the runtimes would fail with "exec format error" or worse, run a
        shell that exits 1 or 126."""
        if self.images.is_host(native.platform):
            return
        assert native.platform is not None
        arch = Platform.parse(native.platform).architecture
        found = emulator(arch)
        if found:
            logger.info("%s is a %s image: it runs here through the emulator %s", native.source,
                        native.platform, found)
            return
        raise PlatformError(f"{native.source} was prepared for {native.platform}, and this host is "
                            f"{self.images.platform} with no emulator for it (binfmt_misc): run it on "
                            f"a node of that architecture (a Slurm partition of {arch} nodes: "
                            f"nsdf-run submit --platform {native.platform} ...)",
                            wanted=str(self.images.platform), offered=(native.platform,))

    @contextlib.contextmanager
    def using(self, native: NativeImage, rt: Runtime) -> Iterator[None]:
        """Hold the cache entry's use lock while its container runs, so that a prune keeps it
        (``ImageCache.use_path``); raises RunError when a prune removed it meanwhile."""
        if not native.digest:
            yield
            return
        entry = self.cache.entry_dir(native.runtime, native.digest)
        had = os.path.isdir(entry)
        fd = self.cache.hold_use(native.runtime, native.digest)
        try:
            if had and not os.path.isdir(entry):
                raise RunError(f"{rt.name}: the image {native.source} was removed from the cache "
                               "(nsdf-run prune) just as this run started: run it again")
            yield
        finally:
            if fd is not None:
                os.close(fd)

    def prepare(self, inv: Invocation, rt: Runtime) -> None:
        """Make what the invocation needs on the host first: the private copy of a directory
        image (``inv.tree``) and the mount points; raises RunError (nothing ran)."""
        if inv.tree and not os.path.isdir(inv.tree[1]):
            image, copy = inv.tree
            tmp = f"{copy}.tmp-{os.getpid()}"
            try:
                self.runner.run(["cp", "-a", "-l", image, tmp], check=True, env=process_env(self.env))
                os.rename(tmp, copy)
            except (NsdfError, OSError) as err:
                rmtree(tmp)
                if not os.path.isdir(copy):   # else a concurrent run made it first
                    why = getattr(err, "strerror", None) or str(err).splitlines()[-1]
                    raise RunError(f"{rt.name}: the image has no mount point for a bind, and its "
                                   f"private copy {copy} cannot be made: {why}; bind onto a "
                                   "directory that exists in the image, or use --no-bind-cwd") from None
        for path, is_dir in [*((d, True) for d in inv.mkdirs), *((f, False) for f in inv.mkfiles)]:
            try:
                os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
                if not is_dir and not os.path.exists(path):
                    with open(path, "a"):
                        pass
            except OSError as err:
                raise RunError(f"{rt.name}: cannot create the mount point {path}: {err.strerror}; "
                               "bind onto a path that exists in the image") from None

    def save_launch(self, args: Sequence[str], spec: RunSpec, inv: Invocation, native: NativeImage,
                    rt: Runtime) -> None:
        """Record a planned ``nsdf-run run`` (or ``nsdf_hpc.run()``: ``_launch.api_args``) so
        the next identical call skips planning."""
        if not args or args[0] != "run" or self.env.get("NSDF_HPC_NO_FAST_PATH"):
            return
        checks, exists, expires = self.launch_checks(spec, inv, native, rt)
        # the user's command ends the runtime argv as given (after the /bin/sh start, if any):
        # then the record serves any command after the same arguments (``_launch._record_args``)
        n, tail = len(spec.command), [*inv.tail, *inv.command]
        at = len(tail) - n if n and tuple(tail[len(tail) - n:]) == tuple(spec.command) else None
        template = self.env_template(args, spec, rt, native, inv)
        # and other directories in the --bind options, over the --env marks when there are any
        marked = spec.model_copy(update={"env": {n: m for m, n in template[0].items()}}) if template else spec
        base = template[1] if template else inv
        binds = self.binds_template(args, marked, rt, native, base) or \
            self.binds_template(args, marked, rt, native, base, targets=False)
        if binds:
            template = ({**(template[0] if template else {}), **binds[0]}, binds[1])
        _launch.save(args, self.env, spec.cwd or os.getcwd(), inv, self.settings.env_allow,
                     self.settings.env_deny, checks, expires, exists,
                     guard=rt.orphan_guard(_launch.GUARD_NAME, _launch.GUARD_PATH), hold=rt.startup_names,
                     command_at=at, use=(self.cache.use_path(native.runtime, native.digest),
                                         self.cache.entry_dir(native.runtime, native.digest))
                     if native.digest else None,
                     marks=template[0] if template else None, template=template[1] if template else None,
                     runtime=rt.name, native={**dict(native), "cached": True})   # a record's run converts nothing

    def launch_checks(self, spec: RunSpec, inv: Invocation, native: NativeImage, rt: Runtime
                      ) -> Tuple[List[str], List[str], float]:
        """What a launch record relies on: files whose identity must not change, paths that
        must exist, and until when a tag's digest may be reused."""
        checks = [inv.argv[0]]
        exists: List[str] = []
        expires = time.time() + 30 * 86400
        source = self._source(spec)
        if source.kind == "native":
            checks.append(native.location)
            return checks, exists, expires
        if source.kind != "registry" and source.path:
            checks.append(source.path)
        if native.digest:
            for tier in [*self.cache.site_tiers, self.cache.root]:
                d = self.cache.entry_dir(native.runtime, native.digest, tier)
                if native.location.startswith(d + "/") or os.path.isfile(os.path.join(d, "entry.json")):
                    checks.append(os.path.join(d, "entry.json"))
                    break
        store = rt.store_path(native.location, rt.runtime_env(self.env, self.cache.root))
        if inv.tree:
            exists.append(inv.tree[1])
        if os.path.isfile(native.location):
            checks.append(native.location)
        elif os.path.isabs(native.location):
            exists.append(native.location)
        elif store is not None:
            exists.append(store)
        if source.kind == "registry" and source.ref is not None and not source.ref.digest:
            # a `pull` that moves the tag rewrites this file (a new inode): the record is stale
            ref_file = self.cache.ref_path(source.ref.slug())
            checks.append(ref_file)
            known = self.cache.known_ref(source.ref.slug())
            resolved = float(known.get("resolved") or 0) if known else 0.0
            expires = resolved + self.settings.tag_ttl
        return checks, exists, expires

    # ---------------------------------------------------------------- Slurm
    def job_spec(self, image: str, command: Optional[Sequence[str]] = None, **options: Any) -> "JobSpec":
        """A validated :class:`~nsdf_hpc.schedulers.JobSpec` (run options + sbatch resources)."""
        from .schedulers import submit as slurm_submit   # noqa: PLC0415 (a run needs no Slurm)
        return slurm_submit.job_spec(self, image, command, **options)

    def scheduler(self, **overrides: Any) -> "Slurm":
        """The Slurm backend (pyslurm when it matches the cluster, else the commands); cached."""
        from .schedulers import submit as slurm_submit   # noqa: PLC0415 (a run needs no Slurm)
        return slurm_submit.scheduler(self, **overrides)

    def submit(self, image: str, command: Optional[Sequence[str]] = None, *,
               runtime: Optional[str] = None, **options: Any) -> Union["Job", "Prepared"]:
        """Submit ``command`` in ``image`` to Slurm; returns a :class:`~nsdf_hpc.schedulers.Job`
        (with ``dry_run=True``, the prepared script). See :func:`nsdf_hpc.schedulers.submit.submit`."""
        from .schedulers import submit as slurm_submit   # noqa: PLC0415 (a run needs no Slurm)
        return slurm_submit.submit(self, image, command, runtime=runtime, **options)

    def submit_array(self, image: str, commands: Optional[Sequence[Sequence[str]]] = None,
                     **options: Any) -> Union["Job", "Prepared"]:
        """An array job: one command per task, or ``template`` with ``{index}``."""
        from .schedulers import submit as slurm_submit   # noqa: PLC0415 (a run needs no Slurm)
        return slurm_submit.submit_array(self, image, commands, **options)


def with_launcher_binds(spec: RunSpec, env: Mapping[str, str]) -> RunSpec:
    """``spec`` with the MPI launcher's directories of this rank (``srun --mpi=pmix``: Slurm's
    PMIx server directory) bound at their own paths, unless a bind already covers them."""
    covered = [b.target.rstrip("/") + "/" for b in spec.binds]
    extra = tuple(Bind(source=d, target=d) for d in launcher_dirs(env)
                  if os.path.isdir(d) and not any((d + "/").startswith(c) for c in covered))
    if not extra:
        return spec
    logger.debug("binding the MPI launcher's directories: %s", ", ".join(b.source for b in extra))
    return spec.model_copy(update={"binds": spec.binds + extra})


def _platform(value: Union[None, str, Platform]) -> Optional[Platform]:
    """A platform from the API's ``platform=`` (text or :class:`Platform`)."""
    return Platform.parse(value) if isinstance(value, str) else value
