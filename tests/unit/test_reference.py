"""Image references by the OCI distribution grammar, and offline sources."""
from __future__ import annotations

import os

import pytest

from nsdf_hpc.errors import SpecError
from nsdf_hpc.reference import ImageRef, parse_reference, parse_source, validate_digest

D = "sha256:" + "0123456789abcdef" * 4

TABLE = [
    # text, registry, repository, tag, digest
    ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
    ("docker://ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
    ("docker://ghcr.io/o/i:1.2", "ghcr.io", "o/i", "1.2", None),
    ("library/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
    ("registry-1.docker.io/user/app:v1", "docker.io", "user/app", "v1", None),
    ("localhost:5000/a/b:1.0", "localhost:5000", "a/b", "1.0", None),
    ("localhost/foo", "localhost", "foo", "latest", None),
    ("127.0.0.1:5000/busybox", "127.0.0.1:5000", "busybox", "latest", None),
    ("[::1]:5000/a:1", "[::1]:5000", "a", "1", None),
    ("quay.io/a/b/c:latest", "quay.io", "a/b/c", "latest", None),
    (f"ubuntu@{D}", "docker.io", "library/ubuntu", None, D),
    (f"ubuntu:22.04@{D}", "docker.io", "library/ubuntu", "22.04", D),
    (f"registry.example.org:5000/team/app@{D}", "registry.example.org:5000", "team/app", None, D),
    ("foo_bar/baz__q.x-y:T_1.0-rc", "docker.io", "foo_bar/baz__q.x-y", "T_1.0-rc", None),
]


@pytest.mark.parametrize("text,registry,repository,tag,digest", TABLE, ids=[t[0] for t in TABLE])
def test_reference_table(text, registry, repository, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_normalised_forms():
    ref = parse_reference("ubuntu")
    assert str(ref) == "docker.io/library/ubuntu:latest"
    assert ref.name == "docker.io/library/ubuntu"
    pinned = ref.pinned(D)
    assert pinned.by_digest() == f"docker.io/library/ubuntu@{D}"
    assert str(pinned) == f"docker.io/library/ubuntu:latest@{D}"
    assert ref.on("mirror.site.edu").name == "mirror.site.edu/library/ubuntu"
    assert ref.slug() == "docker.io_library_ubuntu_latest"


@pytest.mark.parametrize("text,registry", [
    ("nsdf/name:v1.0.0", "registry.nsdf.org"),
    ("nsdf/tools/cli:v2.3.4", "registry.nsdf.org"),
    ("docker.io/nsdf/name:v1.0.0", "docker.io"),          # an explicit registry wins
    ("ghcr.io/nsdf/name:v1.0.0", "ghcr.io"),
    ("other/name:v1.0.0", "docker.io"),
])
def test_nsdf_registry(text, registry):
    ref = parse_reference(text, nsdf_registry="registry.nsdf.org")
    assert ref.registry == registry
    assert parse_reference("nsdf/name:v1.0.0").registry == "docker.io"   # the default


@pytest.mark.parametrize("text,why", [
    ("", "empty"),
    ("   ", "empty"),
    ("Ubuntu", "lowercase"),
    ("docker.io/Library/ubuntu", "lowercase"),
    ("ubuntu:-bad", "bad tag"),
    ("ubuntu:", "bad tag"),
    ("ubuntu:" + "x" * 129, "bad tag"),
    ("ubuntu:a/b", "bad registry"),
    ("ubuntu@sha256:abc", "64"),
    ("ubuntu@sha256:" + "AB" * 32, "lowercase hex"),
    ("ubuntu@md5", "invalid digest"),
    ("http://example.org/x", "unsupported transport"),
    ("ubuntu latest", "whitespace"),
    ("ubuntu\n", "whitespace"),
    ("a//b", "bad repository"),
    ("-a/b", "bad repository"),
    ("a__b_/c", "bad repository"),
    ("bad_host.io:x/y", "bad registry"),
    ("example.com/" + "a" * 260, "255"),
])
def test_malformed_references(text, why):
    with pytest.raises(SpecError) as exc:
        parse_reference(text)
    msg = str(exc.value)
    assert why in msg
    if text.strip():
        assert repr(text) in msg or text.split("@")[-1] in msg or "digest" in msg


def test_validate_digest():
    assert validate_digest(D) == D
    assert validate_digest("sha512:" + "a" * 128).startswith("sha512:")
    with pytest.raises(SpecError):
        validate_digest("sha512:" + "a" * 64)
    with pytest.raises(SpecError):
        ImageRef(repository="library/x").pinned("nope")


def test_offline_sources(tmp_path):
    archive = tmp_path / "img.tar"
    s = parse_source(f"docker-archive:{archive}")
    assert (s.kind, s.path) == ("docker-archive", str(archive))
    assert str(s) == f"docker-archive:{archive}"
    s = parse_source(f"oci-archive:{archive}")
    assert (s.kind, s.path) == ("oci-archive", str(archive))
    # relative paths become absolute
    s = parse_source("docker-archive:rel.tar")
    assert s.path == os.path.join(os.getcwd(), "rel.tar")


def test_oci_layout_sources(tmp_path):
    layout = tmp_path / "layout"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    s = parse_source(f"oci:{layout}")
    assert (s.kind, s.path, s.layout_ref) == ("oci-dir", str(layout), None)
    s = parse_source(f"oci:{layout}:v1")
    assert (s.kind, s.path, s.layout_ref) == ("oci-dir", str(layout), "v1")
    assert str(s) == f"oci:{layout}:v1"
    # a path to a layout directory is recognised without the prefix
    assert parse_source(str(layout)).kind == "oci-dir"


@pytest.mark.parametrize("name", ["x.sif", "x.simg", "x.sqfs", "x.squashfs"])
def test_native_artifacts(tmp_path, name):
    s = parse_source(str(tmp_path / name))
    assert (s.kind, s.path) == ("native", str(tmp_path / name))
    assert parse_source(name).kind == "native"           # by suffix, even when relative


def test_a_plain_directory_is_native(tmp_path):
    assert parse_source(str(tmp_path)).kind == "native"


@pytest.mark.parametrize("text", ["docker-archive:", "oci-archive:", "oci:", ""])
def test_malformed_sources(text):
    with pytest.raises(SpecError, match="needs|empty"):
        parse_source(text)


def test_registry_source_keeps_what_the_user_wrote():
    s = parse_source("nsdf/name:v1.0.0", nsdf_registry="registry.nsdf.org")
    assert s.kind == "registry"
    assert s.text == "nsdf/name:v1.0.0"
    assert str(s) == "registry.nsdf.org/nsdf/name:v1.0.0"
