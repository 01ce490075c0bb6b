"""Settings: defaults < site file < user file < ``NSDF_HPC_*`` environment < explicit values.

``load_settings`` is a pure function of its inputs (``env`` is passed in), so tests never
monkeypatch. Files are TOML::

    runtime = "apptainer"                      # force a runtime (default: automatic)
    cache_dir = "/scratch/$USER/nsdf-cache"
    site_cache_dirs = ["/sw/nsdf/images"]      # read-only tiers, checked first
    nsdf_registry = "docker.io"                # where nsdf/NAME:vX.Y.Z lives
    insecure_registries = ["127.0.0.1:5000"]   # plain HTTP
    pull_on_compute = false                    # inside a Slurm allocation, never pull
    [mirrors]
    "docker.io" = "mirror.site.edu"
    [runtime_paths]
    apptainer = "/opt/apptainer/bin/apptainer"
    [env]
    allow = ["MY_SITE_*"]                      # added to the built-in allowlist
    deny = ["SECRET_*"]                        # added to the built-in denylist
    [slurm]                                    # SlurmSettings (load_slurm_settings)
    work_dir = "/scratch/$USER/nsdf-jobs"      # or NSDF_HPC_SLURM_DIR; shared filesystem
    accounting = "auto"                        # auto | sacct | none (or NSDF_HPC_SLURM_ACCOUNTING)
    partition = "debug"
    account = "proj42"
    extra_directives = ["--mail-type=END"]
    poll_cap = 15.0
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

from pydantic import Field, PositiveFloat, PositiveInt, ValidationError

from . import paths
from ._fsutil import load_toml
from .errors import ConfigError
from .paths import candidate_config_files
from .environment import DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY
from .models import Model

SITE_CONFIG = paths.SITE_CONFIG

class Settings(Model):
    """Effective configuration; ``sources`` tells where each set value came from."""

    runtime: Optional[str] = None
    runtime_paths: Dict[str, str] = Field(default_factory=dict)
    cache_dir: Optional[str] = None
    site_cache_dirs: Tuple[str, ...] = ()
    nsdf_registry: str = "docker.io"
    mirrors: Dict[str, str] = Field(default_factory=dict)
    insecure_registries: Tuple[str, ...] = ()
    env_allow: Tuple[str, ...] = DEFAULT_ENV_ALLOW
    env_deny: Tuple[str, ...] = DEFAULT_ENV_DENY
    pull_on_compute: bool = False
    probe_timeout: float = 10.0
    detect_cache: bool = True
    #: ``run`` reuses a tag's digest resolved less than this many seconds ago (no registry
    #: request); ``pull`` always asks the registry. 0 = always ask.
    tag_ttl: float = 300.0
    #: a registry request (ours, not a runtime's pull) that gets no answer for this many
    #: seconds fails; 429, 5xx, resets and timeouts are tried ``registry_attempts`` times in
    #: all, waiting about ``registry_backoff`` * 2**n s (with jitter, at most 30 s) between
    registry_timeout: float = Field(default=30.0, gt=0)
    registry_attempts: int = Field(default=4, ge=1, le=20)
    registry_backoff: float = Field(default=1.0, ge=0)
    #: a runtime's own pull (apptainer/ch-image/udocker pull) whose processes read and write
    #: nothing for this many seconds is stopped (a registry that hangs mid-blob), then retried
    pull_stall_timeout: float = Field(default=300.0, gt=0)
    sources: Dict[str, str] = Field(default_factory=dict)
    files: Tuple[str, ...] = ()


def _read_toml(path: str) -> Dict[str, Any]:
    try:
        return load_toml(path)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:   # tomllib decodes the bytes itself, before parsing
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): "
                          "save it as UTF-8") from err
    except ValueError as err:   # tomllib.TOMLDecodeError
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err


_FILE_KEYS = {"runtime", "runtime_paths", "cache_dir", "site_cache_dirs", "nsdf_registry",
              "mirrors", "insecure_registries", "pull_on_compute", "probe_timeout", "env",
              "detect_cache", "tag_ttl", "registry_timeout", "registry_attempts", "registry_backoff",
              "pull_stall_timeout"}


def _key_names(keys: Any) -> str:
    """Keys for a one-line message: bare keys as written, any other (a quoted TOML key with a
    newline or a space) as a Python literal."""
    return ", ".join(k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else repr(k)
                     for k in sorted(keys))


def _merge_file(values: Dict[str, Any], sources: Dict[str, str], data: Mapping[str, Any],
                path: str) -> None:
    unknown = set(data) - _FILE_KEYS - {"slurm"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {_key_names(unknown)}; "
                          f"known: {', '.join(sorted(_FILE_KEYS))}")
    for key, value in data.items():
        if key == "slurm":
            continue
        if key == "env":
            # [env] allow/deny ADD to the built-in lists (an MPI job still needs SLURM_*,
            # PMI*, OMP_*...); replace = true makes the file's lists replace them instead
            keys = {"allow", "deny", "replace"}
            if not isinstance(value, dict) or set(value) - keys:
                raise ConfigError(f"{path}: [env] takes 'allow' and 'deny' lists (and 'replace')")
            replace = value.get("replace", False)
            if not isinstance(replace, bool):
                raise ConfigError(f"{path}: [env] replace must be true or false")
            defaults = {"allow": DEFAULT_ENV_ALLOW, "deny": DEFAULT_ENV_DENY}
            for sub in ("allow", "deny"):
                if sub in value:
                    items = value[sub]
                    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                        raise ConfigError(f"{path}: [env] {sub} must be a list of strings")
                    base = () if replace else tuple(values.get(f"env_{sub}", defaults[sub]))
                    values[f"env_{sub}"] = base + tuple(x for x in items if x not in base)
                    sources[f"env_{sub}"] = f"config:{path}"
            continue
        if key in ("mirrors", "runtime_paths") and isinstance(value, dict):
            values[key] = {**values.get(key, {}), **value}
        elif key == "cache_dir" and isinstance(value, str):
            values[key] = os.path.expandvars(os.path.expanduser(value))
        else:
            values[key] = value
        sources[key] = f"config:{path}"


def config_files(env: Mapping[str, str]) -> List[str]:
    """The config files that apply, site first, user last (existing ones only)."""
    files = [p for p in candidate_config_files(env) if p and os.path.isfile(p)]
    if env.get("NSDF_HPC_CONFIG") and not os.path.isfile(env["NSDF_HPC_CONFIG"]):
        what = "is not a file" if os.path.exists(env["NSDF_HPC_CONFIG"]) else "does not exist"
        raise ConfigError(f"NSDF_HPC_CONFIG={env['NSDF_HPC_CONFIG']} {what}")
    return files


def load_settings(env: Optional[Mapping[str, str]] = None, files: Optional[List[str]] = None,
                  **overrides: Any) -> Settings:
    """Build :class:`Settings` from defaults, config files, ``NSDF_HPC_*`` and ``overrides``."""
    env = os.environ if env is None else env
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    files = config_files(env) if files is None else files
    for path in files:
        _merge_file(values, sources, _read_toml(path), path)
    if env.get("NSDF_HPC_RUNTIME"):
        values["runtime"] = env["NSDF_HPC_RUNTIME"]
        sources["runtime"] = "env:NSDF_HPC_RUNTIME"
    if env.get("NSDF_HPC_CACHE"):
        values["cache_dir"] = env["NSDF_HPC_CACHE"]
        sources["cache_dir"] = "env:NSDF_HPC_CACHE"
    if env.get("NSDF_HPC_PULL_ON_COMPUTE"):
        values["pull_on_compute"] = env["NSDF_HPC_PULL_ON_COMPUTE"].lower() in ("1", "true", "yes")
        sources["pull_on_compute"] = "env:NSDF_HPC_PULL_ON_COMPUTE"
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
            sources[key] = "argument"
    try:
        return Settings(**values, sources=sources, files=tuple(files))
    except ValidationError as err:   # one line naming the key and where its value came from
        e = err.errors()[0]
        key = ".".join(_key_names([str(x)]) for x in e.get("loc", ())) or "?"
        where = sources.get(key.split(".")[0], "default")
        raise ConfigError(f"invalid setting {key} ({where}): {e.get('msg')}") from None


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """``$SCRATCH/nsdf-hpc`` when a scratch filesystem is set, else ``$XDG_CACHE_HOME/nsdf-hpc``."""
    return Path(paths.default_cache_dir(env))


def cache_dir(settings: Settings, env: Mapping[str, str]) -> Path:
    return Path(settings.cache_dir) if settings.cache_dir else default_cache_dir(env)


class SlurmSettings(Model):
    """``[slurm]`` in the config files, ``NSDF_HPC_SLURM_*`` variables, then arguments."""

    work_dir: str = ""                  # "" only when built directly: load_slurm_settings fills it
    accounting: Literal["auto", "sacct", "none"] = "auto"
    poll_initial: PositiveFloat = 0.5
    poll_cap: PositiveFloat = 15.0
    partition: Optional[str] = None
    account: Optional[str] = None
    extra_directives: Tuple[str, ...] = ()
    submit_retries: PositiveInt = 6
    command_timeout: PositiveFloat = 60.0
    #: which backend talks to Slurm: auto (pyslurm when it matches, else the commands),
    #: commands, pyslurm, or rest (slurmrestd; only when asked for)
    backend: Literal["auto", "commands", "pyslurm", "rest"] = "auto"
    #: slurmrestd's URL for backend = "rest" (or SLURMRESTD_URL); the token is SLURM_JWT
    rest_url: Optional[str] = None
    #: an Executor starts its next ``sbatch`` ahead, waiting for the script on stdin
    #: (``Slurm.start_ahead``; or NSDF_HPC_SLURM_SUBMIT_AHEAD=0)
    submit_ahead: bool = True
    #: where each set value came from ("env:NSDF_HPC_SLURM_DIR", "config:PATH", "argument")
    sources: Dict[str, str] = Field(default_factory=dict)

    @classmethod
    def load(cls, env: Optional[Mapping[str, str]] = None, files: Optional[Sequence[str]] = None,
             **overrides: Any) -> "SlurmSettings":
        """Same as :func:`load_slurm_settings`."""
        return load_slurm_settings(env, files, **overrides)

    def source(self, key: str) -> str:
        """Where ``key`` came from, for messages: ``NSDF_HPC_SLURM_DIR``, a file, ``default``."""
        where = self.sources.get(key, "default")
        return where[4:] if where.startswith("env:") else where


_SLURM_ENV = {"work_dir": "NSDF_HPC_SLURM_DIR", "accounting": "NSDF_HPC_SLURM_ACCOUNTING",
              "backend": "NSDF_HPC_SLURM_BACKEND", "rest_url": "SLURMRESTD_URL",
              "submit_ahead": "NSDF_HPC_SLURM_SUBMIT_AHEAD"}


def load_slurm_settings(env: Optional[Mapping[str, str]] = None, files: Optional[Sequence[str]] = None,
                        **overrides: Any) -> SlurmSettings:
    """:class:`SlurmSettings` from defaults < ``[slurm]`` tables < ``NSDF_HPC_SLURM_*`` < ``overrides``.

    A bad value is one ConfigError line naming the key and where it came from.
    """
    env = os.environ if env is None else env
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    for path in (config_files(env) if files is None else files):
        table = _read_toml(path).get("slurm", {})
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [slurm] must be a table")
        values.update(table)
        sources.update({k: f"config:{path}" for k in table})
    for key, var in _SLURM_ENV.items():
        if env.get(var):
            values[key] = env[var]
            sources[key] = f"env:{var}"
    for key, value in overrides.items():
        if value is not None:
            values[key] = value
            sources[key] = "argument"
    known = set(SlurmSettings.model_fields) - {"sources"}
    unknown = set(values) - known
    if unknown:
        files_named = sorted({sources.get(k, "argument").replace("config:", "") for k in unknown})
        raise ConfigError(f"unknown [slurm] setting(s) {_key_names(unknown)} (in {', '.join(files_named)}); "
                          f"known: {', '.join(sorted(known))}")
    if isinstance(values.get("extra_directives"), list):
        values["extra_directives"] = tuple(values["extra_directives"])
    if not values.get("work_dir"):
        home = env.get("HOME") or os.path.expanduser("~")
        values["work_dir"] = os.path.join(home, ".nsdf-hpc", "jobs")
    elif isinstance(values["work_dir"], str):
        raw = values["work_dir"]
        try:
            values["work_dir"] = os.path.abspath(os.path.expanduser(os.path.expandvars(raw)))
        except OSError as err:   # a relative path, in a directory that was removed
            raise ConfigError(f"Slurm work_dir {raw!r} (from {sources.get('work_dir', 'default')}) is "
                              f"relative, and the current directory cannot be read ({err.strerror}): "
                              "give an absolute path") from None
    try:
        return SlurmSettings(**values, sources=sources)
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(_key_names([str(x)]) for x in e.get("loc", ())) or "?"
        where = sources.get(key.split(".")[0], "default")
        raise ConfigError(f"invalid Slurm setting {key}={values.get(key.split('.')[0])!r} "
                          f"(from {where}): {e.get('msg')}") from None


def work_dir_follows_cwd(settings: SlurmSettings, env: Mapping[str, str]) -> bool:
    """Whether ``settings.work_dir`` was a relative path (made absolute from the current
    directory): the fast path of ``nsdf-run status`` then uses it only in the same directory."""
    where = settings.sources.get("work_dir", "default")
    if where.startswith("env:"):
        raw = env.get(where[4:], "")
    elif where.startswith("config:"):
        table = _read_toml(where[7:]).get("slurm", {})
        raw = table.get("work_dir", "") if isinstance(table, dict) else ""
    elif where == "default":
        raw = env.get("HOME") or os.path.expanduser("~")
    else:                       # an argument: relative or not, it is not remembered
        return True
    return not (isinstance(raw, str) and os.path.isabs(os.path.expanduser(os.path.expandvars(raw))))
