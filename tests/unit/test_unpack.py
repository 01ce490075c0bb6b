"""Flattening docker-archive and OCI layouts: whiteouts, opaque dirs, hardlinks, and layers
that try to write outside the root filesystem."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import pytest

from nsdf_hpc.errors import ImageError
from nsdf_hpc.reference import parse_source
from nsdf_hpc.unpack import flatten, repack_for_udocker, source_digest, write_charliecloud_metadata

# (name, kind, payload): kind is "file" (bytes), "dir", "sym" (target), "link" (target), "chr"
Member = Tuple[str, str, Union[bytes, str, None]]


def layer(members: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind == "file":
                data = payload if isinstance(payload, bytes) else b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "link": tarfile.LNKTYPE,
                         "chr": tarfile.CHRTYPE}[kind]
            if kind in ("sym", "link"):
                info.linkname = str(payload)
            tar.addfile(info)
    return buf.getvalue()


BASE = [
    ("etc", "dir", None), ("etc/hostname", "file", b"container\n"), ("etc/os-release", "file", b"ID=test\n"),
    ("usr/bin", "dir", None), ("usr/bin/tool", "file", b"#!/bin/sh\n"), ("bin", "sym", "usr/bin"),
    ("data", "dir", None), ("data/old.txt", "file", b"old"), ("data/orig", "file", b"shared"),
    ("opt/a", "dir", None), ("opt/a/one", "file", b"1"), ("opt/a/sub/two", "file", b"2"),
    ("dev/null", "chr", None),
]
UPPER = [
    ("data/.wh.old.txt", "file", b""),                 # whiteout: delete data/old.txt
    ("opt/a/.wh..wh..opq", "file", b""),               # opaque: empty opt/a
    ("opt/a/new", "file", b"new"),
    ("data/hl", "link", "data/orig"),                  # hardlink inside the layer set
    ("bin/added", "file", b"via symlink"),             # lands in usr/bin/added
]
CONFIG = {"architecture": "amd64", "os": "linux",
          "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"], "Cmd": ["sh"]},
          "rootfs": {"type": "layers", "diff_ids": []}}


def docker_archive(path: Path, layers: List[bytes], symlinked: bool = False) -> Path:
    cfg = json.dumps(CONFIG).encode()
    names = []
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, data in enumerate(layers):
            if symlinked:           # skopeo style: <id>/layer.tar -> ../<sha>.tar
                blob = f"{hashlib.sha256(data).hexdigest()}.tar"
                add(blob, data)
                info = tarfile.TarInfo(f"l{i}/layer.tar")
                info.type, info.linkname = tarfile.SYMTYPE, f"../{blob}"
                tar.addfile(info)
            else:
                add(f"l{i}/layer.tar", data)
            names.append(f"l{i}/layer.tar")
        add("config.json", cfg)
        add("manifest.json", json.dumps([{"Config": "config.json", "RepoTags": ["t:1"], "Layers": names}]).encode())
    return path


def oci_layout(root: Path, layers: List[bytes], ref: str = "v1") -> Tuple[Path, str]:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return f"sha256:{h}"
    cfg = json.dumps(CONFIG).encode()
    descs = []
    for data in layers:
        gz = gzip.compress(data)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
    manifest = json.dumps({"schemaVersion": 2, "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                                          "digest": put(cfg), "size": len(cfg)},
                           "layers": descs}).encode()
    mdigest = put(manifest)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": ref}}]}))
    return root, mdigest


def check_flattened(root: Path) -> None:
    assert (root / "etc/hostname").read_bytes() == b"container\n"
    assert not (root / "data/old.txt").exists(), "whiteout applied"
    assert sorted(os.listdir(root / "opt/a")) == ["new"], "opaque directory emptied first"
    assert (root / "data/hl").read_bytes() == b"shared"
    assert os.stat(root / "data/hl").st_ino == os.stat(root / "data/orig").st_ino
    assert os.readlink(root / "bin") == "usr/bin"
    assert (root / "usr/bin/added").read_bytes() == b"via symlink"
    assert not (root / "dev/null").exists(), "device nodes are skipped"


@pytest.mark.parametrize("symlinked", [False, True], ids=["plain", "skopeo-symlinks"])
def test_docker_archive(tmp_path, symlinked):
    arc = docker_archive(tmp_path / "img.tar", [layer(BASE), layer(UPPER)], symlinked)
    src = parse_source(f"docker-archive:{arc}")
    config = flatten(src, str(tmp_path / "rootfs"))
    assert config["config"]["Env"][1] == "LANG=C.UTF-8"
    check_flattened(tmp_path / "rootfs")
    assert source_digest(src) == "sha256:" + hashlib.sha256(json.dumps(CONFIG).encode()).hexdigest()


def test_oci_layout_and_archive(tmp_path):
    layout, mdigest = oci_layout(tmp_path / "layout", [layer(BASE), layer(UPPER)])
    src = parse_source(f"oci:{layout}")
    flatten(src, str(tmp_path / "r1"))
    check_flattened(tmp_path / "r1")
    assert source_digest(src) == mdigest
    assert source_digest(parse_source(f"oci:{layout}:v1")) == mdigest
    with pytest.raises(ImageError, match="no manifest tagged 'v2'"):
        source_digest(parse_source(f"oci:{layout}:v2"))
    archive = tmp_path / "img.oci.tar"
    with tarfile.open(archive, "w") as tar:
        for entry in sorted(os.listdir(layout)):
            tar.add(layout / entry, arcname=entry)
    src = parse_source(f"oci-archive:{archive}")
    flatten(src, str(tmp_path / "r2"))
    check_flattened(tmp_path / "r2")
    assert source_digest(src) == mdigest


def _canary(tmp_path: Path) -> None:
    """``evil -> <absolute host dir>`` then ``evil/passwd``, with a harmless host dir."""
    host_dir = tmp_path / "host-etc"            # stands in for the host's /etc: must stay empty
    host_dir.mkdir()
    evil = [("evil", "sym", str(host_dir)), ("evil/passwd", "file", b"pwned\n")]
    arc = docker_archive(tmp_path / "evil.tar", [layer(BASE), layer(evil)])
    root = tmp_path / "canary-rootfs"
    flatten(parse_source(f"docker-archive:{arc}"), str(root))
    assert os.listdir(host_dir) == [], "a layer wrote through an absolute symlink onto the host"
    inside = root / str(host_dir).lstrip("/") / "passwd"
    assert inside.read_bytes() == b"pwned\n", "the file lands inside the root filesystem"


def test_absolute_symlink_cannot_redirect_writes_to_the_host(tmp_path):
    _canary(tmp_path)


def test_evil_etc_passwd_lands_inside_the_rootfs(tmp_path):
    """The classic: ``evil -> /etc`` then ``evil/passwd``. Runs only once the harmless canary
    proved that paths resolve inside the root (the tests may run as root)."""
    _canary(tmp_path)
    with open("/etc/passwd", "rb") as fh:
        before = fh.read()
    evil = [("evil", "sym", "/etc"), ("evil/passwd", "file", b"root::0:0::/:/bin/sh\n")]
    arc = docker_archive(tmp_path / "evil.tar", [layer(BASE), layer(evil)])
    root = tmp_path / "rootfs"
    flatten(parse_source(f"docker-archive:{arc}"), str(root))
    with open("/etc/passwd", "rb") as fh:
        assert fh.read() == before
    assert (root / "etc/passwd").read_bytes() == b"root::0:0::/:/bin/sh\n"
    assert (root / "etc/hostname").read_bytes() == b"container\n"


def test_dotdot_paths_and_relative_symlinks_stay_inside(tmp_path):
    marker = f"escape-{uuid.uuid4().hex}"
    evil = [
        (f"../../{marker}", "file", b"x"),
        (f"a/../../../{marker}-2", "file", b"x"),
        ("up", "sym", "../../../.."),
        (f"up/{marker}-3", "file", b"x"),
        ("etclink", "link", "/etc/hostname"),           # hardlink by absolute name: the image's file
    ]
    base = tmp_path / "deep" / "er"
    base.mkdir(parents=True)
    arc = docker_archive(base / "evil.tar", [layer(BASE), layer(evil)])
    root = base / "rootfs"
    flatten(parse_source(f"docker-archive:{arc}"), str(root))
    for d in (tmp_path, tmp_path / "deep", base, Path("/")):
        assert not [n for n in os.listdir(d) if n.startswith(marker)], d
    assert (root / marker).read_bytes() == b"x"
    assert (root / f"{marker}-2").exists() and (root / f"{marker}-3").exists()
    assert (root / "etclink").read_bytes() == b"container\n"


def test_symlink_loop_is_an_image_error(tmp_path):
    loop = [("l1", "sym", "l2"), ("l2", "sym", "l1"), ("l1/x", "file", b"x")]
    arc = docker_archive(tmp_path / "loop.tar", [layer(loop)])
    with pytest.raises(ImageError, match="too many symlinks"):
        flatten(parse_source(f"docker-archive:{arc}"), str(tmp_path / "rootfs"))


def test_unreadable_archives(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar")
    with pytest.raises(ImageError, match="cannot read"):
        source_digest(parse_source(f"docker-archive:{bad}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="missing index.json"):
        source_digest(parse_source(f"oci:{empty}"))
    zstd = tmp_path / "zstd"
    layout, _ = oci_layout(zstd, [layer(BASE)])
    for blob in (layout / "blobs" / "sha256").iterdir():
        data = blob.read_bytes()
        if data[:2] == b"\x1f\x8b":
            blob.write_bytes(b"\x28\xb5\x2f\xfd" + data[4:])
    with pytest.raises(ImageError, match="zstd"):
        flatten(parse_source(f"oci:{layout}"), str(tmp_path / "r"))


def test_charliecloud_metadata(tmp_path):
    write_charliecloud_metadata(str(tmp_path), CONFIG)
    assert (tmp_path / "ch" / "environment").read_text() == "PATH=/usr/local/bin:/usr/bin:/bin\nLANG=C.UTF-8\n"


def test_repack_for_udocker_dereferences_layer_symlinks(tmp_path):
    arc = docker_archive(tmp_path / "img.tar", [layer(BASE), layer(UPPER)], symlinked=True)
    out = tmp_path / "source.tar"
    repack_for_udocker(parse_source(f"docker-archive:{arc}"), str(out))
    with tarfile.open(out) as tar:
        m = tar.getmember("l0/layer.tar")
        assert m.isreg() and m.size == len(layer(BASE))
    # and the repacked archive flattens to the same tree
    flatten(parse_source(f"docker-archive:{out}"), str(tmp_path / "rootfs"))
    check_flattened(tmp_path / "rootfs")


@pytest.mark.parametrize("ref", [None, "v1"])
@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_repack_for_udocker_tags_the_oci_manifest_latest(tmp_path, kind, ref):
    # issue 14 item 11: udocker load takes the tag from the index (random when untagged)
    root, mdigest = oci_layout(tmp_path / "lay", [layer(BASE)], ref=ref or "x")
    if ref is None:
        idx = json.loads((root / "index.json").read_text())
        del idx["manifests"][0]["annotations"]
        (root / "index.json").write_text(json.dumps(idx))
    src = f"oci:{root}"
    if kind == "oci-archive":
        arc = tmp_path / "img.oci.tar"
        with tarfile.open(arc, "w") as tar:
            for entry in sorted(os.listdir(root)):
                tar.add(root / entry, arcname=entry)
        src = f"oci-archive:{arc}"
    out = tmp_path / "source.tar"
    repack_for_udocker(parse_source(src), str(out))
    with tarfile.open(out) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        names = tar.getnames()
    assert names.count("index.json") == 1
    assert [(m["digest"], m["annotations"]["org.opencontainers.image.ref.name"])
            for m in index["manifests"]] == [(mdigest, "latest")]
    flatten(parse_source(f"oci-archive:{out}"), str(tmp_path / "rootfs"))
    assert (tmp_path / "rootfs/etc/hostname").exists()
