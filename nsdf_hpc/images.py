"""The image service: resolve references to digests, convert images into a runtime's native
form through its plan, publish them to the cache, list and prune.

It is handed the runtime to work for and never calls back into the Client; the image
reference is parsed once (:meth:`ImageService.parse_image`) and the parsed source travels on.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

from ._exec import CommandRunner
from ._launch import record_dir
from ._retry import RetryPolicy
from .cache import Entry, ImageCache, rmtree
from .config import Settings
from .errors import (CommandError, CommandTimeoutError, DiskFullError, ImageError, NsdfError,
                     PlatformError, PreflightError, RegistryError, SpecError, ToolNotFoundError,
                     UnexpectedOutputError)
from .host import HostFacts, free_bytes, mount_options
from .models import NativeImage, RunSpec
from .reference import ImageRef, ImageSource, Platform, host_platform, parse_source
from .runtimes import runtime_class, runtime_names
from .runtimes.base import IMPORTED, PREVIOUS, WORKDIR, ImagePlan, Runtime, process_env

if TYPE_CHECKING:
    # imported where used: a run of a cached image needs neither the registry client (http,
    # ssl) nor the layer tools (tarfile); issue 11 goal 3
    from .registry import ManifestInfo, RegistryClient

logger = logging.getLogger(__name__)

Progress = Callable[[Dict[str, Any]], None]
#: the containers-auth.json a pull that logs in reads (in the private work directory)
LOGIN_FILE = ".nsdf-login.json"


_FULL_WORDS = ("no space left on device", "disk quota exceeded", "enospc", "edquot")


def disk_full_text(text: str) -> bool:
    """Whether a tool's output says a filesystem was full (ENOSPC or a quota)."""
    low = text.lower()
    return any(w in low for w in _FULL_WORDS)


def _last_line(err: CommandError) -> str:
    if isinstance(err, CommandTimeoutError):
        return (f"no progress for {err.timeout:g} s, stopped" if err.stalled
                else f"still running after {err.timeout:g} s, stopped")
    lines = (err.stderr or err.stdout).strip().splitlines()
    return lines[-1][:300] if lines else "(no output)"


def _full_line(err: CommandError) -> str:
    """The line of a tool's output that says the disk is full (else its last line)."""
    lines = (err.stderr + "\n" + err.stdout).splitlines()
    for line in lines:
        if disk_full_text(line):
            return line.strip()[-240:]
    for line in lines:
        if line.lower().startswith("error"):
            return line.strip()[-240:]
    return _last_line(err)


def _same_filesystem(path: str, other: str) -> bool:
    """Whether ``path`` (or its nearest existing parent) is on ``other``'s filesystem."""
    def dev(p: str) -> Optional[int]:
        while p and p != "/":
            try:
                return os.stat(p).st_dev
            except OSError:
                p = os.path.dirname(p)
        return os.stat("/").st_dev
    return dev(path) == dev(other)


def _empty_dir(path: str, keep: Sequence[str] = ()) -> None:
    """Remove what a failed attempt left in a work directory, before the next attempt."""
    for name in os.listdir(path):
        if name not in keep:
            p = os.path.join(path, name)
            if os.path.isdir(p) and not os.path.islink(p):
                rmtree(p)
            else:
                os.unlink(p)


