"""Where things live: the XDG cache and config locations and the config files that apply.

Standard library only: the launch fast path (``_launch.py``) imports it before anything heavy.
"""
from __future__ import annotations

import os
# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Mapping, Optional, Sequence, Tuple

#: the site-wide config file (``NSDF_HPC_SITE_CONFIG`` overrides it, for tests and odd sites)
SITE_CONFIG = "/etc/nsdf-hpc/config.toml"
#: scratch variables that HPC centres set, in the order they are tried for the default cache
SCRATCH_VARS = ("SCRATCH", "PSCRATCH", "CSCRATCH")


def home_dir(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def xdg_cache_home(env: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME`` or ``~/.cache``."""
    return env.get("XDG_CACHE_HOME") or os.path.join(home_dir(env), ".cache")


def xdg_config_home(env: Mapping[str, str]) -> str:
    """``$XDG_CONFIG_HOME`` or ``~/.config``."""
    return env.get("XDG_CONFIG_HOME") or os.path.join(home_dir(env), ".config")


def site_config_file(env: Mapping[str, str]) -> str:
    return env.get("NSDF_HPC_SITE_CONFIG", SITE_CONFIG)


def user_config_file(env: Mapping[str, str]) -> str:
    return env.get("NSDF_HPC_CONFIG") or os.path.join(xdg_config_home(env), "nsdf-hpc", "config.toml")


def candidate_config_files(env: Mapping[str, str]) -> List[str]:
    """Site file first, user file last, whether they exist or not."""
    return [site_config_file(env), user_config_file(env)]


def default_cache_dir(env: Mapping[str, str]) -> str:
    """``$SCRATCH/nsdf-hpc`` when a scratch filesystem is set, else ``$XDG_CACHE_HOME/nsdf-hpc``."""
    for var in SCRATCH_VARS:
        if env.get(var) and os.path.isdir(env[var]):
            return os.path.join(env[var], "nsdf-hpc")
    return os.path.join(xdg_cache_home(env), "nsdf-hpc")


def user_state_dir(env: Mapping[str, str]) -> str:
    """Per-user, per-machine files that describe this host (the detection cache)."""
    return os.path.join(xdg_cache_home(env), "nsdf-hpc")


def split_bind(text: str) -> Tuple[str, str, bool]:
    """``SRC``, ``SRC:DST``, ``SRC:DST:ro`` or ``SRC:DST:rw`` -> (source made absolute, the
    destination as given or the source, read-only). ``ValueError`` says what is wrong. One
    reading for ``models.Bind.parse`` and the launch fast path (``_launch.py``)."""
    parts = text.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts[2]
        if mode not in ("ro", "rw"):
            raise ValueError(f"option must be 'ro' or 'rw', got {mode!r}")
    elif len(parts) > 3:
        raise ValueError("expected SRC[:DST[:ro|rw]] (paths containing ':' need the Python API)")
    if not parts[0]:
        raise ValueError("empty source")
    source = os.path.abspath(os.path.expanduser(parts[0]))
    target = (parts[1] if len(parts) > 1 else "") or source
    if not target.startswith("/"):
        raise ValueError(f"destination {target!r} must be absolute")
    return source, target, mode == "ro"


def make_run_scratch(env: Mapping[str, str]) -> Tuple[str, str]:
    """A name and a new private directory (mode 0700) unique to one run, for a runtime's orphan
    guard (``Runtime.orphan_guard``); the caller removes the directory. The first temporary
    directory that takes it, in ``tempfile.gettempdir``'s order (``TMPDIR``, ``TEMP``, ``TMP``,
    ``/tmp``, ``/var/tmp``, ``/usr/tmp``, the current directory), without importing tempfile
    (the launch fast path makes one). Raises ``OSError`` when none does."""
    error: OSError = FileNotFoundError("no temporary directory")
    for base in [*(env[k] for k in ("TMPDIR", "TEMP", "TMP") if env.get(k)), "/tmp", "/var/tmp", "/usr/tmp", "."]:
        for _ in range(10):   # another run's name: try another
            try:   # a relative one, or the current directory, which may be gone
                d = os.path.join(os.path.abspath(base), f"nsdf-run-{os.urandom(6).hex()}")
            except OSError as err:
                error = err
                break
            try:
                os.mkdir(d, 0o700)
            except FileExistsError as err:
                error = err
                continue
            except OSError as err:   # not there, not writable: the next directory
                error = err
                break
            return f"nsdf-{os.getpid()}-{os.urandom(4).hex()}", d
    raise error


def remove_files_and_dir(d: str, names: Optional[Sequence[str]] = None) -> None:
    """Unlink ``names`` in ``d`` (None: every entry, files only: a run's scratch directory of
    :func:`make_run_scratch` with podman's ``--cidfile`` and ``--pidfile``), then remove ``d``
    if that left it empty; as far as possible, never raising."""
    if names is None:
        try:
            names = os.listdir(d)
        except OSError:
            names = []
    for name in names:
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass
    try:
        os.rmdir(d)
    except OSError:
        pass
