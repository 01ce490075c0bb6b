"""The facade: settings, runtime choice, image preparation and runs, on one runner."""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._exec import CommandRunner, SubprocessRunner
from .cache import Entry, ImageCache
from .config import Settings, cache_dir, load_settings
from .environment import container_env
from .errors import (CommandError, ImageError, NsdfError, PreflightError, SpecError,
                     ToolNotFoundError)
from .host import HostFacts, free_bytes, mount_options, probe_host
from .paths import user_state_dir
from .models import Bind, NativeImage, RunResult, RunSpec, RuntimeChoice, RuntimeInfo, parse_env
from .reference import ImageRef, ImageSource, parse_source
from .runtimes import choose, detect_all, runtime_class
from .runtimes.base import WORKDIR, ImagePlan, Invocation, Runtime

logger = logging.getLogger(__name__)

Progress = Callable[[Dict[str, Any]], None]
_NATIVE_OK = {
    "apptainer": (".sif", ".simg", ".sqfs", ".squashfs", "dir"),
    "singularity": (".sif", ".simg", ".sqfs", ".squashfs", "dir"),
    "charliecloud": (".sqfs", ".squashfs", ".squash", "dir"),
}


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
        self._registries: Dict[Tuple[str, bool], Any] = {}
        self._host: Optional[HostFacts] = None
        self.cache = ImageCache(str(cache_dir(self.settings, self.env)), self.settings.site_cache_dirs)

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
            return detect_all(self.runner, env=self.env, runtime_paths=self.settings.runtime_paths,
                              timeout=self.settings.probe_timeout, host=self.host, only=only,
                              cache_file=self._detect_cache_file())
        if self._infos is None or refresh:
            self._infos = detect_all(self.runner, env=self.env, runtime_paths=self.settings.runtime_paths,
                                     timeout=self.settings.probe_timeout,
                                     cache_file=self._detect_cache_file(), host=self.host, refresh=refresh)
        return self._infos

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
        return cls(choice.info.path, choice.info.flavour, choice.info.version)

    # ---------------------------------------------------------------- images
    def parse_image(self, image: str) -> ImageSource:
        return parse_source(image, nsdf_registry=self.settings.nsdf_registry)

    def _pull_ref(self, ref: ImageRef) -> Tuple[ImageRef, bool]:
        registry = self.settings.mirrors.get(ref.registry, ref.registry)
        pull_ref = ref.on(registry) if registry != ref.registry else ref
        return pull_ref, registry in self.settings.insecure_registries

    def _registry(self, registry: str, insecure: bool) -> Any:
        """One registry client per registry, so a token is fetched once per session."""
        from .registry import RegistryClient
        key = (registry, insecure)
        if key not in self._registries:
            self._registries[key] = RegistryClient(registry, insecure=insecure, env=self.env)
        return self._registries[key]

    def _offline_allocation(self) -> bool:
        return self.host.in_slurm_allocation and not self.settings.pull_on_compute

    def resolve(self, source: ImageSource, max_age: float = 0.0) -> Tuple[str, Optional[int]]:
        """The digest (and, when read, compressed size) that ``source`` stands for.

        ``max_age`` > 0 accepts a tag's digest resolved at most that many seconds ago without
        asking the registry (``run`` uses the ``tag_ttl`` setting; ``pull`` always asks).
        """
        if source.kind == "native":
            raise SpecError("a native image has no digest")
        if source.kind != "registry":
            if not source.path or not os.path.exists(source.path):
                raise ImageError(f"{source.text}: no such file or directory")
            from .unpack import source_digest
            return source_digest(source), None
        assert source.ref is not None
        if source.ref.digest:
            return source.ref.digest, None
        slug = source.ref.slug()
        if max_age > 0:
            known = self.cache.known_ref(slug)
            if known and time.time() - float(known.get("resolved") or 0) <= max_age:
                return str(known["digest"]), known.get("size")
        if self._offline_allocation():
            known = self.cache.known_ref(slug)
            if known:
                return str(known["digest"]), known.get("size")
            raise ImageError(f"{source.ref} has not been prepared for this job: inside a Slurm "
                             "allocation nsdf-run never contacts a registry. Run `nsdf-run pull "
                             f"{source.text}` on a login node first (or set pull_on_compute = true)")
        pull_ref, insecure = self._pull_ref(source.ref)
        self.progress({"event": "resolve", "image": str(source.ref), "registry": pull_ref.registry})
        info = self._registry(pull_ref.registry, insecure).manifest(pull_ref)
        self.cache.remember_ref(slug, info.digest, info.size)
        return info.digest, info.size

    def pull(self, image: Union[str, ImageSource], runtime: Union[None, str, Runtime] = None,
             *, max_age: float = 0.0) -> NativeImage:
        """Make ``image`` available to ``runtime`` in its native form (cached by digest).

        A tag is resolved to its digest at the registry (one manifest request) unless it was
        resolved less than ``max_age`` seconds ago; a digest reference never needs the network.
        """
        rt = runtime if isinstance(runtime, Runtime) else self.runtime(runtime)
        source = image if isinstance(image, ImageSource) else self.parse_image(image)
        if source.kind == "native":
            return self._native(source, rt)
        digest, size = self.resolve(source, max_age)
        verify = self._verifier(rt)
        entry = self.cache.lookup(rt.name, digest, verify=verify)
        if entry is not None:
            return self._native_from_entry(entry, source)
        if self._offline_allocation():
            raise ImageError(f"{source.text} ({digest}) is not in the {rt.name} cache "
                             f"{self.cache.root}: inside a Slurm allocation nsdf-run does not pull. "
                             f"Run `nsdf-run pull --runtime {rt.name} {source.text}` on a login node")
        if size is None and source.kind == "registry" and source.ref is not None:
            size = self._image_size(source.ref, digest)
        self.cache.ensure_dirs()
        started = time.monotonic()
        with self.cache.locked(rt.name, digest, on_wait=lambda owner: self.progress(
                {"event": "wait", "image": source.text, "owner": owner.get("owner")})):
            entry = self.cache.lookup(rt.name, digest, verify=verify)
            if entry is not None:   # another process converted it while we waited
                return self._native_from_entry(entry, source)
            entry = self._build(rt, source, digest, size)
        self.progress({"event": "done", "image": source.text, "runtime": rt.name,
                       "elapsed": round(time.monotonic() - started, 3)})
        native = self._native_from_entry(entry, source)
        return native.model_copy(update={"cached": False})

    def _image_size(self, ref: ImageRef, digest: str) -> Optional[int]:
        """Compressed size from the manifest, for the free-space preflight (cache misses only)."""
        from .errors import RegistryError
        pull_ref, insecure = self._pull_ref(ref)
        try:
            return self._registry(pull_ref.registry, insecure).manifest(
                pull_ref.pinned(digest), with_size=True).size
        except RegistryError as err:   # the runtime's own pull will report it properly
            logger.debug("no size for %s: %s", ref, err)
            return None

    def _native(self, source: ImageSource, rt: Runtime) -> NativeImage:
        path = source.path or ""
        if not os.path.exists(path):
            raise ImageError(f"{path}: no such file or directory")
        kind = "dir" if os.path.isdir(path) else os.path.splitext(path)[1].lower()
        ok = _NATIVE_OK.get(rt.name, ())
        if kind not in ok:
            raise SpecError(f"{rt.name} cannot run {path} directly"
                            + (f" (it runs {', '.join(ok)})" if ok else "; pass a registry reference or archive"))
        return NativeImage(runtime=rt.name, source=source.text, location=path, cached=True)

    def _verifier(self, rt: Runtime) -> Optional[Callable[[Entry], bool]]:
        if rt.name == "udocker":
            udir = rt.runtime_env(self.env, self.cache.root)["UDOCKER_DIR"]
            return lambda e: os.path.isdir(os.path.join(udir, "containers", e.location))
        return None

    def _native_from_entry(self, entry: Entry, source: ImageSource) -> NativeImage:
        return NativeImage(runtime=entry.runtime, source=source.text, digest=entry.digest,
                           location=entry.location, size=entry.size(), cached=True)

    def _step_env(self, rt: Runtime) -> Dict[str, str]:
        from .runtimes.base import process_env
        env = process_env(self.env)
        env.update(rt.runtime_env(self.env, self.cache.root))
        return env

    def _preflight(self, rt: Runtime, source: ImageSource, size: Optional[int]) -> None:
        root = self.cache.root
        if size:
            need = max(4 * size, 64 << 20)
            free = free_bytes(root)
            if free is not None and free < need:
                raise PreflightError(
                    f"not enough space for {source.text} in the cache {root}: {free >> 20} MiB "
                    f"free, about {need >> 20} MiB needed; set NSDF_HPC_CACHE to a larger "
                    "filesystem (e.g. $SCRATCH)")
        if rt.name == "charliecloud" and "noexec" in mount_options(root).get("options", "").split(","):
            raise PreflightError(f"the cache {root} is on a noexec filesystem, where Charliecloud "
                                 "directory images cannot run; set NSDF_HPC_CACHE elsewhere")

    def _build(self, rt: Runtime, source: ImageSource, digest: str, size: Optional[int]) -> Entry:
        pinned: Optional[ImageRef] = None
        insecure = False
        if source.kind == "registry":
            assert source.ref is not None
            pull_ref, insecure = self._pull_ref(source.ref)
            pinned = pull_ref.pinned(digest)
        self._preflight(rt, source, size)
        key = digest.split(":", 1)[-1]
        plan = rt.image_plan(source, pinned, key, insecure)
        work = self.cache.workdir(rt.name, digest)
        try:
            location = self._execute_plan(rt, plan, source, work)
            guard = plan.checksum or plan.artifact
            main_file = guard if guard and os.path.isfile(os.path.join(work, guard)) else None
            dirs = [plan.artifact] if plan.artifact and os.path.isdir(os.path.join(work, plan.artifact)) else []
            data = {"source": source.text, "location": location, "relative": bool(plan.artifact),
                    "runtime_version": rt.version, "runtime_flavour": rt.flavour}
            return self.cache.publish(work, rt.name, digest, data, main_file=main_file, dirs=dirs,
                                      extra_size=self._store_size(rt, location))
        except BaseException:
            from .cache import _rmtree
            _rmtree(work)
            raise

    def _store_size(self, rt: Runtime, location: str) -> int:
        """Bytes a store runtime keeps for this entry outside the cache entry (udocker)."""
        if rt.name != "udocker":
            return 0
        d = os.path.join(rt.runtime_env(self.env, self.cache.root)["UDOCKER_DIR"], "containers", location)
        total = 0
        for root, _dirs, files in os.walk(d):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def _execute_plan(self, rt: Runtime, plan: ImagePlan, source: ImageSource, work: str) -> str:
        env = self._step_env(rt)
        if plan.pre_extract == "rootfs":
            from .unpack import flatten, write_charliecloud_metadata
            self.progress({"event": "step", "step": "unpack layers", "image": source.text})
            config = flatten(source, os.path.join(work, "rootfs"))
            write_charliecloud_metadata(os.path.join(work, "rootfs"), config)
        elif plan.pre_extract == "repack":
            from .unpack import repack_for_udocker
            self.progress({"event": "step", "step": "repack archive", "image": source.text})
            repack_for_udocker(source, os.path.join(work, "source.tar"))
        last = None
        for i, step in enumerate(plan.steps, 1):
            self.progress({"event": "step", "step": step.description, "index": i,
                           "total": len(plan.steps), "image": source.text, "runtime": rt.name})
            try:
                overrides = {k: (v.replace(WORKDIR, work) if v else v) for k, v in step.env.items()}
                last = self.runner.run(step.argv, check=step.check, env=env, env_overrides=overrides,
                                       cwd=work, timeout=step.timeout)
            except CommandError as err:
                raise ImageError(f"{rt.name}: {step.description} failed for {source.text}:\n{err}") from err
            except ToolNotFoundError as err:
                raise ImageError(f"{rt.name}: {step.description}: {err}") from err
        if plan.location == "@stdout":
            out = [ln.strip() for ln in (last.stdout if last else "").strip().splitlines() if ln.strip()]
            # `podman-hpc pull` prints "INFO: Migrating image to ..." after the id (podman_hpc.py)
            ids = [ln for ln in out if re.fullmatch(r"(sha256:)?[0-9a-f]{12,64}", ln)]
            if not out:
                raise ImageError(f"{rt.name}: could not tell which image was imported from {source.text}")
            return (ids or out)[-1]
        if plan.artifact:
            if plan.location and plan.location != plan.artifact:
                os.rename(os.path.join(work, plan.location), os.path.join(work, plan.artifact))
                shutil.rmtree(os.path.join(work, plan.location.split("/")[0]), ignore_errors=True)
            for leftover in ("source.tar",):
                p = os.path.join(work, leftover)
                if os.path.lexists(p):
                    os.unlink(p)
            if not os.path.exists(os.path.join(work, plan.artifact)):
                raise ImageError(f"{rt.name}: conversion of {source.text} produced no {plan.artifact}")
            return plan.artifact
        for leftover in ("source.tar",):
            p = os.path.join(work, leftover)
            if os.path.lexists(p):
                os.unlink(p)
        return str(plan.location)

    # ---------------------------------------------------------------- run
    def spec(self, image: str, command: Sequence[str], *, binds: Sequence[Union[str, Bind]] = (),
             env: Union[None, Mapping[str, str], Sequence[str]] = None, **options: Any) -> RunSpec:
        """Build a validated :class:`RunSpec` (``binds`` and ``env`` also accept CLI strings)."""
        # a malformed reference is bad input (SpecError, exit 2) even where no runtime is usable
        self.parse_image(image)
        b = tuple(x if isinstance(x, Bind) else Bind.parse(x) for x in binds)
        if env is None:
            e: Dict[str, str] = {}
        elif isinstance(env, Mapping):
            e = dict(env)
        else:
            e = dict(parse_env(x) for x in env)
        try:
            return RunSpec(image=image, command=tuple(command), binds=b, env=e, **options)
        except ValueError as err:
            raise SpecError(f"invalid run options: {_first_error(err)}") from None

    def invocation(self, spec: RunSpec, runtime: Union[None, str, Runtime] = None,
                   native: Optional[NativeImage] = None) -> Tuple[Invocation, NativeImage, Runtime]:
        """The exact argv and environment ``run`` would use (pulls the image if needed)."""
        rt = runtime if isinstance(runtime, Runtime) else self.runtime(runtime)
        native = native or self.pull(spec.image, rt, max_age=self.settings.tag_ttl)
        for b in spec.binds:
            if not os.path.exists(b.source):
                raise SpecError(f"bind source {b.source} does not exist")
        cenv = container_env(self.env, spec.env, self.settings.env_allow, self.settings.env_deny)
        host_env = dict(self.env)
        host_env.update(rt.runtime_env(self.env, self.cache.root))
        inv = rt.run_invocation(spec, native, cenv, host_env)
        return inv, native, rt

    def plan(self, spec: RunSpec, runtime: Union[None, str, Runtime] = None
             ) -> Tuple[Invocation, NativeImage, Runtime]:
        """Like :meth:`invocation` but never converts: a cache miss gives the location the
        image *will* have (for ``--dry-run``)."""
        rt = runtime if isinstance(runtime, Runtime) else self.runtime(runtime)
        source = self.parse_image(spec.image)
        if source.kind == "native":
            native = self._native(source, rt)
        else:
            digest, _ = self.resolve(source, self.settings.tag_ttl)
            entry = self.cache.lookup(rt.name, digest, verify=self._verifier(rt), touch=False)
            if entry is not None:
                native = self._native_from_entry(entry, source)
            else:
                pinned = None
                if source.ref is not None:
                    pull_ref, insecure = self._pull_ref(source.ref)
                    pinned = pull_ref.pinned(digest)
                    plan = rt.image_plan(source, pinned, digest.split(":", 1)[-1], insecure)
                else:
                    plan = rt.image_plan(source, None, digest.split(":", 1)[-1])
                if plan.artifact:
                    loc = os.path.join(self.cache.entry_dir(rt.name, digest), plan.artifact)
                elif plan.location == "@stdout":
                    loc = "<image id from the import>"
                else:
                    loc = str(plan.location)
                native = NativeImage(runtime=rt.name, source=source.text, digest=digest,
                                     location=loc, cached=False)
        inv, native, rt = self.invocation(spec, rt, native)
        return inv, native, rt

    def run(self, image: str, command: Sequence[str], *, runtime: Optional[str] = None,
            capture: bool = True, **options: Any) -> RunResult:
        """Run ``command`` in ``image``; returns its exit code (and output when captured).

        A non-zero exit of the command is data, not an error; errors are raised only when
        nothing could run (no runtime, bad input, image unavailable).
        """
        spec = options.pop("spec", None) or self.spec(image, command, **options)
        inv, native, rt = self.invocation(spec, runtime)
        return self.execute(inv, native, rt, capture=capture)

    def execute(self, inv: Invocation, native: NativeImage, rt: Runtime, *, capture: bool = True) -> RunResult:
        """Run a planned invocation (mount points first); the exit code is data."""
        for d in inv.mkdirs:
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as err:
                raise ImageError(f"{rt.name}: cannot create mount point {d}: {err.strerror}") from None
        res = self.runner.run(inv.argv, check=False, env=inv.env, capture=capture)
        return RunResult(returncode=res.returncode, stdout=res.stdout, stderr=res.stderr,
                         argv=inv.argv, runtime=rt.name, image=native)

    def launch_checks(self, spec: RunSpec, inv: Invocation, native: NativeImage
                      ) -> Tuple[List[str], List[str], float]:
        """What a launch record relies on: files whose identity must not change, paths that
        must exist, and until when a tag's digest may be reused."""
        checks = [inv.argv[0]]
        exists: List[str] = []
        expires = time.time() + 30 * 86400
        source = self.parse_image(spec.image)
        if source.kind == "native":
            checks.append(native.location)
        else:
            if source.kind != "registry" and source.path:
                checks.append(source.path)
            if native.digest:
                for tier in [*self.cache.site_tiers, self.cache.root]:
                    d = self.cache.entry_dir(native.runtime, native.digest, tier)
                    if native.location.startswith(d + "/") or os.path.isfile(os.path.join(d, "entry.json")):
                        checks.append(os.path.join(d, "entry.json"))
                        break
            if os.path.isfile(native.location):
                checks.append(native.location)
            elif os.path.isabs(native.location):
                exists.append(native.location)
            elif native.runtime == "udocker":
                udir = inv.env.get("UDOCKER_DIR", "")
                exists.append(os.path.join(udir, "containers", native.location))
            if source.kind == "registry" and source.ref is not None and not source.ref.digest:
                known = self.cache.known_ref(source.ref.slug())
                resolved = float(known.get("resolved") or 0) if known else 0.0
                expires = resolved + self.settings.tag_ttl
        return checks, exists, expires

    # ---------------------------------------------------------------- cache admin
    def images(self) -> List[Entry]:
        return self.cache.entries()

    def prune(self, *, older_than: Optional[float] = None, max_size: Optional[int] = None,
              dry_run: bool = False) -> List[Entry]:
        """Remove entries unused for ``older_than`` seconds, then the least recently used
        until the cache holds at most ``max_size`` bytes; returns what was (or would be) removed."""
        entries = [e for e in self.cache.entries() if e.tier == "user"]
        entries.sort(key=lambda e: e.last_use())
        now = time.time()
        doomed: List[Entry] = []
        if older_than is not None:
            doomed += [e for e in entries if now - e.last_use() > older_than]
        if max_size is not None:
            keep = [e for e in entries if e not in doomed]
            total = sum(e.size() for e in keep)
            for e in keep:
                if total <= max_size and max_size > 0:
                    break
                doomed.append(e)
                total -= e.size()
        if dry_run:
            return doomed
        removed = []
        for e in doomed:
            if self.cache.remove(e, self._store_cleanup):
                removed.append(e)
        self.cache.clean_tmp(older_than=24 * 3600)
        self._prune_launch_records(older_than if older_than is not None else 7 * 86400)
        return removed

    def _prune_launch_records(self, older_than: float) -> None:
        """Launch records are tiny but one per distinct command line: drop the stale ones."""
        from ._launch import record_dir
        d = record_dir(self.env)
        now = time.time()
        try:
            names = os.listdir(d)
        except OSError:
            return
        for name in names:
            p = os.path.join(d, name)
            try:
                if now - os.stat(p).st_mtime > older_than:
                    os.unlink(p)
            except OSError:
                pass

    def _store_cleanup(self, entry: Entry) -> None:
        """Remove what a store runtime keeps outside the cache entry."""
        try:
            rt = runtime_class(entry.runtime)
        except NsdfError:
            return
        if rt.storage != "store":
            return
        infos = {i.name: i for i in self.detect()}
        info = infos.get(entry.runtime)
        if not info or not info.found:
            return
        inst = rt(info.path, info.flavour, info.version)
        env = self._step_env(inst)
        if entry.runtime == "udocker":
            argv = [*inst._base(), "-q", "rm", entry.location]  # type: ignore[attr-defined]
        elif entry.runtime in ("podman", "podman-hpc"):
            argv = [inst.path, "rmi", "--ignore", entry.location]
        else:
            return
        self.runner.run(argv, check=False, env=env)


def _first_error(err: Exception) -> str:
    errors = getattr(err, "errors", None)
    if callable(errors):
        try:
            e = errors()[0]
            loc = ".".join(str(x) for x in e.get("loc", ()))
            return f"{loc}: {e.get('msg')}" if loc else str(e.get("msg"))
        except (IndexError, TypeError, KeyError):
            pass
    return str(err)


# -------------------------------------------------------------------- Slurm (issue 5)
# A temporary bridge: the Slurm methods live in nsdf_hpc.schedulers.submit (functions taking
# the Client first); the lead turns these into explicit typed Client methods when merging.
from .schedulers import submit as _slurm_submit  # noqa: E402 - after Client, which it types

Client.job_spec = _slurm_submit.job_spec            # type: ignore[attr-defined]
Client.scheduler = _slurm_submit.scheduler          # type: ignore[attr-defined]
Client.submit = _slurm_submit.submit                # type: ignore[attr-defined]
Client.submit_array = _slurm_submit.submit_array    # type: ignore[attr-defined]