class ImageService:
    """Images for one configuration: settings, host environment, runner and cache.

    ``host`` returns the host facts (read lazily: only pulls inside an allocation need them);
    ``progress`` is called with one dict per event. The library never prints.
    """

    def __init__(self, settings: Settings, env: Mapping[str, str], runner: CommandRunner,
                 cache: ImageCache, host: Callable[[], HostFacts], progress: Progress) -> None:
        self.settings = settings
        self.env = env
        self.runner = runner
        self.cache = cache
        self._host = host
        self.progress = progress
        self._registries: Dict[Tuple[str, bool], RegistryClient] = {}
        #: the platform images are prepared for unless a pull names another
        self.platform: Platform = host_platform()

    def parse_image(self, image: str) -> ImageSource:
        return parse_source(image, nsdf_registry=self.settings.nsdf_registry)

    def pull_ref(self, ref: ImageRef) -> Tuple[ImageRef, bool]:
        registry = self.settings.mirrors.get(ref.registry, ref.registry)
        pull_ref = ref.on(registry) if registry != ref.registry else ref
        return pull_ref, registry in self.settings.insecure_registries

    def _registry(self, registry: str, insecure: bool) -> RegistryClient:
        """One registry client per registry, so a token is fetched once per session."""
        key = (registry, insecure)
        if key not in self._registries:
            from .registry import RegistryClient   # noqa: PLC0415
            self._registries[key] = RegistryClient(registry, insecure=insecure, env=self.env,
                                                   timeout=self.settings.registry_timeout,
                                                   retry=self.retry_policy())
        return self._registries[key]

    def retry_policy(self) -> RetryPolicy:
        s = self.settings
        return RetryPolicy(attempts=s.registry_attempts, base=s.registry_backoff)

    def _offline_allocation(self) -> bool:
        return self._host().in_slurm_allocation and not self.settings.pull_on_compute

    def resolve(self, source: ImageSource, max_age: float = 0.0,
                platform: Optional[Platform] = None) -> Tuple[str, Optional[int]]:
        """The digest (and, when read, compressed size) of the image ``source`` stands for on
        ``platform`` (default: this host's): the cache key. For an image index (multi-arch)
        that is the digest of the entry for the platform, never the index's.

        ``max_age`` > 0 accepts a tag's digest resolved at most that many seconds ago without
        asking the registry (``run`` uses the ``tag_ttl`` setting; ``pull`` always asks). A
        digest reference needs no registry: an index digest is mapped to the platform's entry
        by what an earlier pull recorded, else by :meth:`pull` on a cache miss.
        """
        want = platform or self.platform
        if source.kind == "native":
            raise SpecError("a native image has no digest")
        if source.kind != "registry":
            if not source.path or not os.path.exists(source.path):
                raise ImageError(f"{source.text}: no such file or directory")
            from .unpack import source_digest   # noqa: PLC0415
            return source_digest(source), None
        assert source.ref is not None
        if source.ref.digest:
            return self._index_entry(source.ref, source.ref.digest, want) or source.ref.digest, None
        slug = source.ref.slug()
        offline = self._offline_allocation()
        known = self.cache.known_ref(slug) if max_age > 0 or offline else None
        if known and (offline or time.time() - float(known.get("resolved") or 0) <= max_age):
            if not known.get("index"):
                return str(known["digest"]), known.get("size")
            entry = self._index_entry(source.ref, str(known["digest"]), want)
            if entry:
                return entry, None
            if offline:
                raise PlatformError(
                    f"{source.ref} has not been prepared for {want} for this job: inside a Slurm "
                    "allocation nsdf-run never contacts a registry. Run `nsdf-run pull --platform "
                    f"{want} {source.text}` on a login node first", wanted=str(want))
        elif offline:
            raise ImageError(f"{source.ref} has not been prepared for this job: inside a Slurm "
                             "allocation nsdf-run never contacts a registry. Run `nsdf-run pull "
                             f"{source.text}` on a login node first (or set pull_on_compute = true)")
        pull_ref, insecure = self.pull_ref(source.ref)
        self.progress({"event": "resolve", "image": str(source.ref), "registry": pull_ref.registry})
        info = self._registry(pull_ref.registry, insecure).manifest(pull_ref, platform=want)
        self.cache.remember_ref(slug, info.digest, info.size, **({"index": True} if info.is_index else {}))
        return self._chosen(source, info, want), info.size if not info.is_index else None

    # ---------------------------------------------------------------- platforms
    @staticmethod
    def _index_slug(ref: ImageRef, index_digest: str, platform: Platform) -> str:
        """The record of which entry of an index serves a platform; keyed by the index's
        digest, so it never goes stale (a moved tag names another index)."""
        return ref.model_copy(update={"tag": f"{index_digest.replace(':', '-')}.{platform.slug()}"}).slug()

    def _index_entry(self, ref: ImageRef, index_digest: str, platform: Platform) -> Optional[str]:
        """The entry of the index ``index_digest`` for ``platform``, as a pull recorded it."""
        known = self.cache.known_ref(self._index_slug(ref, index_digest, platform))
        return str(known["digest"]) if known else None

    def _chosen(self, source: ImageSource, info: ManifestInfo, platform: Platform) -> str:
        """The image digest for ``platform`` (recorded for an index), or the clear error that
        lists what the image offers."""
        assert source.ref is not None
        if info.is_index:
            if info.image_digest is None:
                raise self._no_platform(source, platform, info.platforms)
            self.cache.remember_ref(self._index_slug(source.ref, info.digest, platform),
                                    info.image_digest, None, platform=info.platform)
            return info.image_digest
        if info.platform and not _serves(platform, info.platform):
            raise self._no_platform(source, platform, (info.platform,))
        return info.image_digest or info.digest

    def _no_platform(self, source: ImageSource, platform: Platform, offered: Sequence[str]) -> PlatformError:
        host = self.is_host(platform)
        where = "this host's platform" if host else "the platform asked for"
        if not offered:
            text = f"{source.text} offers no image for {platform} ({where}); its index lists no platform"
        else:
            text = (f"{source.text} offers no image for {platform} ({where}): it is for "
                    f"{', '.join(offered)} only")
            if host:
                text += (f". To prepare it here for nodes of that architecture, pull it with "
                         f"--platform {offered[0]} (platform= in the API); it runs only on such nodes")
        return PlatformError(text, wanted=str(platform), offered=offered)

    def check_platform(self, rt: Runtime, platform: Optional[Platform]) -> Optional[Platform]:
        """``platform`` when it is another than this host's (None: the host's), after checking
        that ``rt`` can prepare images for it (``Runtime.foreign_platforms``)."""
        if platform is None or self.is_host(platform):
            return None
        if not rt.foreign_platforms:
            able = [n for n in runtime_names() if runtime_class(n).foreign_platforms]
            raise PlatformError(f"{rt.name} cannot prepare an image for another platform ({platform}) "
                                f"than this host's ({self.platform}): pull it on a node of that "
                                f"architecture, or use a runtime that can ({', '.join(able)})",
                                wanted=str(platform))
        return platform

    def is_host(self, platform: Union[None, str, Platform]) -> bool:
        """Whether images for ``platform`` (text as recorded: "linux/arm64") run natively
        here; None (not known) counts as yes."""
        return platform is None or _serves(self.platform, platform)

    def pull(self, image: Union[str, ImageSource], rt: Runtime, *, max_age: float = 0.0,
             platform: Optional[Platform] = None) -> NativeImage:
        """Make ``image`` available to ``runtime`` in its native form (cached by digest).

        A tag is resolved to its digest at the registry (one manifest request) unless it was
        resolved less than ``max_age`` seconds ago; a digest reference never needs the network.
        ``platform`` (default: this host's) chooses from a multi-arch image; another one than
        the host's works on the runtimes that can (``Runtime.foreign_platforms``), for nodes of
        that architecture. An image without a variant for it is a PlatformError that lists
        the platforms it has.
        """
        source = image if isinstance(image, ImageSource) else self.parse_image(image)
        if source.kind == "native":
            return self.native(source, rt)
        foreign = self.check_platform(rt, platform)
        want = platform or self.platform
        digest, size = self.resolve_for(source, rt, max_age, want)
        verify = self.verifier(rt)
        entry = self.cache.lookup(rt.name, digest, verify=verify)
        if entry is not None:
            return self._native_from_entry(self._entry_for(entry, source, want), source)
        if self._offline_allocation():
            raise ImageError(f"{source.text} ({digest}) is not in the {rt.name} cache "
                             f"{self.cache.root}: inside a Slurm allocation nsdf-run does not pull. "
                             f"Run `nsdf-run pull --runtime {rt.name} {source.text}` on a login node")
        image_platform: Optional[str] = None
        if source.kind == "registry" and source.ref is not None:
            # a cache miss: read the manifest (size for the preflight, an index digest's entry
            # for the platform, a plain image's platform from its config)
            info = self._describe(source.ref, digest, want)
            if info is not None:
                chosen = self._chosen(source, info, want)
                image_platform = info.platform
                size = info.size if size is None or chosen != digest else size
                if chosen != digest:   # a digest reference to an index: its entry may be cached
                    digest = chosen
                    entry = self.cache.lookup(rt.name, digest, verify=verify)
                    if entry is not None:
                        return self._native_from_entry(self._entry_for(entry, source, want), source)
        self.cache.ensure_dirs()
        started = time.monotonic()
        with self.cache.locked(rt.name, digest, on_wait=lambda owner: self.progress(
                {"event": "wait", "image": source.text, "owner": owner.get("owner")})):
            entry = self.cache.lookup(rt.name, digest, verify=verify)
            if entry is not None:   # another process converted it while we waited
                return self._native_from_entry(entry, source)
            entry = self._build(rt, source, digest, size, foreign, image_platform)
        self.progress({"event": "done", "image": source.text, "runtime": rt.name,
                       "elapsed": round(time.monotonic() - started, 3)})
        native = self._native_from_entry(entry, source)
        return native.model_copy(update={"cached": False})

    def preview(self, source: ImageSource, rt: Runtime, platform: Optional[Platform] = None) -> NativeImage:
        """The native image ``source`` is or will be, without converting anything (a cache miss
        gives the location the entry *will* have; for ``--dry-run``)."""
        if source.kind == "native":
            return self.native(source, rt)
        foreign = self.check_platform(rt, platform)
        digest, _ = self.resolve_for(source, rt, self.settings.tag_ttl, platform or self.platform)
        entry = self.cache.lookup(rt.name, digest, verify=self.verifier(rt), touch=False)
        if entry is not None:
            return self._native_from_entry(entry, source)
        key = digest.split(":", 1)[-1]
        if source.ref is not None:
            pull_ref, insecure = self.pull_ref(source.ref)
            plan = rt.image_plan(source, pull_ref.pinned(digest), key, insecure, foreign)
        else:
            plan = rt.image_plan(source, None, key)
        if plan.artifact:
            loc = os.path.join(self.cache.entry_dir(rt.name, digest), plan.artifact)
        elif plan.location == "@stdout":
            loc = "<image id from the import>"
        else:
            loc = str(plan.location)
        return NativeImage(runtime=rt.name, source=source.text, digest=digest, location=loc, cached=False,
                           platform=str(foreign) if foreign else None)

    def _describe(self, ref: ImageRef, digest: str, platform: Platform) -> Optional[ManifestInfo]:
        """The manifest behind ``digest`` read in full (cache misses only): its compressed
        size for the free-space preflight, and its platform (an index: the entry for
        ``platform``). None when the registry cannot say (the runtime's own pull will
        report that properly)."""
        pull_ref, insecure = self.pull_ref(ref)
        try:
            return self._registry(pull_ref.registry, insecure).manifest(
                pull_ref.pinned(digest), with_size=True, platform=platform)
        except RegistryError as err:
            logger.debug("cannot read the manifest of %s: %s", ref, err)
            return None

    def _entry_for(self, entry: Entry, source: ImageSource, platform: Platform) -> Entry:
        """``entry`` if it is an image for ``platform`` (or its platform is not recorded);
        else the PlatformError (a one-platform image prepared with --platform, asked for the
        host's)."""
        recorded = entry.data.get("platform")
        if isinstance(recorded, str) and recorded and not _serves(platform, recorded):
            raise self._no_platform(source, platform, (recorded,))
        return entry

    def native(self, source: ImageSource, rt: Runtime) -> NativeImage:
        """A native artifact the runtime runs as it is (no cache entry)."""
        path = source.path or ""
        if not os.path.exists(path):
            raise ImageError(f"{path}: no such file or directory")
        kind = "dir" if os.path.isdir(path) else os.path.splitext(path)[1].lower()
        ok = rt.native_kinds
        if kind not in ok:
            raise SpecError(f"{rt.name} cannot run {path} directly"
                            + (f" (it runs {', '.join(ok)})" if ok else "; pass a registry reference or archive"))
        return NativeImage(runtime=rt.name, source=source.text, location=path, cached=True)

    def verifier(self, rt: Runtime) -> Optional[Callable[[Entry], bool]]:
        """A cache entry of a store runtime is usable only while its store still holds it."""
        rt_env = rt.runtime_env(self.env, self.cache.root)
        if rt.store_path("probe", rt_env) is None:
            return self._store_holds(rt)
        return lambda e: os.path.isdir(rt.store_path(e.location, rt_env) or "")

    def _store_holds(self, rt: Runtime) -> Optional[Callable[[Entry], bool]]:
        """Asks the runtime's store (``Runtime.holds_argv``) whether it still holds an entry's
        image: another cache's prune, `podman rmi` or `podman system reset` may have removed
        it. Only a clear "no" (``Runtime.parse_holds``) fails the entry; an error that says
        nothing about the image keeps it (the run reports the runtime's own error). What the
        store's own files answer (``store_image_problem``: broken; ``store_holds``: whole)
        needs no process."""
        if rt.holds_argv("probe") is None:
            return None
        env = self._step_env(rt)

        def holds(entry: Entry) -> bool:
            broken = rt.store_image_problem(entry.location, env)
            if broken is not None:
                logger.warning("%s: %s", rt.name, broken[0])
                return False
            if rt.store_holds(entry.location, env):
                return True
            argv = rt.holds_argv(entry.location)
            if not argv:
                return True
            try:
                res = self.runner.run(argv, check=False, env=env, timeout=60)
            except NsdfError as err:
                logger.debug("cannot ask %s about %s: %s", rt.name, entry.location, err)
                return True
            return rt.parse_holds(res.returncode, res.stdout) is not False
        return holds

    def verify(self, entry: Entry, runtime_for: Callable[[str], Optional[Runtime]],
               full: bool = False) -> bool:
        """The cache's own check (``full``: re-hash every artifact) and, for a store runtime
        that is installed here, that its store still holds the entry's image."""
        ok = self.cache.verify_full(entry) if full else self.cache.check(entry)
        if not ok:
            return False
        rt = runtime_for(entry.runtime)
        check = self.verifier(rt) if rt is not None else None
        return check is None or check(entry)

    def _native_from_entry(self, entry: Entry, source: ImageSource) -> NativeImage:
        shell = entry.data.get("shell")
        platform = entry.data.get("platform")
        return NativeImage(runtime=entry.runtime, source=source.text, digest=entry.digest,
                           location=entry.location, size=entry.size(), cached=True,
                           shell=shell if isinstance(shell, bool) else None,
                           platform=platform if isinstance(platform, str) and platform else None)

    def _step_env(self, rt: Runtime) -> Dict[str, str]:
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
        problem = rt.preflight(root, mount_options(root).get("options", "").split(","))
        if problem:
            raise PreflightError(problem)

    def _build(self, rt: Runtime, source: ImageSource, digest: str, size: Optional[int],
               foreign: Optional[Platform] = None, image_platform: Optional[str] = None) -> Entry:
        pinned: Optional[ImageRef] = None
        insecure = False
        if source.kind == "registry":
            assert source.ref is not None
            pull_ref, insecure = self.pull_ref(source.ref)
            pinned = pull_ref.pinned(digest)
        self._preflight(rt, source, size)
        key = digest.split(":", 1)[-1]
        plan = rt.image_plan(source, pinned, key, insecure, foreign)
        work = self.cache.workdir(rt.name, digest)
        try:
            location = self._execute_plan(rt, plan, source, work)
            self._check_store(rt, location, source, work)
            location = self._claim(rt, location, source, digest, work)
            guard = plan.checksum or plan.artifact
            main_file = guard if guard and os.path.isfile(os.path.join(work, guard)) else None
            dirs = [plan.artifact] if plan.artifact and os.path.isdir(os.path.join(work, plan.artifact)) else []
            platform = image_platform or (str(foreign) if foreign else None)
            # another platform's image cannot be started here to probe it (no /bin/sh answer)
            shell = None if not self.is_host(platform) else self._has_shell(
                rt, os.path.join(work, location) if plan.artifact else location)
            data = {"source": source.text, "location": location, "relative": bool(plan.artifact),
                    "runtime_version": rt.version, "runtime_flavour": rt.flavour, "shell": shell,
                    **({"platform": platform} if platform else {})}
            return self.cache.publish(work, rt.name, digest, data, main_file=main_file, dirs=dirs,
                                      extra_size=self._store_size(rt, location))
        except OSError as err:
            rmtree(work)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full(rt, "writing the cache entry", source, err) from err
            raise
        except BaseException:
            rmtree(work)
            raise

    def _a_filesystem_is_full(self, rt: Runtime) -> bool:
        """Whether the cache's or one of the runtime's own directories' filesystem has less
        than 1 MiB left right after a step failed (for tools that do not say ENOSPC)."""
        paths = [self.cache.root, *(p for p in rt.runtime_env(self.env, self.cache.root).values()
                                    if p.startswith("/"))]
        for p in paths:
            while p and not os.path.exists(p):
                p = os.path.dirname(p)
            free = free_bytes(p) if p else None
            if free is not None and free < (1 << 20):
                return True
        return False

    def _disk_full(self, rt: Runtime, what: str, source: ImageSource,
                   err: BaseException) -> DiskFullError:
        """The clear error for a filesystem that filled during a conversion: the cache
        (NSDF_HPC_CACHE) unless one of the runtime's own directories (its store, TMPDIR) lives
        on another filesystem and is the fuller one. Measured after the tool exited (it may
        have removed its temp files already), so the filesystem decides, not the free space."""
        root = self.cache.root
        detail = _full_line(err) if isinstance(err, CommandError) else str(err)
        others: List[Tuple[str, str]] = []
        if isinstance(err, CommandError):
            named = {**{"TMPDIR": self.env.get("TMPDIR", "/tmp")},
                     **rt.runtime_env(self.env, root)}
            for var, path in sorted(named.items()):
                if path.startswith("/") and not _same_filesystem(path, root):
                    others.append((var, path))
        free = free_bytes(root)
        outside = [(v, p) for v, p in others if free is not None and (free_bytes(p) or 0) < free]
        if outside and free is not None and free >= (64 << 20):
            dirs = ", ".join(f"{v}={p}" for v, p in outside)
            return DiskFullError(
                f"a filesystem filled up while converting {source.text} for {rt.name} ({what}: "
                f"{detail}): not the cache (NSDF_HPC_CACHE={root}, {free >> 20} MiB free) but "
                f"the runtime's own directory {dirs}; free space there or set it to a larger "
                "filesystem; nothing was kept", path=outside[0][1], variable=outside[0][0])
        return DiskFullError(
            f"the cache filesystem filled up while converting {source.text} for {rt.name} "
            f"({what}: {detail}): NSDF_HPC_CACHE={root} is too small for this image "
            f"({'?' if free is None else free >> 20} MiB free now); nothing was kept. Set "
            "NSDF_HPC_CACHE to a larger filesystem (e.g. $SCRATCH) or free space "
            "(nsdf-run prune)", path=root, variable="NSDF_HPC_CACHE")

    def _check_store(self, rt: Runtime, location: str, source: ImageSource, work: str) -> None:
        """The store files the plan made must be whole (``Runtime.store_image_problem``): a
        tool that takes a half-written file from an interrupted run for a finished one
        (podman-hpc's migrate: "Squash file already generated") gets it made once more."""
        env = self._step_env(rt)
        found = rt.store_image_problem(location, env)
        if found is not None and found[1] is not None:
            logger.warning("%s: %s; making it again", rt.name, found[0])
            self._execute_plan(rt, found[1], source, work)
            found = rt.store_image_problem(location, env)
        if found is not None:
            raise ImageError(f"{rt.name}: the converted image of {source.text} is broken: {found[0]}")

    def _has_shell(self, rt: Runtime, location: str) -> Optional[bool]:
        """Whether the converted image runs ``/bin/sh``: read from the runtime's store when it
        can tell (``Runtime.store_has_shell``), else one container start per conversion; None
        when the probe itself could not tell."""
        spec = RunSpec(image=location, command=("/bin/sh", "-c", "exit 0"), bind_cwd=False)
        native = NativeImage(runtime=rt.name, source=location, location=location)
        try:
            env = self._step_env(rt)
            known = rt.store_has_shell(location, env)
            if known is not None:
                logger.debug("%s has%s /bin/sh (read from the store)", location, "" if known else " no")
                return known
            inv = rt.run_invocation(spec, native, {}, env)
            if inv.tree or inv.mkdirs or inv.mkfiles:
                return None
            res = self.runner.run(inv.argv, check=False, env=inv.env, timeout=120)
        except (NsdfError, OSError) as err:
            logger.debug("shell probe of %s failed: %s", location, err)
            return None
        logger.debug("shell probe of %s: exit %s", location, res.returncode)
        return res.returncode == 0

    def _claim(self, rt: Runtime, location: str, source: ImageSource, digest: str, work: str) -> str:
        """Give the store image a name only this cache entry uses (``Runtime.claim_plan``), so
        that pruning another cache that shares the runtime's store never removes it."""
        owner = hashlib.sha256(os.path.realpath(self.cache.entry_dir(rt.name, digest)).encode(
            "utf-8", "surrogateescape")).hexdigest()[:16]
        claim = rt.claim_plan(location, owner)
        return location if claim is None else self._execute_plan(rt, claim, source, work)

    def _store_image_size(self, rt: Runtime, location: str) -> int:
        """Bytes the runtime's store reports for an image (``Runtime.store_size_argv``), 0 when
        it cannot say."""
        argv = rt.store_size_argv(location)
        if not argv:
            return 0
        try:
            res = self.runner.run(argv, check=True, env=self._step_env(rt), timeout=60)
            return rt.parse_store_size(res.stdout)
        except NsdfError as err:
            logger.debug("no store size for %s: %s", location, err)
            return 0

    def _store_size(self, rt: Runtime, location: str) -> int:
        """Bytes a store runtime keeps for this entry outside the cache entry."""
        d = rt.store_path(location, rt.runtime_env(self.env, self.cache.root))
        if d is None:
            return self._store_image_size(rt, location)
        total = 0
        for root, _dirs, files in os.walk(d):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_size
                except OSError:
                    pass
        return total

    def _execute_plan(self, rt: Runtime, plan: ImagePlan, source: ImageSource, work: str) -> str:
        env = {**self._step_env(rt), **self.login_env(rt, source, work)}
        if plan.pre_extract == "rootfs":
            from .unpack import flatten, write_charliecloud_metadata   # noqa: PLC0415 (tarfile, gzip)
            self.progress({"event": "step", "step": "unpack layers", "image": source.text})
            config = flatten(source, os.path.join(work, "rootfs"))
            write_charliecloud_metadata(os.path.join(work, "rootfs"), config)
        elif plan.pre_extract == "repack":
            from .unpack import repack_for_udocker   # noqa: PLC0415
            self.progress({"event": "step", "step": "repack archive", "image": source.text})
            repack_for_udocker(source, os.path.join(work, "source.tar"))
        last = None
        previous = ""
        policy = self.retry_policy()
        imported: Optional[str] = None
        for i, step in enumerate(plan.steps, 1):
            self.progress({"event": "step", "step": step.description, "index": i,
                           "total": len(plan.steps), "image": source.text, "runtime": rt.name})
            attempt = 0
            while True:
                attempt += 1
                try:
                    overrides = {k: (v.replace(WORKDIR, work) if v else v) for k, v in step.env.items()}
                    argv = [a.replace(IMPORTED, imported) if imported else a for a in step.argv]
                    if step.retry or step.registry:    # a registry that stops sending mid-blob
                        last = self.runner.run(argv, check=step.check, env=env,
                                               env_overrides=overrides, cwd=work, timeout=step.timeout,
                                               stall_timeout=self.settings.pull_stall_timeout)
                    else:
                        last = self.runner.run(argv, check=step.check, env=env,
                                               env_overrides=overrides, cwd=work, timeout=step.timeout)
                    expect = step.expect.replace(PREVIOUS, previous.strip()) if step.expect else None
                    if expect and imported:
                        expect = expect.replace(IMPORTED, imported)
                    if expect and expect not in last.stdout:
                        raise ImageError(f"{rt.name}: {step.description} failed for {source.text}: "
                                         f"`{' '.join(argv)}` does not list {expect} "
                                         "(an earlier step exited 0 without doing its job)")
                    if step.fail_if and any(ln.startswith(step.fail_if) for ln in
                                            (last.stderr + "\n" + last.stdout).splitlines()):
                        raise CommandError(step.argv, last.returncode, last.stdout, last.stderr)
                    previous = last.stdout
                    if step.names_import:
                        imported = rt.parse_import_output(last.stdout)
                    break
                except UnexpectedOutputError:
                    self._undo(plan, env, work)
                    raise ImageError(f"{rt.name}: could not tell which image was imported from "
                                     f"{source.text}") from None
                except CommandError as err:
                    if disk_full_text(err.stderr + "\n" + err.stdout) or self._a_filesystem_is_full(rt):
                        full = self._disk_full(rt, step.description, source, err)  # before the undo frees it
                        self._undo(plan, env, work)
                        raise full from err
                    if isinstance(err, CommandTimeoutError) and (step.retry or step.registry):
                        self._remove_partial_downloads(rt)
                    wait = policy.delay(attempt) if step.retry else None
                    if wait is not None:
                        logger.info("%s: %s failed (attempt %d of %d, exit %d: %s); trying again "
                                    "in %.1f s", rt.name, step.description, attempt, policy.attempts,
                                    err.returncode, _last_line(err), wait)
                        self.progress({"event": "retry", "step": step.description, "attempt": attempt,
                                       "attempts": policy.attempts, "wait": round(wait, 2),
                                       "image": source.text})
                        _empty_dir(work, keep=(LOGIN_FILE,))
                        time.sleep(wait)
                        continue
                    self._undo(plan, env, work)
                    where = ""
                    if (step.retry or step.registry) and source.ref is not None:
                        registry = self.pull_ref(source.ref)[0].registry
                        where = f" from registry {registry}" + (
                            f" ({attempt} attempt{'s' if attempt != 1 else ''})" if step.retry else "")
                    raise ImageError(f"{rt.name}: {step.description}{where} failed for "
                                     f"{source.text}:\n{err}") from err
                except ToolNotFoundError as err:
                    self._undo(plan, env, work)
                    raise ImageError(f"{rt.name}: {step.description}: {err}") from err
        self._forget_login(work)
        if plan.location == "@stdout":
            if imported:
                return imported
            try:
                return rt.parse_import_output(last.stdout if last else "")
            except UnexpectedOutputError:
                raise ImageError(f"{rt.name}: could not tell which image was imported from {source.text}") from None
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

    def _remove_partial_downloads(self, rt: Runtime) -> None:
        """After a pull was killed: remove the partial blobs it left in the runtime's layer
        cache. Only files nothing wrote to for ``pull_stall_timeout`` s: another process's
        pull that is still downloading keeps its own."""
        limit = time.time() - self.settings.pull_stall_timeout
        for path in rt.partial_downloads(rt.runtime_env(self.env, self.cache.root)):
            try:
                if os.stat(path).st_mtime <= limit:
                    os.unlink(path)
                    logger.debug("removed the partial download %s", path)
            except OSError:
                pass

    def _undo(self, plan: ImagePlan, env: Optional[Mapping[str, str]], work: str) -> None:
        """Best effort: remove what a failed plan left in the runtime's store (a tag that no
        cache entry owns would never be pruned)."""
        for step in plan.undo:
            try:
                self.runner.run(step.argv, check=False, env=env, cwd=work, timeout=step.timeout or 60)
            except NsdfError as err:
                logger.warning("could not undo a failed conversion (%s): %s", step.description, err)

    # ---------------------------------------------------------------- registry logins
    def login_env(self, rt: Runtime, source: ImageSource, work: str) -> Dict[str, str]:
        """What ``rt``'s pull of ``source`` needs to log in to its (mirrored) registry, when
        credentials are configured (NSDF_HPC_REGISTRY_USER/_PASSWORD or ~/.docker/config.json):
        variables of the tool's process, never argv; an auth file, where the tool wants one,
        is written 0600 into the private work directory and removed before publishing."""
        if source.kind != "registry" or source.ref is None:
            return {}
        registry = self.pull_ref(source.ref)[0].registry
        from .registry import _credentials   # noqa: PLC0415
        creds = _credentials(registry, self.env)
        if not creds:
            return {}
        authfile = os.path.join(work, LOGIN_FILE)
        env = rt.login_env(creds[0], creds[1], authfile)
        if authfile in env.values():
            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            fd = os.open(authfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"auths": {registry: {"auth": token}}}, fh)
        return env

    @staticmethod
    def _forget_login(work: str) -> None:
        try:
            os.unlink(os.path.join(work, LOGIN_FILE))
        except FileNotFoundError:
            pass

    # ---------------------------------------------------------------- images built here
    def resolve_for(self, source: ImageSource, rt: Runtime, max_age: float = 0.0,
                    platform: Optional[Platform] = None) -> Tuple[str, Optional[int]]:
        """:meth:`resolve`, except that a tag ``nsdf-run build`` made here stands for the image
        built for ``rt``, whatever a registry holds under that name and however long ago it was
        built, so that it runs at once and without a registry."""
        if source.kind == "registry" and source.ref is not None and not source.ref.digest \
                and self.is_host(platform):   # nsdf-run build makes images for this host only
            built = self.built_digests(source.ref)
            if rt.name in built:
                return built[rt.name], None
            if built:
                raise ImageError(
                    f"{source.text} was built here for {', '.join(sorted(built))}, not for "
                    f"{rt.name}: run it with --runtime {sorted(built)[0]}, or build it for "
                    f"{rt.name} too (nsdf-run build --runtime {rt.name} RECIPE)")
        return self.resolve(source, max_age, platform)

    def built_digests(self, ref: ImageRef) -> Dict[str, str]:
        """``{runtime: digest}`` of the images ``nsdf-run build`` made here under ``ref``'s tag
        and still cached (a pruned build no longer stands for the tag: it is pulled again)."""
        known = self.cache.known_ref(ref.slug())
        built = known.get("built") if known else None
        if not isinstance(built, dict):
            return {}
        return {str(k): str(v) for k, v in built.items()
                if os.path.isdir(self.cache.entry_dir(str(k), str(v)))}

    def adopt_built(self, rt: Runtime, work: str, digest: str, tag: str, *, location: str,
                    relative: bool, main_file: Optional[str] = None,
                    dirs: Sequence[str] = (), builder: str = "") -> NativeImage:
        """Publish an image that a builder made in ``work`` (a cache work directory) as the
        cache entry of ``rt`` for ``digest``, with no conversion, and record ``tag`` -> digest
        as built here for ``rt`` (:meth:`resolve_for`). ``location`` is the artifact relative to ``work``
        (``relative``) or a name in the runtime's store."""
        source = self.parse_image(tag)
        assert source.ref is not None
        try:
            with self.cache.locked(rt.name, digest):
                entry = self.cache.lookup(rt.name, digest, verify=self.verifier(rt))
                if entry is not None:   # the same bytes were built before: keep that entry
                    rmtree(work)
                else:
                    probe = os.path.join(work, location) if relative else location
                    data = {"source": tag, "location": location, "relative": relative,
                            "runtime_version": rt.version, "runtime_flavour": rt.flavour,
                            "built_by": builder, "shell": self._has_shell(rt, probe)}
                    entry = self.cache.publish(work, rt.name, digest, data, main_file=main_file,
                                               dirs=list(dirs), extra_size=self._store_size(rt, location))
        except BaseException:
            rmtree(work)
            raise
        built = {**self.built_digests(source.ref), rt.name: digest}
        self.cache.remember_ref(source.ref.slug(), digest, entry.size(), built=built, builder=builder)
        return self._native_from_entry(entry, source).model_copy(update={"cached": False})

    # ---------------------------------------------------------------- listing and pruning
    def entries(self) -> List[Entry]:
        return self.cache.entries()

    def prune(self, runtime_for: Callable[[str], Optional[Runtime]], *,
              older_than: Optional[float] = None, max_size: Optional[int] = None,
              dry_run: bool = False, on_kept: Optional[Callable[[Entry, str], None]] = None,
              jobs_alive: Optional[Callable[[Sequence[str]], Optional[Set[str]]]] = None) -> List[Entry]:
        """Remove entries unused for ``older_than`` seconds, then the least recently used
        until the cache holds at most ``max_size`` bytes; returns what was (or would be) removed.

        Kept, and passed to ``on_kept`` with the reason: an entry in use (a run holds
        ``ImageCache.use_path``), and one pinned by a Slurm job (``ImageCache.pin``) that
        ``jobs_alive`` says is queued or running, or whose jobs it cannot tell about (None).
        The size target is then met with the next least recently used ones."""
        entries = [e for e in self.cache.entries() if e.tier == "user"]
        entries.sort(key=lambda e: e.last_use())
        now = time.time()
        removed: List[Entry] = []

        def kept(e: Entry, why: str) -> bool:
            if on_kept is not None:
                on_kept(e, why)
            return False

        def take(e: Entry) -> bool:
            pins = self.cache.pins(e)
            if pins:
                alive = jobs_alive(pins) if jobs_alive is not None else None
                if alive is None:
                    return kept(e, f"Slurm job {', '.join(pins)} was submitted with it, and its state "
                                   "cannot be read now")
                if alive:
                    return kept(e, f"Slurm job {', '.join(sorted(alive))} (queued or running) needs it")
                if not dry_run:
                    self.cache.unpin(e, pins)
            if dry_run:
                gone = not self.cache.in_use(e)
            else:
                gone = self.remove(e, runtime_for)
            if gone:
                removed.append(e)
            elif self.cache.in_use(e):
                kept(e, "in use by a running container or Slurm task")
            return gone
        old = [e for e in entries if older_than is not None and now - e.last_use() > older_than]
        kept_old = [e for e in old if not take(e)]
        if max_size is not None:
            rest = [e for e in entries if e not in old]
            total = sum(e.size() for e in rest) + sum(e.size() for e in kept_old)
            for e in rest:
                if total <= max_size and max_size > 0:
                    break
                if take(e):
                    total -= e.size()
        if dry_run:
            return removed
        self.cache.clean_tmp(older_than=24 * 3600)
        self._prune_launch_records(older_than if older_than is not None else 7 * 86400)
        return removed

    def _prune_launch_records(self, older_than: float) -> None:
        """Launch records are tiny but one per distinct command line: drop the stale ones."""
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

    def remove(self, entry: Entry, runtime_for: Callable[[str], Optional[Runtime]]) -> bool:
        """Remove one entry and what its runtime keeps for it in its own store."""
        return self.cache.remove(entry, lambda e: self._store_cleanup(e, runtime_for))

    def _store_cleanup(self, entry: Entry, runtime_for: Callable[[str], Optional[Runtime]]) -> None:
        """Remove what a store runtime keeps outside the cache entry."""
        rt = runtime_for(entry.runtime)
        if rt is None:
            return
        argv = rt.remove_argv(entry.location)
        if argv:
            self.runner.run(argv, check=False, env=self._step_env(rt))


def _serves(wanted: Platform, image: Union[str, Platform]) -> bool:
    """Whether an image for ``image`` (text as recorded: "linux/arm64") serves ``wanted``; a
    platform a registry wrote in some other form serves nothing."""
    try:
        p = Platform.parse(image) if isinstance(image, str) else image
    except SpecError:
        return False
    return wanted.matches(p.os, p.architecture, p.variant)
