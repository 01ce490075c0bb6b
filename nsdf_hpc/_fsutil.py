"""The one atomic file write (a private temp file in the same directory, then
``os.replace``), and paths inside an image's root filesystem.

Standard library only: the launch fast path imports it.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict


def load_toml(path: str) -> Dict[str, Any]:
    """A TOML file's table (tomllib, or tomli before Python 3.11). Raises ``OSError``, and
    ``ValueError`` for a file that is not TOML or not UTF-8 text (``tomllib.TOMLDecodeError``
    and ``UnicodeDecodeError`` are both ValueErrors)."""
    if sys.version_info >= (3, 11):
        import tomllib   # noqa: PLC0415 (not on the launch path)
    else:  # pragma: no cover - exercised on 3.9/3.10
        import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]   # noqa: PLC0415
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def atomic_write_json(path: str, data: Any, *, fsync: bool = False, indent: Any = None,
                      make_dirs: bool = True) -> None:
    """Write ``data`` as JSON to ``path``, atomically (:func:`atomic_write`)."""
    atomic_write(path, json.dumps(data, indent=indent).encode("utf-8", "surrogateescape"), fsync=fsync,
                 make_dirs=make_dirs)


def atomic_write(path: str, data: bytes, *, fsync: bool = False, make_dirs: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part of
    one. The temp file is removed on any failure; ``OSError`` propagates.

    ``fsync`` flushes the data before the rename (cache metadata that must survive a crash).
    """
    d = os.path.dirname(path) or "."
    if make_dirs:
        os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


#: symlinks followed resolving one path in a root filesystem (Linux's own limit)
MAX_LINKS = 40


def resolve_in_root(root: str, rel: str, follow_last: bool = False) -> str:
    """The host path of ``rel`` inside ``root``, following symlinks as if ``root`` were ``/``
    (an absolute link target starts again at ``root``; ``..`` stops at it). ``ValueError``
    for more than ``MAX_LINKS`` links or a path that ends outside ``root``."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    cur = root
    links = 0
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "..":
            cur = os.path.dirname(cur) if cur != root else root
            i += 1
            continue
        nxt = os.path.join(cur, part)
        last = i == len(parts) - 1
        if os.path.islink(nxt) and (not last or follow_last):
            links += 1
            if links > MAX_LINKS:
                raise ValueError(f"too many symlinks resolving {rel}")
            target = os.readlink(nxt)
            rest = parts[i + 1:]
            if target.startswith("/"):
                cur = root
            parts = [p for p in target.split("/") if p not in ("", ".")] + rest
            i = 0
            continue
        cur = nxt
        i += 1
    if not (cur == root or cur.startswith(root.rstrip("/") + "/")):
        raise ValueError(f"layer path {rel!r} escapes the root filesystem")
    return cur
