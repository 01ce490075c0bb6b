"""Offline image archives without any external tool: read docker-archive, oci-archive and
OCI layouts; flatten their layers into a root filesystem; repack for udocker.

Flattening follows the OCI layer rules (``.wh.NAME`` deletes, ``.wh..wh..opq`` empties a
directory) and resolves every path *inside* the new root, chroot-style, so that a layer's
absolute symlink (``bin -> /usr/bin``) can never make a later file land on the host.
Device nodes are skipped (an unprivileged user cannot create them; runtimes bind /dev).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from contextlib import ExitStack
from typing import IO, Any, List, Optional, Tuple

from ._fsutil import MAX_LINKS as _MAX_LINKS, resolve_in_root
from .errors import ImageError
from .reference import ImageSource


class _Archive:
    """Blob access for one offline source."""

    def __init__(self, source: ImageSource, stack: ExitStack) -> None:
        self.source = source
        assert source.path
        self.tar: Optional[tarfile.TarFile] = None
        if source.kind in ("docker-archive", "oci-archive"):
            try:
                self.tar = stack.enter_context(tarfile.open(source.path, "r:*"))
            except (OSError, tarfile.TarError) as err:
                raise ImageError(f"cannot read {source.text}: {err}") from None

    def open(self, name: str) -> IO[bytes]:
        if self.tar is None:
            path = os.path.join(self.source.path or "", name)
            try:
                return open(path, "rb")
            except OSError as err:
                raise ImageError(f"{self.source.text}: missing {name} ({err.strerror})") from None
        member = self._member(name)
        f = self.tar.extractfile(member)
        if f is None:
            raise ImageError(f"{self.source.text}: {name} is not a file")
        return f

    def _member(self, name: str, depth: int = 0) -> tarfile.TarInfo:
        assert self.tar is not None
        name = os.path.normpath(name).lstrip("./") if name.startswith("./") else os.path.normpath(name)
        try:
            m = self.tar.getmember(name)
        except KeyError:
            try:
                m = self.tar.getmember("./" + name)
            except KeyError:
                raise ImageError(f"{self.source.text}: missing {name}") from None
        if m.issym() and depth < _MAX_LINKS:   # skopeo writes <id>/layer.tar as a symlink
            return self._member(os.path.join(os.path.dirname(name), m.linkname), depth + 1)
        return m

    def read_json(self, name: str) -> object:
        with self.open(name) as fh:
            try:
                return json.loads(fh.read())
            except ValueError as err:
                raise ImageError(f"{self.source.text}: {name} is not JSON: {err}") from None


def _blob(digest: str) -> str:
    alg, _, hexd = digest.partition(":")
    return f"blobs/{alg}/{hexd}"


def _oci_manifest(arc: _Archive) -> Tuple[str, dict]:
    chosen, doc = _oci_descriptor(arc)
    return str(chosen["digest"]), doc


def _oci_descriptor(arc: _Archive) -> Tuple[dict, dict]:
    """The index entry (descriptor) of the image manifest ``arc.source`` names, and the
    manifest; a nested index is resolved to its linux/amd64 entry."""
    index = arc.read_json("index.json")
    if not isinstance(index, dict) or not index.get("manifests"):
        raise ImageError(f"{arc.source.text}: index.json lists no manifest")
    want = arc.source.layout_ref
    chosen = None
    for m in index["manifests"]:
        ref = (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        if want is None or ref == want:
            chosen = m
            break
    if chosen is None:
        raise ImageError(f"{arc.source.text}: no manifest tagged {want!r} in index.json")
    doc = arc.read_json(_blob(chosen["digest"]))
    if isinstance(doc, dict) and "manifests" in doc:   # nested index: take linux/amd64
        sub = next((m for m in doc["manifests"]
                    if (m.get("platform") or {}).get("architecture") in ("amd64", None)), None)
        if sub is None:
            raise ImageError(f"{arc.source.text}: no linux/amd64 manifest")
        chosen, doc = sub, arc.read_json(_blob(sub["digest"]))
    assert isinstance(doc, dict)
    return dict(chosen), doc


def source_digest(source: ImageSource) -> str:
    """A content digest for an offline source: the OCI manifest digest, or for a
    docker-archive the image id (its config digest)."""
    with ExitStack() as stack:
        arc = _Archive(source, stack)
        if source.kind == "docker-archive":
            manifest = arc.read_json("manifest.json")
            if not isinstance(manifest, list) or not manifest:
                raise ImageError(f"{source.text}: manifest.json is empty")
            config = manifest[0]["Config"]
            with arc.open(config) as fh:
                return "sha256:" + hashlib.sha256(fh.read()).hexdigest()
        digest, _ = _oci_manifest(arc)
        return digest


def _layers(arc: _Archive) -> Tuple[dict, List[str]]:
    if arc.source.kind == "docker-archive":
        manifest = arc.read_json("manifest.json")
        assert isinstance(manifest, list)
        config = arc.read_json(manifest[0]["Config"])
        return dict(config) if isinstance(config, dict) else {}, list(manifest[0]["Layers"])
    _, doc = _oci_manifest(arc)
    config = arc.read_json(_blob(doc["config"]["digest"]))
    return dict(config) if isinstance(config, dict) else {}, [_blob(x["digest"]) for x in doc["layers"]]


def _open_layer(fh: IO[bytes]) -> tarfile.TarFile:
    head = fh.read(4)
    rest = fh
    stream: Any
    if head[:2] == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=_Prefixed(head, rest))
    elif head == b"\x28\xb5\x2f\xfd":
        raise ImageError("zstd-compressed layers are not supported for offline conversion; "
                         "convert the archive with gzip layers (skopeo copy --dest-compress-format gzip)")
    else:
        stream = _Prefixed(head, rest)
    return tarfile.open(fileobj=stream, mode="r|")


class _Prefixed(io.RawIOBase):
    def __init__(self, prefix: bytes, rest: IO[bytes]) -> None:
        self.prefix, self.rest = prefix, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        if self.prefix:
            n = min(len(b), len(self.prefix))
            b[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        data = self.rest.read(len(b))
        b[:len(data)] = data
        return len(data)


def _resolve(root: str, rel: str, follow_last: bool = False) -> str:
    """The host path of ``rel`` inside ``root``, following symlinks as if ``root`` were ``/``."""
    try:
        return resolve_in_root(root, rel, follow_last)
    except ValueError as err:
        raise ImageError(str(err)) from None


def _remove(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path, onerror=lambda *_: None)


def _apply_layer(layer: tarfile.TarFile, root: str) -> None:
    for m in layer:
        name = m.name.lstrip("/")
        if name.startswith("./"):
            name = name[2:]
        if not name or name == ".":
            continue
        base = os.path.basename(name)
        parent_rel = os.path.dirname(name)
        if base == ".wh..wh..opq":
            d = _resolve(root, parent_rel, follow_last=True)
            if os.path.isdir(d):
                for child in os.listdir(d):
                    _remove(os.path.join(d, child))
            continue
        if base.startswith(".wh."):
            _remove(os.path.join(_resolve(root, parent_rel, follow_last=True), base[4:]))
            continue
        parent = _resolve(root, parent_rel, follow_last=True)
        os.makedirs(parent, exist_ok=True)
        dest = os.path.join(parent, base)
        if m.isdir():
            if os.path.lexists(dest) and not os.path.isdir(dest):
                _remove(dest)
            os.makedirs(dest, exist_ok=True)
            os.chmod(dest, (m.mode & 0o7777) | stat.S_IRWXU)
            continue
        if os.path.lexists(dest) and not (os.path.isdir(dest) and not os.path.islink(dest) and m.isdir()):
            _remove(dest)
        if m.isreg():
            src = layer.extractfile(m)
            assert src is not None
            with open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.chmod(dest, (m.mode & 0o7777) | stat.S_IRUSR | stat.S_IWUSR)
        elif m.issym():
            os.symlink(m.linkname, dest)
        elif m.islnk():
            target = _resolve(root, m.linkname.lstrip("/"))
            try:
                os.link(target, dest)
            except OSError:
                shutil.copy2(target, dest)
        # character/block devices and FIFOs are skipped: runtimes provide /dev


def flatten(source: ImageSource, root: str) -> dict:
    """Unpack every layer of ``source`` into ``root``; returns the image config."""
    os.makedirs(root, exist_ok=True)
    with ExitStack() as stack:
        arc = _Archive(source, stack)
        config, layers = _layers(arc)
        for name in layers:
            with arc.open(name) as fh, _open_layer(fh) as layer:
                _apply_layer(layer, root)
    return config


def write_charliecloud_metadata(root: str, config: dict) -> None:
    """``/ch/environment`` so that ``ch-run --set-env`` applies the image's ENV."""
    env = (config.get("config") or {}).get("Env") or []
    os.makedirs(os.path.join(root, "ch"), exist_ok=True)
    with open(os.path.join(root, "ch", "environment"), "w") as fh:
        for line in env:
            fh.write(f"{line}\n")


