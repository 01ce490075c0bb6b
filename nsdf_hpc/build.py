"""Recipes to images: choose a builder, apply the site's mirrors to FROM, convert a Dockerfile
for Apptainer, run the builder's plan, and hand the image to the image service's cache.

The pure parts live in :mod:`nsdf_hpc.recipe` (Dockerfiles, names, conversion) and
:mod:`nsdf_hpc.builders` (argv builders, choice); this module holds the effects of a build:
files written to the private work directory and the builder's commands (through the runner).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ._exec import CommandRunner
from .builders import (BuildJob, BuildPlan, Builder, builder_class, choose_builder, detect_builders,
                       make_builder)
from .builders.base import DEFINITION, DOCKERFILE
from .cache import rmtree
from .config import Settings
from ._fsutil import atomic_write_json
from .errors import CommandError, ImageError, RegistryError, SpecError, ToolNotFoundError
from .images import ImageService
from .paths import user_state_dir
from .models import BuilderChoice, BuilderInfo, BuildResult, PushResult, RuntimeChoice
from .recipe import (check_version, def_labels, find_recipe, image_name, labels, parse_dockerfile,
                     rewrite_def_from, rewrite_from, tag_from_labels, to_apptainer_def)
from .reference import parse_reference
from .registry import RegistryClient, _credentials
from .runtimes.base import WORKDIR, Runtime, RuntimeContext, process_env

logger = logging.getLogger(__name__)

Progress = Callable[[Dict[str, Any]], None]


@dataclass(frozen=True)
class Recipe:
    """A recipe as found on disk: its Dockerfile and/or definition, and the tag it declares."""

    path: str
    dockerfile: Optional[str]
    definition: Optional[str]
    tag: str

    @property
    def context(self) -> str:
        return os.path.dirname(self.dockerfile or self.definition or self.path)


def read_recipe(path: str, tag: Optional[str] = None) -> Recipe:
    """Find the recipe files under ``path`` and the ``nsdf/NAME:vX.Y.Z`` tag it declares (or
    ``tag``, checked by the same rules)."""
    path = os.path.abspath(path)
    dockerfile, definition = find_recipe(path)
    if tag:
        name, sep, version = tag.rpartition(":")
        if not sep:
            raise SpecError(f"tag {tag!r} has no version: use nsdf/NAME:vX.Y.Z")
        final = image_name(name, check_version(version))
    elif dockerfile:
        with open(dockerfile, encoding="utf-8") as fh:
            final = tag_from_labels(labels(parse_dockerfile(fh.read())), where=dockerfile)
    else:
        assert definition is not None
        with open(definition, encoding="utf-8") as fh:
            final = tag_from_labels(def_labels(fh.read()), where=definition)
    return Recipe(path, dockerfile, definition, final)


def convert(path: str) -> str:
    """The Apptainer definition made from the recipe's Dockerfile (``nsdf-run recipe convert``)."""
    dockerfile, _ = find_recipe(os.path.abspath(path))
    if not dockerfile:
        raise SpecError(f"{path} has no Dockerfile to convert")
    with open(dockerfile, encoding="utf-8") as fh:
        return to_apptainer_def(fh.read(), source=os.path.basename(dockerfile))


