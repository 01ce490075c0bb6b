"""The image service: resolve references to digests, convert images into a runtime's native
form through its plan, publish them to the cache, list and prune.

It is handed the runtime to work for and never calls back into the Client; the image
reference is parsed once (:meth:`ImageService.parse_image`) and the parsed source travels on.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from ._exec import CommandRunner
from ._launch import record_dir
from .cache import Entry, ImageCache, rmtree
from .config import Settings
from .errors import (CommandError, ImageError, NsdfError, PreflightError, RegistryError, SpecError,
                     ToolNotFoundError, UnexpectedOutputError)
from .host import HostFacts, free_bytes, mount_options
from .models import NativeImage
from .reference import ImageRef, ImageSource, parse_source
from .registry import RegistryClient
from .runtimes.base import WORKDIR, ImagePlan, Runtime, process_env
from .unpack import flatten, repack_for_udocker, source_digest, write_charliecloud_metadata

logger = logging.getLogger(__name__)

Progress = Callable[[Dict[str, Any]], None]


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
            self._registries[key] = RegistryClient(registry, insecure=insecure, env=self.env)
        return self._registries[key]

    def _offline_allocation(self) -> bool:
        return self._host().in_slurm_allocation and not self.settings.pull_on_compute

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
        pull_ref, insecure = self.pull_ref(source.ref)
        self.progress({"event": "resolve", "image": str(source.ref), "registry": pull_ref.registry})
        info = self._registry(pull_ref.registry, insecure).manifest(pull_ref)
        self.cache.remember_ref(slug, info.digest, info.size)
        return info.digest, info.size

    def pull(self, image: Union[str, ImageSource], rt: Runtime, *, max_age: float = 0.0) -> NativeImage:
        """Make ``image`` available to ``runtime`` in its native form (cached by digest).

        A tag is resolved to its digest at the registry (one manifest request) unless it was
        resolved less than ``max_age`` seconds ago; a digest reference never needs the network.
        """
        source = image if isinstance(image, ImageSource) else self.parse_image(image)
        if source.kind == "native":
            return self.native(source, rt)
        digest, size = self.resolve(source, max_age)
        verify = self.verifier(rt)
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

    def preview(self, source: ImageSource, rt: Runtime) -> NativeImage:
        """The native image ``source`` is or will be, without converting anything (a cache miss
        gives the location the entry *will* have; for ``--dry-run``)."""
        if source.kind == "native":
            return self.native(source, rt)
        digest, _ = self.resolve(source, self.settings.tag_ttl)
        entry = self.cache.lookup(rt.name, digest, verify=self.verifier(rt), touch=False)
        if entry is not None:
            return self._native_from_entry(entry, source)
        key = digest.split(":", 1)[-1]
        if source.ref is not None:
            pull_ref, insecure = self.pull_ref(source.ref)
            plan = rt.image_plan(source, pull_ref.pinned(digest), key, insecure)
        else:
            plan = rt.image_plan(source, None, key)
        if plan.artifact:
            loc = os.path.join(self.cache.entry_dir(rt.name, digest), plan.artifact)
        elif plan.location == "@stdout":
            loc = "<image id from the import>"
        else:
            loc = str(plan.location)
        return NativeImage(runtime=rt.name, source=source.text, digest=digest, location=loc, cached=False)

    def _image_size(self, ref: ImageRef, digest: str) -> Optional[int]:
        """Compressed size from the manifest, for the free-space preflight (cache misses only)."""
        pull_ref, insecure = self.pull_ref(ref)
        try:
            return self._registry(pull_ref.registry, insecure).manifest(
                pull_ref.pinned(digest), with_size=True).size
        except RegistryError as err:   # the runtime's own pull will report it properly
            logger.debug("no size for %s: %s", ref, err)
            return None

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
        it. Only a clear "no" (exit 1) fails the entry; an error that says nothing about the
        image keeps it (the run reports the runtime's own error)."""
        if rt.holds_argv("probe") is None:
            return None
        env = self._step_env(rt)

        def holds(entry: Entry) -> bool:
            argv = rt.holds_argv(entry.location)
            if not argv:
                return True
            try:
                res = self.runner.run(argv, check=False, env=env, timeout=60)
            except NsdfError as err:
                logger.debug("cannot ask %s about %s: %s", rt.name, entry.location, err)
                return True
            return res.returncode != 1
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
        return NativeImage(runtime=entry.runtime, source=source.text, digest=entry.digest,
                           location=entry.location, size=entry.size(), cached=True)

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

    def _build(self, rt: Runtime, source: ImageSource, digest: str, size: Optional[int]) -> Entry:
        pinned: Optional[ImageRef] = None
        insecure = False
        if source.kind == "registry":
            assert source.ref is not None
            pull_ref, insecure = self.pull_ref(source.ref)
            pinned = pull_ref.pinned(digest)
        self._preflight(rt, source, size)
        key = digest.split(":", 1)[-1]
        plan = rt.image_plan(source, pinned, key, insecure)
        work = self.cache.workdir(rt.name, digest)
        try:
            location = self._execute_plan(rt, plan, source, work)
            location = self._claim(rt, location, source, digest, work)
            guard = plan.checksum or plan.artifact
            main_file = guard if guard and os.path.isfile(os.path.join(work, guard)) else None
            dirs = [plan.artifact] if plan.artifact and os.path.isdir(os.path.join(work, plan.artifact)) else []
            data = {"source": source.text, "location": location, "relative": bool(plan.artifact),
                    "runtime_version": rt.version, "runtime_flavour": rt.flavour}
            return self.cache.publish(work, rt.name, digest, data, main_file=main_file, dirs=dirs,
                                      extra_size=self._store_size(rt, location))
        except BaseException:
            rmtree(work)
            raise

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
        env = self._step_env(rt)
        if plan.pre_extract == "rootfs":
            self.progress({"event": "step", "step": "unpack layers", "image": source.text})
            config = flatten(source, os.path.join(work, "rootfs"))
            write_charliecloud_metadata(os.path.join(work, "rootfs"), config)
        elif plan.pre_extract == "repack":
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

    # ---------------------------------------------------------------- listing and pruning
    def entries(self) -> List[Entry]:
        return self.cache.entries()

    def prune(self, runtime_for: Callable[[str], Optional[Runtime]], *,
              older_than: Optional[float] = None, max_size: Optional[int] = None,
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
            if self.remove(e, runtime_for):
                removed.append(e)
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


