"""What ``nsdf-run images`` shows, made without click or pydantic.

The rows and the table are built here once, for the click command (``cli/images.py``) and for
the read-only fast path of ``_entry.py``: a bare ``nsdf-run images`` or ``nsdf-run images
--json`` is answered from the cache's own files, without importing the library's settings
models (about 0.3 s of imports on a login node for a listing of a few files).

The fast path needs the cache directories, which come from the settings. It takes them from a
stamp that the click command writes after it built its client (``remember_valid_settings``):
the validated ``cache_dir`` and ``site_cache_dirs``, with what they were made from (the config
files' text and the ``NSDF_HPC_*`` variables). When that still matches, the listing needs
neither the settings models nor a TOML parser; otherwise (no stamp, a changed file or
variable, an odd value, any error) the click command answers, and reports an invalid
setting as every other command does. The same stamp, each in its own file, holds the Slurm
settings for the fast path of ``nsdf-run status`` (``_status.py``) and the kept answer of
``nsdf-run runtimes`` (``_runtimes_answer.py``).
"""
from __future__ import annotations

import json
import os
import stat
import time
# not `from typing import ...` at run time: this module is on the start-up path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

    from .cache import Entry

from ._version import __version__
from .paths import candidate_config_files, user_state_dir

#: the bare command lines the fast path answers (a global option or another one goes to click)
FAST_ARGS = (["images"], ["images", "--json"])


