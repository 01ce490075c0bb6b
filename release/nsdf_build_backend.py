"""PEP 517 build backend: setuptools, with an sdist and a wheel that do not depend on the checkout.

setuptools (82) writes the sdist with each file's mtime, owner and mode as the checkout has
them, and a gzip header stamped with the time of the build, so two builds of one commit differ
(checked: only mtimes differed). Its wheel already takes its timestamps from
``SOURCE_DATE_EPOCH`` and sorts its entries, but copies each file's mode, which follows the
umask of whoever unpacked the sdist.

This wraps ``setuptools.build_meta`` and rewrites what it makes:

* sdist: members sorted by name, owner 0:0 without names, mode 0644 (0755 for directories and
  executables), every mtime ``SOURCE_DATE_EPOCH``; gzip with no file name and that mtime;
* wheel: mode 0644 (0755 for executables) on every entry, same order, same timestamps.

Without ``SOURCE_DATE_EPOCH`` the mtimes stay as setuptools wrote them. To build a release:
``SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) python -m build``.

It lives outside the package (``backend-path`` in pyproject.toml) and ships in the sdist
(MANIFEST.in) so the wheel can be built from the sdist.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
import zipfile
from typing import Dict, Optional

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every other PEP 517 hook, unchanged)

ConfigSettings = Optional[Dict[str, object]]


def _epoch() -> Optional[int]:
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(value) if value else None


def _mode(mode: int, is_dir: bool) -> int:
    return 0o755 if is_dir or mode & 0o111 else 0o644


def normalise_sdist(path: str, epoch: Optional[int]) -> None:
    """Rewrite the .tar.gz at PATH in place, as the module docstring says."""
    with tarfile.open(path, "r:gz") as src:
        members = sorted(src.getmembers(), key=lambda m: m.name)
        data = {m.name: src.extractfile(m).read() for m in members if m.isfile()}  # type: ignore[union-attr]
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=epoch or 0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as dst:
            for m in members:
                m.uid = m.gid = 0
                m.uname = m.gname = ""
                m.mode = _mode(m.mode, m.isdir())
                m.pax_headers = {}
                if epoch is not None:
                    m.mtime = epoch
                dst.addfile(m, io.BytesIO(data[m.name]) if m.isfile() else None)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out.getvalue())
    os.replace(tmp, path)


def normalise_wheel(path: str) -> None:
    """Rewrite the wheel at PATH in place with normalised modes (order and times kept)."""
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    tmp = path + ".tmp"
    with zipfile.ZipFile(tmp, "w") as dst:
        for info, payload in entries:
            is_dir = info.filename.endswith("/")
            new = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            new.compress_type = info.compress_type
            new.external_attr = (_mode(info.external_attr >> 16, is_dir) | (0o040000 if is_dir else 0o100000)) << 16
            dst.writestr(new, payload)
    os.replace(tmp, path)


def build_sdist(sdist_directory: str, config_settings: ConfigSettings = None) -> str:
    name: str = _setuptools.build_sdist(sdist_directory, config_settings)
    normalise_sdist(os.path.join(sdist_directory, name), _epoch())
    return name


def build_wheel(wheel_directory: str, config_settings: ConfigSettings = None,
                metadata_directory: Optional[str] = None) -> str:
    name: str = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    normalise_wheel(os.path.join(wheel_directory, name))
    return name
