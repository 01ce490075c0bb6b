"""The container environment contract, identical on every runtime (pure).

The container starts clean; it gets the host variables that match the allowlist and none
that match the denylist, then the explicit ``--env`` values (which win over both). The image's
own ENV (PATH, LANG, ...) is applied by the runtime underneath.
"""
from __future__ import annotations

# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False

if TYPE_CHECKING:   # kept off the launch fast path (nsdf_hpc/_launch.py)
    from typing import Any, Dict, List, Mapping, Sequence, Tuple

#: Host variables that reach the container (fnmatch patterns); configurable.
DEFAULT_ENV_ALLOW: Tuple[str, ...] = (
    "SLURM_*", "SLURMD_*", "SRUN_*", "PMI*", "PMIX_*", "OMPI_*", "MPI_*", "I_MPI_*", "MPICH_*",
    "UCX_*", "FI_*", "NCCL_*", "HWLOC_*", "OMP_*", "*_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL",
    "TERM", "LANG", "LC_*", "TZ", "USER", "LOGNAME", "HOME", "http_proxy", "https_proxy",
    "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
)
#: Host variables that never reach the container, even when allowed or set on purpose by a
#: pattern; an explicit ``--env`` value still wins (the user asked for it).
DEFAULT_ENV_DENY: Tuple[str, ...] = (
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "LD_LIBRARY_PATH",
    "LD_PRELOAD", "LD_AUDIT", "CONDA_*", "_CE_*", "VIRTUAL_ENV", "PIPENV_*", "PYENV_*",
    "R_LIBS*", "PERL5LIB", "MODULEPATH", "LOADEDMODULES", "_LMFILES_", "BASH_FUNC_*",
    "APPTAINER*", "SINGULARITY*", "PROMPT_COMMAND", "PS1", "NSDF_HPC_*",
)

#: Host variables a runtime *process* needs to work (not what the container sees).
PROCESS_ENV_KEEP: Tuple[str, ...] = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "TMPDIR", "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "http_proxy", "https_proxy", "no_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "DBUS_SESSION_BUS_ADDRESS",
    "CONTAINERS_CONF", "CONTAINERS_REGISTRIES_CONF", "CONTAINERS_STORAGE_CONF", "REGISTRY_AUTH_FILE",
)


def dq_escape(value: str) -> str:
    r"""Escape ``value`` for the inside of a shell double-quoted string (``\ $ ` "``)."""
    return "".join("\\" + c if c in '\\$`"' else c for c in value)