#: the tag every repacked OCI image gets: ``udocker load`` takes the tag from the index's
#: ``org.opencontainers.image.ref.name`` (a random one when there is none), and the plan then
#: creates the container from ``nsdf/<key>:latest`` whatever the source was tagged
UDOCKER_TAG = "latest"
_REF_NAME = "org.opencontainers.image.ref.name"


def _udocker_index(arc: _Archive) -> bytes:
    """A one-entry ``index.json``: the manifest the source names, tagged :data:`UDOCKER_TAG`."""
    chosen, _ = _oci_descriptor(arc)
    entry = dict(chosen)
    entry["annotations"] = {**(chosen.get("annotations") or {}), _REF_NAME: UDOCKER_TAG}
    index = {"schemaVersion": 2, "manifests": [entry]}
    return json.dumps(index).encode()


def _add_bytes(out: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    out.addfile(info, io.BytesIO(data))


def repack_for_udocker(source: ImageSource, dest: str) -> None:
    """A tar that ``udocker load`` accepts: docker-archives with real ``layer.tar`` files
    (udocker 1.3.17 fails on skopeo's symlinks), OCI layouts and archives as an oci-archive
    whose index lists only the chosen manifest, tagged :data:`UDOCKER_TAG` (udocker 1.3.17
    registers an untagged entry under a random tag, and a ``:v1`` one as ``:v1``)."""
    assert source.path
    with ExitStack() as stack:
        out = stack.enter_context(tarfile.open(dest, "w"))
        if source.kind == "oci-dir":
            index = _udocker_index(_Archive(source, stack))
            for entry in sorted(os.listdir(source.path)):
                if entry != "index.json":
                    out.add(os.path.join(source.path, entry), arcname=entry)
            _add_bytes(out, "index.json", index)
            return
        tin = stack.enter_context(tarfile.open(source.path, "r:*"))
        if source.kind == "oci-archive":
            index = _udocker_index(_Archive(source, stack))
            for m in tin:
                if os.path.normpath(m.name) == "index.json":
                    continue
                out.addfile(m, tin.extractfile(m) if m.isreg() else None)
            _add_bytes(out, "index.json", index)
            return
        members = {m.name: m for m in tin.getmembers()}
        for m in members.values():
            real = m
            depth = 0
            while real.issym() and depth < _MAX_LINKS:
                target = os.path.normpath(os.path.join(os.path.dirname(real.name), real.linkname))
                if target not in members:
                    break
                real = members[target]
                depth += 1
            if real.isreg():
                info = tarfile.TarInfo(m.name)
                info.size, info.mode, info.mtime = real.size, real.mode, real.mtime
                out.addfile(info, tin.extractfile(real))
            else:
                out.addfile(m, tin.extractfile(m) if m.isreg() else None)