def human(n: int) -> str:
    """Bytes for people: 512 B, 1.5 KiB, ... TiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def image_rows(entries: Iterable[Entry], ok: Callable[[Entry], bool]) -> List[Dict[str, Any]]:
    """One row per cache entry (``images --json`` prints these), ``ok`` telling whether the
    entry is intact (the stat check, or the full re-hash of ``--verify``)."""
    rows: List[Dict[str, Any]] = []
    for e in entries:
        platform = e.data.get("platform")
        rows.append({"runtime": e.runtime, "digest": e.digest, "source": e.data.get("source"),
                     "platform": platform if isinstance(platform, str) and platform else None,
                     "location": e.location, "size": e.size(), "last_use": e.last_use(),
                     "tier": e.tier, "ok": ok(e)})
    return rows


def image_output(rows: List[Dict[str, Any]], root: str, as_json: bool) -> str:
    """The whole standard output of ``nsdf-run images``: the JSON rows, the table, or the line
    saying the cache ``root`` is empty."""
    if as_json:
        return json.dumps(rows, indent=2) + "\n"
    if not rows:
        return f"no cached images in {root}\n"
    lines = [f"{'RUNTIME':<13} {'PLATFORM':<13} {'DIGEST':<19} {'SIZE':>9}  {'LAST USE':<16} SOURCE"]
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_use"]))
        flag = "" if r["ok"] else "  [BROKEN]"
        # "-": an entry made before platforms were recorded, or from an archive
        lines.append(f"{r['runtime']:<13} {r['platform'] or '-':<13} {r['digest'][:19]:<19} "
                     f"{human(r['size']):>9}  {when:<16} "
                     f"{r['source']}{' (site)' if r['tier'] == 'site' else ''}{flag}")
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------ the fast path's stamp

#: the stamps' files in the user's state directory: the cache directories (``images``), the
#: Slurm settings (``status``, ``_status.py``) and the kept runtimes answer (``_runtimes_answer.py``)
STAMP_FILES = {"images": "settings-valid", "slurm": "slurm-valid", "runtimes": "runtimes-valid"}


def _stamp_path(env: Mapping[str, str], name: str = "images") -> str:
    return os.path.join(user_state_dir(env), STAMP_FILES[name])


def _referenced(text: str) -> List[str]:
    """The variable names a config file's text names as ``$NAME`` or ``${NAME}`` (a
    ``cache_dir`` is expanded with them; a name in a comment only costs a needless miss)."""
    names: List[str] = []
    i = text.find("$")
    while i != -1:
        j = i + 1 + (text[i + 1:i + 2] == "{")
        k = j
        while k < len(text) and (text[k].isalnum() or text[k] == "_"):
            k += 1
        if k > j:
            names.append(text[j:k])
        i = text.find("$", k)
    return names


def _regular_file_text(path: str) -> Optional[str]:
    """The text of a regular file (the first MiB: the text itself, not its mtime, so an edit
    within the clock's tick still counts); None for anything else. Opened without blocking:
    ``NSDF_HPC_CONFIG`` naming a FIFO must not hang the listing (the click path says it is
    not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fh.read(1 << 20).decode("utf-8", "surrogateescape")


def settings_stamp(env: Mapping[str, str]) -> str:
    """What the validated settings were made from: nsdf-hpc's version, each candidate config
    file's text (the first MiB) or absence, every ``NSDF_HPC_*`` variable (but the one that
    turns the fast paths off), ``HOME`` and every variable the files name (``cache_dir =
    "$SCRATCH/nsdf"`` on a home directory that two clusters share)."""
    parts: List[Any] = [__version__, os.getuid()]
    names = {"HOME"}
    for path in candidate_config_files(env):
        text = _regular_file_text(path)
        parts.append([path, text])
        if text:
            names.update(_referenced(text))
    parts.append(sorted((k, v) for k, v in env.items()
                        if (k.startswith("NSDF_HPC_") and k != "NSDF_HPC_NO_FAST_PATH") or k in names))
    return json.dumps(parts)


def remember_valid(env: Mapping[str, str], name: str, values: Mapping[str, Any]) -> None:
    """Called with the values a full path validated (best effort: a read-only home only
    means the next call takes the full path again)."""
    path = _stamp_path(env, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({**values, "key": settings_stamp(env)}, fh)
        os.replace(tmp, path)
    except (OSError, ValueError):   # ValueError: a path json cannot write (a lone surrogate)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def validated(env: Mapping[str, str], name: str) -> Optional[Dict[str, Any]]:
    """The values :func:`remember_valid` saved, when what they were made from still matches;
    else None."""
    try:
        with open(_stamp_path(env, name), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != settings_stamp(env):
        return None
    return data


def remember_valid_settings(env: Mapping[str, str], cache_dir: Optional[str],
                            site_cache_dirs: Sequence[str]) -> None:
    """The cache directories of the settings the click command validated."""
    remember_valid(env, "images", {"cache_dir": cache_dir, "site_cache_dirs": list(site_cache_dirs)})


def _validated_dirs(env: Mapping[str, str]) -> Optional[Tuple[Optional[str], Tuple[str, ...]]]:
    """``(cache_dir, site_cache_dirs)`` from the stamp when it still matches, else None."""
    data = validated(env, "images")
    if data is None:
        return None
    cache_dir, tiers = data.get("cache_dir"), data.get("site_cache_dirs")
    if not (cache_dir is None or isinstance(cache_dir, str)) or not isinstance(tiers, list) \
            or not all(isinstance(t, str) for t in tiers):
        return None
    return cache_dir, tuple(tiers)


def fast_images(args: List[str], env: Mapping[str, str]) -> Optional[str]:
    """The whole output of ``nsdf-run images [--json]`` when it can be made without the
    settings models, else None: the click command then answers (and reports any error)."""
    if args not in FAST_ARGS:
        return None
    try:
        dirs = _validated_dirs(env)
        if dirs is None:
            return None
        from .cache import ImageCache   # noqa: PLC0415
        from .paths import default_cache_dir   # noqa: PLC0415
        cache = ImageCache(dirs[0] or default_cache_dir(env), dirs[1])
        return image_output(image_rows(cache.entries(), cache.check), cache.root, "--json" in args)
    except Exception:   # noqa: BLE001 - the click command answers instead, and says what is wrong
        return None