class Mirrors:
    """FROM through the site's ``nsdf_registry`` and ``mirrors``, as pulls are; remembers
    whether a mirror used is plain HTTP (``insecure_registries``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.insecure = False
        self.mapped: List[Tuple[str, str]] = []

    def __call__(self, image: str) -> str:
        ref = parse_reference(image, nsdf_registry=self.settings.nsdf_registry)
        registry = self.settings.mirrors.get(ref.registry, ref.registry)
        if registry in self.settings.insecure_registries:
            self.insecure = True
        final = ref.on(registry)
        # unchanged when the builder would read the name the same way (docker.io, no mirror)
        mapped = image if parse_reference(image) == final else str(final)
        if mapped != image:
            self.mapped.append((image, mapped))
        return mapped


class BuildService:
    """Builds for one configuration: settings, environment, runner and the image service."""

    def __init__(self, settings: Settings, env: Mapping[str, str], runner: CommandRunner,
                 images: ImageService, host: Callable[[], Any], progress: Progress) -> None:
        self.settings = settings
        self.env = env
        self.runner = runner
        self.images = images
        self._host = host
        self.progress = progress

    def detect(self, only: Optional[Sequence[str]] = None, refresh: bool = False) -> List[BuilderInfo]:
        cache_file = None
        if self.settings.detect_cache:   # per user and host, like the runtimes' detection cache
            cache_file = os.path.join(user_state_dir(self.env),
                                      f"builders-{os.uname().nodename}-{os.getuid()}.json")
        return detect_builders(self.runner, self._host(), env=self.env, only=only,
                               timeout=self.settings.probe_timeout, cache_file=cache_file,
                               refresh=refresh)

    def choose(self, recipe: Recipe, *, builder: Optional[str], runtime: Optional[RuntimeChoice],
               runtime_order: Sequence[str] = ()) -> BuilderChoice:
        """``runtime``: asked for or configured (the builder must build for it); otherwise the
        first usable runtime of ``runtime_order`` with a usable builder is built for. A forced
        builder is probed alone, unless it is unusable (the error lists every builder)."""
        infos = None
        if builder:
            builder_class(builder)   # unknown name: ConfigError before any probe
            infos = self.detect(only=[builder])
            if not any(i.usable for i in infos):
                infos = None
        return choose_builder(infos or self.detect(), explicit=builder,
                              runtime=runtime.name if runtime else None,
                              runtime_source=runtime.source if runtime else "auto",
                              has_dockerfile=recipe.dockerfile is not None,
                              has_definition=recipe.definition is not None,
                              runtime_order=runtime_order)

    def _write_recipe(self, recipe: Recipe, b: Builder, work: str, mirrors: Mirrors
                      ) -> Tuple[str, Optional[str]]:
        """The recipe file the builder reads, written into ``work`` with FROM mirrored; and,
        when it was converted from the Dockerfile, that definition's text."""
        wants_def = b.reads[0] == DEFINITION or DOCKERFILE not in b.reads
        converted = None
        if wants_def:
            if recipe.dockerfile:
                text = convert(recipe.dockerfile)
            else:
                assert recipe.definition is not None
                with open(recipe.definition, encoding="utf-8") as fh:
                    text = fh.read()
            text, name = rewrite_def_from(text, mirrors), "recipe.def"
            # the definition apptainer reads: converted from the Dockerfile, FROM mirrored
            converted = text if recipe.dockerfile else None
        else:
            assert recipe.dockerfile is not None
            with open(recipe.dockerfile, encoding="utf-8") as fh:
                text, name = rewrite_from(fh.read(), mirrors), "Dockerfile"
        out = os.path.join(work, name)
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(text)
        return out, converted

    def build(self, rt: Runtime, choice: BuilderChoice, recipe: Recipe, *,
              dry_run: bool = False) -> BuildResult:
        """Build ``recipe`` with the chosen builder into ``rt``'s cache."""
        b = make_builder(choice, self.env)
        if b.runtime != rt.name:
            raise ImageError(f"builder {b.name} builds for {b.runtime}, not {rt.name}")
        cache = self.images.cache
        cache.ensure_dirs()
        token = hashlib.sha256(f"{recipe.tag}|{time.time()}|{os.getpid()}".encode()).hexdigest()
        work = cache.workdir(rt.name, f"sha256:{token}")
        try:
            mirrors = Mirrors(self.settings)
            file, converted = self._write_recipe(recipe, b, work, mirrors)
            job = BuildJob(recipe=file, context=recipe.context, tag=recipe.tag, workdir=work,
                           insecure=mirrors.insecure)
            plan = b.build_plan(job)
            argv = tuple(s.argv for s in plan.steps)
            base = dict(tag=recipe.tag, builder=b.name, runtime=rt.name, recipe=file,
                        definition=converted, argv=argv, choice=choice)
            if dry_run:
                rmtree(work)
                return BuildResult(**base, dry_run=True)
            for image, mapped in mirrors.mapped:
                self.progress({"event": "step", "step": f"FROM {image} -> {mapped} (site mirror)",
                               "image": recipe.tag})
            self._run(plan, rt, b, work, recipe)
            digest, location, relative, main_file, dirs = self._result(plan, work, b)
        except BaseException:
            rmtree(work)
            raise
        native = self.images.adopt_built(rt, work, digest, recipe.tag, location=location,
                                         relative=relative, main_file=main_file, dirs=dirs,
                                         builder=b.name)
        return BuildResult(**base, digest=digest, image=native)

    def _run(self, plan: BuildPlan, rt: Runtime, b: Builder, work: str, recipe: Recipe) -> None:
        env = process_env(self.env)
        env.update(rt.runtime_env(self.env, self.images.cache.root))
        for i, step in enumerate(plan.steps, 1):
            self.progress({"event": "step", "step": step.description, "index": i,
                           "total": len(plan.steps), "image": recipe.tag, "runtime": rt.name})
            overrides = {k: (v.replace(WORKDIR, work) if v else v) for k, v in step.env.items()}
            try:
                self.runner.run(step.argv, check=True, env=env, env_overrides=overrides,
                                cwd=recipe.context, timeout=step.timeout)
            except CommandError as err:
                raise ImageError(f"{b.name}: {step.description} failed:\n{err}") from err
            except ToolNotFoundError as err:
                raise ImageError(f"{b.name}: {step.description}: {err}") from err

    @staticmethod
    def _result(plan: BuildPlan, work: str, b: Builder
                ) -> Tuple[str, str, bool, Optional[str], List[str]]:
        """``(digest, location, relative, main_file, dirs)`` of what the steps made."""
        for name in ("Dockerfile", "recipe.def"):
            p = os.path.join(work, name)
            if os.path.exists(p):
                os.unlink(p)
        if plan.iidfile:
            try:
                with open(os.path.join(work, plan.iidfile), encoding="utf-8") as fh:
                    iid = fh.read().strip()
            except OSError as err:
                raise ImageError(f"{b.name} wrote no image id ({plan.iidfile}): {err}") from None
            os.unlink(os.path.join(work, plan.iidfile))
            hexid = iid.split(":", 1)[-1]
            if len(hexid) != 64:
                raise ImageError(f"{b.name} wrote an unexpected image id {iid!r}")
            return f"sha256:{hexid}", hexid, False, None, []
        assert plan.artifact is not None
        if plan.move:
            os.rename(os.path.join(work, plan.move[0]), os.path.join(work, plan.move[1]))
        for leftover in plan.cleanup:
            shutil.rmtree(os.path.join(work, leftover), ignore_errors=True)
        guard = plan.checksum or plan.artifact
        h = hashlib.sha256()
        with open(os.path.join(work, guard), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        dirs = [plan.artifact] if os.path.isdir(os.path.join(work, plan.artifact)) else []
        return f"sha256:{h.hexdigest()}", plan.artifact, True, guard, dirs

    # ---------------------------------------------------------------- push
    def push(self, tag: str, *, to: Optional[str] = None) -> PushResult:
        """Push the image built here as ``tag`` to its registry (``nsdf_registry`` for
        ``nsdf/...``) or to the registry ``to``. Credentials come from
        ``NSDF_HPC_REGISTRY_USER``/``_PASSWORD`` or ``~/.docker/config.json`` (handed to the
        pushing tool in a private temporary auth file), else from the tool's own auth files;
        they never appear in an argv, a log line or an error message."""
        source = self.images.parse_image(tag)
        if source.kind != "registry" or source.ref is None or source.ref.digest:
            raise SpecError(f"push takes a tag built here (nsdf/NAME:vX.Y.Z), not {tag!r}")
        ref = source.ref
        built = self.images.built_digests(ref)
        if not built:
            raise ImageError(f"{tag} was not built here: `nsdf-run build RECIPE` first")
        infos = [i for i in self.detect() if i.usable and i.runtime in built and builder_class(i.name).pushes]
        if not infos:
            can = [n for n in sorted({i.name for i in self.detect()}) if builder_class(n).pushes]
            raise ImageError(f"{tag} was built here for {', '.join(sorted(built))}; nsdf-run can push "
                             f"only images built with {', '.join(can) or 'nothing usable here'} for now")
        info = infos[0]
        b = builder_class(info.name)(info.path, info.version, RuntimeContext.current(self.env))
        entry = self.images.cache.lookup(info.runtime, built[info.runtime])
        if entry is None:
            raise ImageError(f"{tag}: the {info.runtime} cache entry {built[info.runtime]} is gone; "
                             "build it again")
        dest = ref.on(to) if to else ref
        destination = f"{dest.name}:{dest.tag}"
        insecure = dest.registry in self.settings.insecure_registries
        creds = _credentials(dest.registry, self.env)
        origin = ("NSDF_HPC_REGISTRY_USER/NSDF_HPC_REGISTRY_PASSWORD" if creds and
                  self.env.get("NSDF_HPC_REGISTRY_USER") else
                  "~/.docker/config.json" if creds else f"{b.name}'s own auth files")
        self.images.cache.ensure_dirs()
        tmp = tempfile.mkdtemp(prefix="push-", dir=os.path.join(self.images.cache.root, "tmp"))
        try:
            authfile = None
            if creds:
                authfile = os.path.join(tmp, "auth.json")
                token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
                atomic_write_json(authfile, {"auths": {dest.registry: {"auth": token}}})
                os.chmod(authfile, 0o600)
            digestfile = os.path.join(tmp, "digest")
            argv = b.push_argv(entry.location, destination, authfile=authfile, insecure=insecure,
                               digestfile=digestfile)
            push_env = b.push_env(*(creds or (None, None)))
            self.progress({"event": "step", "step": f"push to {destination}", "image": tag})
            try:
                self.runner.run(argv, check=True, env=process_env(self.env), env_overrides=push_env)
            except CommandError as err:
                text = (err.stderr or err.stdout).lower()
                # podman: "unauthorized: authentication required"; ch-image 0.31: "no further
                # authentication possible", or its "Username:" prompt hitting EOF on /dev/null
                if any(w in text for w in ("unauthorized", "authentication required", "denied",
                                           "no further authentication possible", "username: ")):
                    if not creds:
                        raise RegistryError(
                            f"registry {dest.registry} requires a login to push {destination}: set "
                            "NSDF_HPC_REGISTRY_USER/NSDF_HPC_REGISTRY_PASSWORD, or log in with "
                            "`podman login` / `docker login`") from None
                    raise RegistryError(f"registry {dest.registry} refused the credentials from "
                                        f"{origin} for {destination}") from None
                raise RegistryError(f"push of {tag} to {destination} failed:\n{err}") from None
            try:
                with open(digestfile, encoding="utf-8") as fh:
                    digest: Optional[str] = fh.read().strip() or None
            except OSError:   # the tool writes none (ch-image): ask the registry
                try:
                    digest = RegistryClient(dest.registry, insecure=insecure, env=self.env).manifest(dest).digest
                except RegistryError as err:
                    logger.debug("no digest for %s: %s", destination, err)
                    digest = None
        finally:
            rmtree(tmp)
        return PushResult(tag=tag, destination=destination, digest=digest, runtime=info.runtime,
                          credentials=origin)
