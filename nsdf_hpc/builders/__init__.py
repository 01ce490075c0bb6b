"""The builder registry: detection by probing, and the choice with its reasons.

Builders follow the runtime that will run the image: the built image goes straight into that
runtime's cache, so an automatic choice takes the first usable builder for the chosen runtime
(and for the recipe: only Apptainer builds from a definition file). ``--builder`` forces one;
an unusable forced builder is an error listing what was found, never a silent fallback.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type

from .._exec import CommandRunner, CompletedCommand
from ..errors import BuilderNotFoundError, ConfigError, NsdfError
from ..host import HostFacts
from ..models import BuilderChoice, BuilderInfo
from .._runtimes_answer import fingerprint
from ..runtimes import _load_cache, _save_cache
from ..runtimes.base import RuntimeContext, process_env
from .apptainer import ApptainerBuilder
from .base import DEFINITION, DOCKERFILE, Builder, BuildJob, BuildPlan
from .charliecloud import ChImageBuilder
from .podman import BuildahBuilder, PodmanBuilder

_REGISTRY: Dict[str, Type[Builder]] = {}


def register_builder(cls: Type[Builder]) -> Type[Builder]:
    """Class decorator/function: add a builder class under its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"builder {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (PodmanBuilder, BuildahBuilder, ChImageBuilder, ApptainerBuilder):
    register_builder(_cls)


def builder_names() -> List[str]:
    """Every known builder, in order of preference."""
    return [c.name for c in sorted(_REGISTRY.values(), key=lambda c: c.priority)]


def builder_class(name: str) -> Type[Builder]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown builder {name!r}; known: {', '.join(builder_names())}") from None


def full_capabilities(status: str, cap_last_cap: str) -> Optional[bool]:
    """Whether ``CapBnd`` in /proc/self/status has every capability up to the kernel's
    ``cap_last_cap`` (pure; None when either cannot be read)."""
    try:
        last = int(cap_last_cap.strip())
        bnd = next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapBnd:"))
    except (ValueError, StopIteration, IndexError):
        return None
    want = (1 << (last + 1)) - 1
    return bnd & want == want


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def detect_builders(runner: CommandRunner, host: HostFacts, *, env: Optional[Mapping[str, str]] = None,
                    timeout: float = 10.0, only: Optional[Sequence[str]] = None,
                    cache_file: Optional[str] = None, refresh: bool = False) -> List[BuilderInfo]:
    """Probe every registered builder (or those in ``only``) at once; one BuilderInfo each, in
    preference order. Never raises: a broken install is a note. The probes' output is cached
    in ``cache_file`` keyed by PATH and each binary's identity, as runtime detection is, so a
    warm detection starts no process (ch-image's probe alone is a Python start-up)."""
    env = os.environ if env is None else env
    path_env = env.get("PATH", os.defpath)
    classes = sorted((c for c in _REGISTRY.values() if not only or c.name in only), key=lambda c: c.priority)
    paths = {c.name: shutil.which(c.executables[0], path=path_env) for c in classes}
    todo = [c for c in classes if paths[c.name]]
    if only and cache_file:
        cache_file = f"{cache_file[:-5]}-{'-'.join(sorted(only))}.json"
    key = fingerprint([str(paths[c.name]) for c in todo], path_env, host.uid)
    probes = None if refresh else _load_cache(cache_file, key)
    if probes is None:
        probe_env = process_env(env, {"USER": env.get("USER") or host.user})
        argvs = [c(paths[c.name]).version_argv(str(paths[c.name])) for c in todo]
        results = runner.run_many(argvs, timeout=timeout, envs=[probe_env] * len(argvs)) if argvs else []
        probes = {}
        for c, res in zip(todo, results):
            if isinstance(res, CompletedCommand):
                probes[c.name] = {"rc": str(res.returncode), "stdout": res.stdout[-4000:],
                                  "stderr": res.stderr[-4000:]}
            else:
                probes[c.name] = {"error": str(res)}
        _save_cache(cache_file, key, probes)
    full_caps = full_capabilities(_read("/proc/self/status"), _read("/proc/sys/kernel/cap_last_cap"))
    infos: List[BuilderInfo] = []
    for c in classes:
        base: Dict[str, Any] = dict(name=c.name, runtime=c.runtime, reads=c.reads, priority=c.priority)
        path = paths[c.name]
        if not path:
            infos.append(BuilderInfo(**base, notes=(f"not found on PATH (looked for {c.executables[0]})",)))
            continue
        probe = probes.get(c.name, {"error": "not probed"})
        if "error" in probe:
            infos.append(BuilderInfo(**base, path=path, notes=(f"{path}: {probe['error']}",)))
            continue
        inst = c(path)
        try:
            version = inst.parse_version(probe.get("stdout", ""), probe.get("stderr", ""))
        except NsdfError as err:
            infos.append(BuilderInfo(**base, path=path, notes=(f"{path}: {str(err).splitlines()[0]}",)))
            continue
        a = inst.assess(host, full_caps)
        infos.append(BuilderInfo(**base, found=True, usable=a.usable, path=path, version=version,
                                 capabilities=a.capabilities, notes=a.notes))
    return infos


