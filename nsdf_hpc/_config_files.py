"""The config files and ``NSDF_HPC_*`` variables merged into plain values, before validation.

Standard library only (no pydantic): ``config.load_settings`` validates these values into
``Settings``, and the read-only fast path of ``nsdf-run images`` (``_listing.py``) reads the
cache directories from them without the models.
"""
from __future__ import annotations

import os
import sys
# not `from typing import ...` at run time: this module is on the start-up path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Mapping, Optional, Tuple

from .environment import DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY
from .errors import ConfigError
from .paths import candidate_config_files


def read_toml(path: str) -> Dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.9/3.10
        import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    except UnicodeDecodeError as err:   # tomllib decodes the bytes itself, before parsing
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}): "
                          "save it as UTF-8") from err


_FILE_KEYS = {"runtime", "runtime_paths", "cache_dir", "site_cache_dirs", "nsdf_registry",
              "mirrors", "insecure_registries", "pull_on_compute", "probe_timeout", "env",
              "detect_cache", "tag_ttl", "registry_timeout", "registry_attempts", "registry_backoff",
              "pull_stall_timeout"}


def key_names(keys: Any) -> str:
    """Keys for a one-line message: bare keys as written, any other (a quoted TOML key with a
    newline or a space) as a Python literal."""
    return ", ".join(k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else repr(k)
                     for k in sorted(keys))


def _merge_file(values: Dict[str, Any], sources: Dict[str, str], data: Mapping[str, Any],
                path: str) -> None:
    unknown = set(data) - _FILE_KEYS - {"slurm"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {key_names(unknown)}; "
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


def merged_values(env: Mapping[str, str], files: Optional[List[str]] = None,
                  overrides: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, Any], Dict[str, str], List[str]]:
    """The settings' values before validation: config files (site, then user), then
    ``NSDF_HPC_*``, then ``overrides`` (None values skipped); with where each came from and the
    files read. ``config.load_settings`` validates them into ``Settings``."""
    values: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    files = config_files(env) if files is None else files
    for path in files:
        _merge_file(values, sources, read_toml(path), path)
    if env.get("NSDF_HPC_RUNTIME"):
        values["runtime"] = env["NSDF_HPC_RUNTIME"]
        sources["runtime"] = "env:NSDF_HPC_RUNTIME"
    if env.get("NSDF_HPC_CACHE"):
        values["cache_dir"] = env["NSDF_HPC_CACHE"]
        sources["cache_dir"] = "env:NSDF_HPC_CACHE"
    if env.get("NSDF_HPC_PULL_ON_COMPUTE"):
        values["pull_on_compute"] = env["NSDF_HPC_PULL_ON_COMPUTE"].lower() in ("1", "true", "yes")
        sources["pull_on_compute"] = "env:NSDF_HPC_PULL_ON_COMPUTE"
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
            sources[key] = "argument"
    return values, sources, files
