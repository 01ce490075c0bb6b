"""What ``nsdf-run images`` shows, made without click or pydantic.

The rows and the table are built here once, for the click command (``cli/images.py``) and for
the read-only fast path of ``_entry.py``: a bare ``nsdf-run images`` or ``nsdf-run images
--json`` is answered from the cache's own files, without importing the library's settings
models (about 0.3 s of imports on a login node for a listing of a few files).

The fast path needs the cache directories, which come from the config files and ``NSDF_HPC_*``
(``_config_files.merged_values``), not yet validated. It trusts them only when the settings
last validated by the full path are still the same: ``cli/images.py`` writes a stamp (the
config files' text and the ``NSDF_HPC_*`` variables) after the click command built its
client, so an invalid setting keeps failing as it does for every other command. Any doubt (no
stamp, a changed file, an odd value, any error) leaves the answer to the click command.
"""
from __future__ import annotations

import json
import os
import time
# not `from typing import ...` at run time: this module is on the start-up path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

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

def _stamp_path(env: Mapping[str, str]) -> str:
    return os.path.join(user_state_dir(env), "settings-valid")


def settings_stamp(env: Mapping[str, str]) -> str:
    """What the validity of the settings depends on: nsdf-hpc's version, each candidate config
    file's text (the first MiB) or absence, and every ``NSDF_HPC_*`` variable (but the
    one that turns the fast paths off)."""
    parts: List[Any] = [__version__, os.getuid()]
    for path in candidate_config_files(env):
        try:   # the text itself, not its mtime: an edit within the clock's tick still counts
            with open(path, "rb") as fh:
                parts.append([path, fh.read(1 << 20).decode("utf-8", "surrogateescape")])
        except OSError:
            parts.append([path, None])
    parts.append(sorted((k, v) for k, v in env.items()
                        if k.startswith("NSDF_HPC_") and k != "NSDF_HPC_NO_FAST_PATH"))
    return json.dumps(parts)


def remember_valid_settings(env: Mapping[str, str]) -> None:
    """Called after the full path validated the settings (best effort: a read-only home only
    means the next listing takes the full path again)."""
    path = _stamp_path(env)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="ascii") as fh:
            fh.write(settings_stamp(env))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _settings_still_valid(env: Mapping[str, str]) -> bool:
    try:
        with open(_stamp_path(env), encoding="ascii", errors="replace") as fh:
            return fh.read() == settings_stamp(env)
    except OSError:
        return False


def fast_images(args: List[str], env: Mapping[str, str]) -> Optional[str]:
    """The whole output of ``nsdf-run images [--json]`` when it can be made without the
    settings models, else None: the click command then answers (and reports any error)."""
    if args not in FAST_ARGS or not _settings_still_valid(env):
        return None
    try:
        from ._config_files import merged_values   # noqa: PLC0415
        from .cache import ImageCache   # noqa: PLC0415
        from .paths import default_cache_dir   # noqa: PLC0415
        values, _, _ = merged_values(env)
        cache_dir = values.get("cache_dir")
        tiers = values.get("site_cache_dirs", ())
        if not (cache_dir is None or isinstance(cache_dir, str)) or not isinstance(tiers, (list, tuple)) \
                or not all(isinstance(t, str) for t in tiers):
            return None
        cache = ImageCache(cache_dir or default_cache_dir(env), tuple(tiers))
        return image_output(image_rows(cache.entries(), cache.check), cache.root, "--json" in args)
    except Exception:   # noqa: BLE001 - the click command answers instead, and says what is wrong
        return None