_COMPILED: dict = {}


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``fnmatchcase`` against any of ``patterns``. Patterns of literal characters and ``*``
    (all of the defaults) are matched with string methods; only one with ``?`` or ``[``
    loads ``re`` (the launch fast path filters every host variable with these: ``re`` and
    the ``enum`` it imports cost ~12 ms there, 35 separate fnmatch patterns ~5 ms)."""
    key = tuple(patterns)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _compile_globs(key)
    exact, prefixes, suffixes, general, rx = compiled
    return (name in exact or name.startswith(prefixes) or name.endswith(suffixes)
            or any(_star_match(name, parts) for parts in general)
            or (rx is not None and rx.match(name) is not None))


def _compile_globs(patterns: Sequence[str]) -> Tuple[Any, ...]:
    """(exact names, ``P*`` prefixes, ``*S`` suffixes, the parts of other ``*`` patterns, a
    regex of the patterns with ``?`` or ``[`` or None)."""
    exact, prefixes, suffixes, general, others = set(), [], [], [], []
    for p in patterns:
        if "?" in p or "[" in p:
            others.append(p)
        elif "*" not in p:
            exact.add(p)
        else:
            parts = p.split("*")
            if len(parts) == 2 and not parts[1]:
                prefixes.append(parts[0])
            elif len(parts) == 2 and not parts[0]:
                suffixes.append(parts[1])
            else:
                general.append(tuple(parts))
    rx = None
    if others:
        import re   # noqa: PLC0415 (only for such patterns)
        from fnmatch import translate   # noqa: PLC0415
        rx = re.compile("|".join(f"(?:{translate(p)})" for p in others))
    return frozenset(exact), tuple(prefixes), tuple(suffixes), tuple(general), rx


def _star_match(name: str, parts: Sequence[str]) -> bool:
    """``name`` against a pattern split at its ``*``s (at least two parts): the first part
    starts it, the last ends it, and the others appear in order between them (leftmost
    first is enough: ``*`` takes any run of characters)."""
    first, last = parts[0], parts[-1]
    if len(name) < len(first) + len(last) or not name.startswith(first) or not name.endswith(last):
        return False
    pos, end = len(first), len(name) - len(last)
    for part in parts[1:-1]:
        i = name.find(part, pos, end)
        if i < 0:
            return False
        pos = i + len(part)
    return True


class EnvEncoding:
    """How one runtime carries the container environment: the one encoding used alike by
    runs, launch records (``_launch.py``) and Slurm batch scripts.

    * ``"argv"``: ``flag K=V`` word pairs on the command line (Podman, UDocker ``-e``);
    * ``"prefix"``: process variables ``prefix + K`` (Apptainer's ``APPTAINERENV_K``), values
      escaped for a shell's double quotes when ``escape`` (a version without ``--no-eval``);
    * ``"process"``: the runtime's own process environment is the container's (ch-run,
      Shifter copy theirs in).

    A plain class, not a dataclass: the launch fast path imports this module.
    """

    __slots__ = ("mode", "flag", "prefix", "escape")

    def __init__(self, mode: str, flag: str = "", prefix: str = "", escape: bool = False) -> None:
        if mode not in ("argv", "prefix", "process"):
            raise ValueError(f"unknown environment encoding {mode!r}")
        self.mode, self.flag, self.prefix, self.escape = mode, flag, prefix, escape

    def __repr__(self) -> str:
        return f"EnvEncoding({self.mode!r}, flag={self.flag!r}, prefix={self.prefix!r}, escape={self.escape})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnvEncoding) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash((self.mode, self.flag, self.prefix, self.escape))

    def as_dict(self) -> Dict[str, object]:
        return {"mode": self.mode, "flag": self.flag, "prefix": self.prefix, "escape": self.escape}

    def argv_words(self, cenv: Mapping[str, str]) -> List[str]:
        """The command-line words that carry ``cenv`` (empty unless mode is "argv")."""
        if self.mode != "argv":
            return []
        words: List[str] = []
        for k, v in cenv.items():
            words += [self.flag, f"{k}={v}"]
        return words

    def process_env(self, static: Mapping[str, str], cenv: Mapping[str, str]) -> Dict[str, str]:
        """The runtime process's environment: ``static`` plus what carries ``cenv``."""
        out = dict(static)
        if self.mode == "prefix":
            for k, v in cenv.items():
                out[self.prefix + k] = dq_escape(v) if self.escape else v
        elif self.mode == "process":
            out.update(cenv)
        return out


def container_env(host_env: Mapping[str, str], explicit: Mapping[str, str],
                  allow: Sequence[str], deny: Sequence[str]) -> Dict[str, str]:
    """The variables the container sees (before the image's ENV)."""
    env = {k: v for k, v in host_env.items()
           if matches(k, allow) and not matches(k, deny) and "\0" not in v}
    env.update(explicit)
    return env


#: Variables whose values are host directories the MPI launcher outside the container shares
#: with each rank: Slurm's PMIx server directory and its shared-memory stores (``srun
#: --mpi=pmix``). Open MPI makes its session directory there, so a rank must see them at the
#: same path; on a read-only image (Charliecloud, Apptainer without /var/tmp) it fails without.
LAUNCHER_DIR_VARS: Tuple[str, ...] = (
    "PMIX_SERVER_TMPDIR", "PMIX_DSTORE_21_BASE_PATH", "PMIX_DSTORE_ESH_BASE_PATH",
)


def launcher_dirs(env: Mapping[str, str]) -> List[str]:
    """The launcher's directories named by ``env`` (pure): absolute, normalised, each once,
    none inside another one of the list (the PMIx stores usually live in the server's)."""
    import posixpath

    found: List[str] = []
    for name in LAUNCHER_DIR_VARS:
        value = env.get(name, "")
        if not value.startswith("/") or "\0" in value or ":" in value or "," in value:
            continue    # not a path a bind can carry (':' and ',' separate bind fields)
        path = posixpath.normpath(value)
        if path != "/" and path not in found:
            found.append(path)
    return [p for p in found if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in found)]