def choose_builder(infos: Sequence[BuilderInfo], *, explicit: Optional[str] = None,
                   runtime: Optional[str] = None, has_dockerfile: bool = True,
                   has_definition: bool = False, runtime_source: str = "auto",
                   runtime_order: Sequence[str] = ()) -> BuilderChoice:
    """Pick a builder: ``explicit`` (``--builder``), or the first usable one that reads the
    recipe at hand and builds for ``runtime`` (when one was asked for or configured), else for
    the first runtime of ``runtime_order`` (the usable runtimes, in NSDF's order) that has one.
    Raises BuilderNotFoundError listing what was found."""
    def reads(i: BuilderInfo) -> bool:
        return (has_dockerfile and DOCKERFILE in i.reads) or (has_definition and DEFINITION in i.reads)
    found = ", ".join(f"{i.name} {i.version}" + ("" if i.usable else " (unusable)")
                      for i in infos if i.found) or "nothing"
    if explicit:
        builder_class(explicit)
        info = next((i for i in infos if i.name == explicit), None)
        if info is None or not info.usable:
            why = "; ".join(info.notes) if info and info.notes else "not found"
            raise BuilderNotFoundError(f"builder {explicit!r} was requested (--builder) but cannot "
                                       f"be used: {why}\nbuilders found here: {found}")
        if not reads(info):
            raise ConfigError(f"builder {explicit} cannot build this recipe (it reads "
                              f"{', '.join(info.reads)})")
        if runtime and runtime != info.runtime:
            raise ConfigError(f"builder {explicit} builds for the {info.runtime} runtime, not "
                              f"{runtime} ({runtime_source})")
        rejected = {i.name: _why_not(i, f"{explicit} was requested (--builder)") for i in infos
                    if i.name != explicit}
        return BuilderChoice(name=explicit, source="argument", info=info, rejected=rejected)
    # automatic: the runtime's builders; with no runtime given, the runtimes in NSDF's order
    order = [runtime] if runtime else list(runtime_order)
    candidates = [i for i in infos if i.usable and reads(i) and i.runtime in order]
    candidates.sort(key=lambda i: (order.index(i.runtime), i.priority))
    if candidates:
        info = candidates[0]
        rejected = {}
        for other in infos:
            if other.name == info.name:
                continue
            if other.usable and runtime is not None and other.runtime != runtime:
                rejected[other.name] = (f"usable, but builds for {other.runtime}, and the runtime "
                                        f"is {runtime} ({runtime_source})")
            elif other.usable and not reads(other):
                rejected[other.name] = "usable, but cannot read this recipe"
            elif other.usable and other.runtime not in order:
                rejected[other.name] = f"usable, but the {other.runtime} runtime is not usable here"
            elif other.usable and other.runtime != info.runtime:
                rejected[other.name] = (f"usable, but {info.name} builds for {info.runtime}, which "
                                        "comes first in NSDF's order")
            else:
                rejected[other.name] = _why_not(other, f"{info.name} comes first")
        return BuilderChoice(name=info.name, source="auto", info=info, rejected=rejected)
    wanted = f" for the {runtime} runtime ({runtime_source})" if runtime else ""
    raise BuilderNotFoundError(f"no usable image builder{wanted} for this recipe; builders found "
                               f"here: {found}\n" + describe_builders(infos))


def _why_not(info: BuilderInfo, preferred: str) -> str:
    if not info.found:
        return "; ".join(info.notes) or "not found"
    if not info.usable:
        return "unusable: " + ("; ".join(info.notes) or "unknown reason")
    return f"usable, but {preferred}"


def make_builder(choice: BuilderChoice, env: Optional[Mapping[str, str]] = None) -> Builder:
    cls = builder_class(choice.name)
    return cls(choice.info.path, choice.info.version, RuntimeContext.current(env),
               choice.info.capabilities)


def describe_builders(infos: Sequence[BuilderInfo]) -> str:
    return "\n".join(f"  {i.name}: " + (f"{i.version} at {i.path}" if i.found else "not found")
                     + f" (builds for {i.runtime})" + (f"; {'; '.join(i.notes)}" if i.notes else "")
                     for i in infos)


__all__ = ["register_builder", "builder_names", "builder_class", "detect_builders", "choose_builder",
           "make_builder", "describe_builders", "Builder", "BuildJob", "BuildPlan"]
