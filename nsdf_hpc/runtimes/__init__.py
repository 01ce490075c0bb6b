"""The runtime registry: detection by probing, and the choice with its reasons.

Detection runs every version probe at once with a timeout, never raises, and caches what the
probes said, keyed by PATH and the identity (inode, size, mtime) of every binary found, so a
warm detection starts no process. Host facts (user namespaces, /dev/fuse, subuid) are read
fresh each time: they are cheap and can change. How executables are found and the cache's key
live in ``_runtimes_answer.py``, without the runtime classes: ``nsdf-run runtimes`` keeps its
answer with what a detection was made from (:func:`detection_inputs`) and checks it there.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

from .._fsutil import atomic_write_json
from .._runtimes_answer import find_candidates, fingerprint, inputs
from .._exec import CommandRunner, CompletedCommand
from ..errors import ConfigError, NsdfError, RuntimeNotFoundError
from ..host import HostFacts, probe_host
from ..models import RuntimeChoice, RuntimeInfo
from .apptainer import Apptainer, Singularity
from .base import Runtime
from .charliecloud import Charliecloud
from .podman import Podman, PodmanHPC
from .shifter import Shifter
from .udocker import UDocker

logger = logging.getLogger(__name__)

_REGISTRY: Dict[str, Type[Runtime]] = {}


def register_runtime(cls: Type[Runtime]) -> Type[Runtime]:
    """Class decorator/function: add a runtime class under its ``name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"runtime {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (Apptainer, Singularity, Charliecloud, Shifter, PodmanHPC, Podman, UDocker):
    register_runtime(_cls)


def runtime_names() -> List[str]:
    """Every known runtime, in NSDF's order of preference."""
    return [c.name for c in sorted(_REGISTRY.values(), key=lambda c: c.priority)]


def runtime_class(name: str) -> Type[Runtime]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown runtime {name!r}; known: {', '.join(runtime_names())}") from None


def _candidates(cls: Type[Runtime], configured: Mapping[str, str],
                path_env: Optional[str]) -> Tuple[List[str], List[str]]:
    return find_candidates(configured.get(cls.name), cls.preferred_candidates(), cls.executables,
                           os.environ.get("PATH", os.defpath) if path_env is None else path_env)


