"""The one atomic file write: a private temp file in the same directory, then ``os.replace``.

Standard library only: the launch fast path imports it.
"""
from __future__ import annotations

import json
import os
import secrets
# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def atomic_write_json(path: str, data: Any, *, fsync: bool = False, indent: Any = None,
                      make_dirs: bool = True) -> None:
    """Write ``data`` as JSON to ``path`` so that readers see the old or the new file, never a
    part of one. The temp file is removed on any failure; ``OSError`` propagates.

    ``fsync`` flushes the data before the rename (cache metadata that must survive a crash).
    """
    d = os.path.dirname(path) or "."
    if make_dirs:
        os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as fh:
            json.dump(data, fh, indent=indent)
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