def _load_cache(path: Optional[str], key: str) -> Optional[Dict[str, Dict[str, str]]]:
    if not path:
        return None
    try:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("key") == key:
            return dict(data["probes"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _save_cache(path: Optional[str], key: str, probes: Mapping[str, Mapping[str, str]]) -> None:
    if not path:
        return
    try:
        atomic_write_json(path, {"key": key, "probes": probes})
    except OSError as err:  # a read-only cache dir must not break detection
        logger.debug("cannot write detection cache %s: %s", path, err)


def detect_all(runner: CommandRunner, *, env: Optional[Mapping[str, str]] = None,
               runtime_paths: Optional[Mapping[str, str]] = None, timeout: float = 10.0,
               cache_file: Optional[str] = None, host: Optional[HostFacts] = None,
               refresh: bool = False, only: Optional[Sequence[str]] = None) -> List[RuntimeInfo]:
    """Probe every registered runtime (or those in ``only``); one RuntimeInfo each, in
    preference order."""
    env = os.environ if env is None else env
    host = host or probe_host(env)
    path_env = env.get("PATH", os.defpath)
    classes = sorted((c for c in _REGISTRY.values() if not only or c.name in only), key=lambda c: c.priority)
    if only and cache_file:
        cache_file = f"{cache_file[:-5]}-{'-'.join(sorted(only))}.json"
    cands: Dict[str, Tuple[List[str], List[str]]] = {
        c.name: _candidates(c, runtime_paths or {}, path_env) for c in classes}
    all_paths = [p for paths, _ in cands.values() for p in paths]
    key = fingerprint(all_paths, path_env, host.uid)
    probes = None if refresh else _load_cache(cache_file, key)
    if probes is None:
        probes = {}
        todo: List[Tuple[str, List[str], Dict[str, str]]] = []
        for c in classes:
            for p in cands[c.name][0]:
                pk = f"{c.name}|{p}"
                inst = c(p)
                todo.append((pk, inst.version_argv(p), inst.probe_env(env)))
        results = runner.run_many([t[1] for t in todo], timeout=timeout, envs=[t[2] for t in todo]) if todo else []
        for (pk, _argv, _env), res in zip(todo, results):
            if isinstance(res, CompletedCommand):
                probes[pk] = {"rc": str(res.returncode), "stdout": res.stdout[-4000:], "stderr": res.stderr[-4000:]}
            else:
                probes[pk] = {"error": str(res)}
        _save_cache(cache_file, key, probes)
    infos: List[RuntimeInfo] = []
    for c in classes:
        paths, notes = cands[c.name]
        info = _assess_one(c, paths, list(notes), probes, host)
        infos.append(info)
    return infos


def _assess_one(cls: Type[Runtime], paths: Sequence[str], notes: List[str],
                probes: Mapping[str, Mapping[str, str]], host: HostFacts) -> RuntimeInfo:
    if not paths:
        if not notes:
            notes.append(f"not found on PATH (looked for {', '.join(cls.executables)})")
        return RuntimeInfo(name=cls.name, notes=tuple(notes), priority=cls.priority)
    for p in paths:
        probe = probes.get(f"{cls.name}|{p}", {"error": "not probed"})
        inst = cls(p)
        if "error" in probe:
            notes.append(f"{p}: {probe['error']}")
            continue
        try:
            flavour, version = inst.parse_version(probe.get("stdout", ""), probe.get("stderr", ""))
        except NsdfError as err:
            text = str(err).splitlines()[-1] if "not " in str(err).splitlines()[-1] else str(err).splitlines()[0]
            notes.append(f"{p}: {text}")
            continue
        if probe.get("rc") not in ("0", None) and cls.probe_status_matters:
            notes.append(f"{p}: `--version` exited with status {probe['rc']}")
        a = inst.assess(host, version, flavour)
        return RuntimeInfo(name=cls.name, found=True, usable=a.usable, path=p, flavour=flavour,
                           version=version, capabilities=a.capabilities,
                           notes=tuple(notes) + a.notes, priority=cls.priority)
    return RuntimeInfo(name=cls.name, found=False, path=paths[0], notes=tuple(notes), priority=cls.priority)


def choose(infos: Sequence[RuntimeInfo], *, explicit: Optional[str] = None,
           configured: Optional[str] = None, configured_source: str = "config") -> RuntimeChoice:
    """Pick a runtime: explicit > NSDF_HPC_RUNTIME/config (``configured``) > automatic.

    An explicit or configured runtime that is unusable is an error listing what was found;
    there is never a silent fallback. Only the automatic choice walks NSDF's order.
    """
    by_name = {i.name: i for i in infos}
    wanted, source = (explicit, "argument") if explicit else (configured, configured_source)
    if wanted:
        if wanted not in _REGISTRY:
            raise ConfigError(f"unknown runtime {wanted!r} ({source}); known: {', '.join(runtime_names())}")
        info = by_name.get(wanted)
        if info is None or not info.usable:
            why = "; ".join(info.notes) if info and info.notes else "not found"
            raise RuntimeNotFoundError(
                f"runtime {wanted!r} was requested ({source}) but cannot be used: {why}\n"
                f"found here: {_found_summary(infos)}")
        rejected = {i.name: _why_not(i, f"{wanted} was requested ({source})") for i in infos if i.name != wanted}
        return RuntimeChoice(name=wanted, source=source, info=info, rejected=rejected)
    usable = [i for i in sorted(infos, key=lambda i: i.priority) if i.usable]
    if not usable:
        raise RuntimeNotFoundError(
            "no usable container runtime found. Install udocker (`pip install udocker`, it needs "
            "no privileges) or load your site's apptainer module.\n" + describe_all(infos))
    best = usable[0]
    rejected = {i.name: _why_not(i, f"{best.name} comes first in NSDF's order") for i in infos if i.name != best.name}
    return RuntimeChoice(name=best.name, source="auto", info=best, rejected=rejected)


def detection_inputs(infos: Sequence[RuntimeInfo], *, env: Mapping[str, str],
                     runtime_paths: Mapping[str, str], host: HostFacts,
                     cache_file: Optional[str]) -> Optional[Dict[str, Any]]:
    """What a detection of every runtime (``infos``) was made from, as plain data (the kept
    answer of ``nsdf-run runtimes``: ``_runtimes_answer.py``); None when a runtime found
    cannot name the files its assessment reads."""
    files: List[str] = []
    names: List[str] = []
    for info in infos:
        if info.found and info.path:
            read = _REGISTRY[info.name](info.path).assessment_inputs()
            if read is None:
                return None
            files += read[0]
            names += read[1]
    classes = sorted(_REGISTRY.values(), key=lambda c: c.priority)
    lookups = [(runtime_paths.get(c.name), c.preferred_candidates(), c.executables) for c in classes]
    return inputs(lookups, env.get("PATH", os.defpath), dataclasses.asdict(host), files, names, env,
                  cache_file)


def _why_not(info: RuntimeInfo, preferred: str) -> str:
    if not info.found:
        return "; ".join(info.notes) or "not found"
    if not info.usable:
        return "unusable: " + ("; ".join(info.notes) or "unknown reason")
    return f"usable, but {preferred}"


def _found_summary(infos: Sequence[RuntimeInfo]) -> str:
    parts = [f"{i.name} {i.version}" + ("" if i.usable else " (unusable)") for i in infos if i.found]
    return ", ".join(parts) or "nothing"


def describe_all(infos: Sequence[RuntimeInfo]) -> str:
    return "\n".join(f"  {i.name}: " + (f"{i.version} at {i.path}" if i.found else "not found")
                     + (f" ({'; '.join(i.notes)})" if i.notes else "") for i in infos)


__all__ = ["register_runtime", "runtime_names", "runtime_class", "detect_all", "choose",
           "describe_all", "detection_inputs", "Runtime"]
