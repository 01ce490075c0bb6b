"""Multi-arch images, the pure parts and the service with a fake registry (issue 12 item 3)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import pytest
from click.testing import CliRunner

from _fakes import FakeResponse, FakeRunner
from nsdf_hpc.cli import cli
from nsdf_hpc.client import Client
from nsdf_hpc.config import load_settings
from nsdf_hpc.errors import ImageError, PlatformError, SpecError
from nsdf_hpc.models import NativeImage, RunSpec
from nsdf_hpc.reference import Platform, parse_reference, parse_source
from nsdf_hpc.registry import RegistryClient, index_platforms, pick_platform, platform_text
from nsdf_hpc.runtimes import runtime_class, runtime_names

ARM = Platform.parse("linux/arm64")
AMD = Platform.parse("linux/amd64")


# ---------------------------------------------------------------- Platform
@pytest.mark.parametrize("text, expected", [
    ("linux/arm64", "linux/arm64"), ("arm64", "linux/arm64"), ("aarch64", "linux/arm64"),
    ("x86_64", "linux/amd64"), ("LINUX/AMD64", "linux/amd64"), ("linux/arm/v7", "linux/arm/v7"),
    ("armv7l", "linux/arm/v7"), (" linux/ppc64le ", "linux/ppc64le"),
])
def test_platform_parse(text: str, expected: str) -> None:
    assert str(Platform.parse(text)) == expected


@pytest.mark.parametrize("text", ["", "/", "linux/", "linux/arm64/v8/x", "linux/arm 64", "linux/../x"])
def test_a_bad_platform_is_a_spec_error_naming_the_form(text: str) -> None:
    with pytest.raises(SpecError, match="expected OS/ARCH"):
        Platform.parse(text)


def test_platform_of_the_host_from_uname() -> None:
    assert Platform.from_machine("x86_64") == AMD
    assert Platform.from_machine("aarch64") == ARM


def test_arm64_variant_v8_is_the_same_platform() -> None:
    assert ARM.matches("linux", "arm64", "v8") and Platform.parse("linux/arm64/v8").matches("linux", "arm64")
    assert not Platform.parse("linux/arm/v7").matches("linux", "arm", "v6")
    assert not ARM.matches("linux", "amd64")


def test_a_run_spec_normalises_its_platform_and_refuses_a_bad_one() -> None:
    assert RunSpec(image="x", command=("true",), platform="aarch64").platform == "linux/arm64"
    with pytest.raises(ValueError, match="invalid platform"):
        RunSpec(image="x", command=("true",), platform="linux//x")


# ---------------------------------------------------------------- index parsing
def _index(*entries: Tuple[str, Dict[str, str]]) -> Dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d,
                           "size": 1, "platform": p} for d, p in entries]}


D_AMD, D_ARM, D_ATT = ("sha256:" + c * 64 for c in "123")
INDEX = _index((D_AMD, {"os": "linux", "architecture": "amd64"}),
               (D_ARM, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
               (D_ATT, {"os": "unknown", "architecture": "unknown"}))   # a BuildKit attestation


def test_index_platforms_leave_out_attestations() -> None:
    assert index_platforms(INDEX) == ("linux/amd64", "linux/arm64/v8")


def test_pick_platform() -> None:
    assert pick_platform(INDEX, ARM) == (D_ARM, "linux/arm64/v8")
    assert pick_platform(INDEX, AMD) == (D_AMD, "linux/amd64")
    assert pick_platform(INDEX, Platform.parse("linux/s390x")) is None
    assert pick_platform({"manifests": "nonsense"}, AMD) is None


def test_platform_text_of_a_config() -> None:
    assert platform_text({"os": "linux", "architecture": "arm64"}) == "linux/arm64"
    assert platform_text({"architecture": "arm", "variant": "v7"}) == "linux/arm/v7"
    assert platform_text({"os": "linux"}) is None


# ---------------------------------------------------------------- a fake registry
def _blob(doc: Dict[str, Any]) -> Tuple[str, bytes]:
    data = json.dumps(doc).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


class FakeRegistry:
    """hpc/multi:latest (index: amd64 + arm64) and hpc/armonly:latest (one arm64 manifest)."""

    def __init__(self) -> None:
        self.blobs: Dict[str, Tuple[str, bytes]] = {}
        self.tags: Dict[str, str] = {}
        self.requests: List[Tuple[str, str]] = []
        images = {}
        for arch in ("amd64", "arm64"):
            cfg, cfg_data = _blob({"os": "linux", "architecture": arch, "config": {}})
            self.blobs[cfg] = ("application/vnd.oci.image.config.v1+json", cfg_data)
            man, man_data = _blob({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "config": {"digest": cfg, "size": len(cfg_data)},
                                   "layers": [{"digest": "sha256:" + "f" * 64, "size": 1000}]})
            self.blobs[man] = ("application/vnd.oci.image.manifest.v1+json", man_data)
            images[arch] = man
        idx, idx_data = _blob(_index((images["amd64"], {"os": "linux", "architecture": "amd64"}),
                                     (images["arm64"], {"os": "linux", "architecture": "arm64"})))
        self.blobs[idx] = ("application/vnd.oci.image.index.v1+json", idx_data)
        self.tags = {"hpc/multi:latest": idx, "hpc/armonly:latest": images["arm64"]}
        self.index, self.amd64, self.arm64 = idx, images["amd64"], images["arm64"]

    def open(self, req: Any) -> FakeResponse:
        path = req.full_url.split("/v2/", 1)[1]
        self.requests.append((req.get_method(), path))
        repo, kind, ref = path.rsplit("/", 2)
        digest = self.tags.get(f"{repo}:{ref}", ref)
        media, body = self.blobs[digest]
        return FakeResponse(200, {"Content-Type": media, "Docker-Content-Digest": digest},
                     body if req.get_method() == "GET" else b"")


def _client(tmp_path: Any, reg: FakeRegistry, runner: Optional[FakeRunner] = None) -> Client:
    env = {"PATH": "/usr/bin", "HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "cache"),
           "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none.toml")}
    client = Client(settings=load_settings(env=env, files=[]), runner=runner or FakeRunner({}), env=env)
    client.images.platform = AMD        # the host, whatever runs the tests
    real = client.images._registry

    def registry(name: str, insecure: bool) -> RegistryClient:
        rc = real(name, insecure)
        def fake_open(req: Any) -> Any:
            rc.requests += 1
            return reg.open(req)
        rc._open = fake_open  # type: ignore[method-assign]
        return rc
    client.images._registry = registry  # type: ignore[method-assign]
    return client


def test_the_registry_client_chooses_from_an_index(tmp_path: Any) -> None:
    reg = FakeRegistry()
    rc = RegistryClient("reg.example", env={})
    rc._open = reg.open  # type: ignore[method-assign]
    ref = parse_reference("reg.example/hpc/multi:latest")
    info = rc.manifest(ref, platform=ARM)
    assert (info.digest, info.image_digest, info.platform) == (reg.index, reg.arm64, "linux/arm64")
    assert info.platforms == ("linux/amd64", "linux/arm64") and info.is_index
    assert [m for m, _ in reg.requests] == ["HEAD", "GET"]    # the index is read to choose
    none = rc.manifest(ref, platform=Platform.parse("linux/s390x"))
    assert none.image_digest is None and none.platforms == ("linux/amd64", "linux/arm64")


def test_a_plain_manifest_costs_one_head_and_its_platform_is_read_with_the_size() -> None:
    reg = FakeRegistry()
    rc = RegistryClient("reg.example", env={})
    rc._open = reg.open  # type: ignore[method-assign]
    ref = parse_reference("reg.example/hpc/armonly:latest")
    info = rc.manifest(ref)
    assert info.image_digest == reg.arm64 and info.platform is None and reg.requests == [("HEAD", reg.requests[0][1])]
    full = rc.manifest(ref.pinned(reg.arm64), with_size=True)
    assert full.platform == "linux/arm64" and full.size is not None and full.size > 1000


def test_resolve_keys_the_cache_by_the_platform_entry(tmp_path: Any) -> None:
    reg = FakeRegistry()
    client = _client(tmp_path, reg)
    src = parse_source("reg.example/hpc/multi:latest")
    assert client.images.resolve(src)[0] == reg.amd64
    assert client.images.resolve(src, platform=ARM)[0] == reg.arm64
    # recorded: a digest reference to the index maps to the entry with no registry request
    n = len(reg.requests)
    pinned = parse_source(f"reg.example/hpc/multi@{reg.index}")
    assert client.images.resolve(pinned, platform=ARM)[0] == reg.arm64
    assert len(reg.requests) == n


@pytest.mark.parametrize("tag", ["hpc/armonly:latest"])
def test_an_arm64_only_image_on_amd64_lists_what_it_offers(tmp_path: Any, tag: str) -> None:
    reg = FakeRegistry()
    runner = FakeRunner({})
    client = _client(tmp_path, reg, runner)
    rt = runtime_class("apptainer")("/usr/bin/apptainer", "apptainer", "1.4.5")
    with pytest.raises(PlatformError) as exc:
        client.images.pull(f"reg.example/{tag}", rt)
    assert exc.value.offered == ("linux/arm64",) and exc.value.wanted == "linux/amd64"
    assert "offers no image for linux/amd64" in str(exc.value)
    assert "--platform linux/arm64" in str(exc.value)
    assert runner.calls == []                                  # nothing was pulled
    assert isinstance(exc.value, ImageError)


def test_an_index_without_the_platform_lists_what_it_offers(tmp_path: Any) -> None:
    client = _client(tmp_path, FakeRegistry())
    with pytest.raises(PlatformError, match=r"no image for linux/s390x \(the platform asked for\): "
                                            r"it is for linux/amd64, linux/arm64 only"):
        client.images.resolve(parse_source("reg.example/hpc/multi:latest"),
                              platform=Platform.parse("linux/s390x"))


# ---------------------------------------------------------------- runtimes
def _rt(name: str) -> Any:
    cls = runtime_class(name)
    return cls("/opt/bin/" + cls.executables[0], None, "1.4.5")


PIN = parse_reference("reg.example/hpc/multi:latest").pinned("sha256:" + "5" * 64)
FOREIGN_FLAGS = {
    "apptainer": ["--arch", "arm64"], "singularity": ["--arch", "arm64"],
    "podman": ["--platform=linux/arm64"], "podman-hpc": ["--platform=linux/arm64"],
    # ch-image pulls the pinned manifest as it is; its --arch refuses a plain manifest
    "charliecloud": [], "udocker": ["--platform=linux/arm64"],
}


@pytest.mark.parametrize("name", runtime_names())
def test_a_foreign_platform_reaches_the_pull_argv_of_the_runtimes_that_can(name: str) -> None:
    rt = _rt(name)
    src = parse_source(str(PIN))
    assert rt.foreign_platforms == (name in FOREIGN_FLAGS)
    if not rt.foreign_platforms:
        return
    host_argv = list(rt.image_plan(src, PIN, "k" * 64).steps[0].argv)
    argv = list(rt.image_plan(src, PIN, "k" * 64, False, ARM).steps[0].argv)
    flags = FOREIGN_FLAGS[name]
    if not flags:
        assert argv == host_argv
        return
    assert not any(f in host_argv for f in flags if f.startswith("--"))
    i = argv.index(flags[0])
    assert argv[i:i + len(flags)] == flags
    assert [a for a in argv if a not in flags] == host_argv


def test_a_runtime_that_cannot_prepare_another_platform_says_which_can(tmp_path: Any) -> None:
    client = _client(tmp_path, FakeRegistry())
    with pytest.raises(PlatformError, match=r"shifter cannot prepare an image for another platform "
                                            r"\(linux/arm64\).*apptainer.*udocker"):
        client.images.check_platform(_rt("shifter"), ARM)
    assert client.images.check_platform(_rt("shifter"), AMD) is None


def test_another_platforms_image_is_refused_here_unless_emulated(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from nsdf_hpc import client as client_mod
    client = _client(tmp_path, FakeRegistry())
    native = NativeImage(runtime="apptainer", source="x", location="/x.sif", platform="linux/arm64")
    monkeypatch.setattr(client_mod, "emulator", lambda arch: None)
    with pytest.raises(PlatformError, match=r"prepared for linux/arm64, and this host is linux/amd64 "
                                            r"with no emulator"):
        client.check_runs_here(native)
    monkeypatch.setattr(client_mod, "emulator", lambda arch: "/proc/sys/fs/binfmt_misc/qemu-aarch64")
    client.check_runs_here(native)
    client.check_runs_here(native.model_copy(update={"platform": None}))   # not known: as before


def test_emulator_reads_binfmt_misc(tmp_path: Any) -> None:
    from nsdf_hpc.host import emulator
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/bin/qemu-aarch64-static\n")
    (tmp_path / "qemu-riscv64").write_text("disabled\n")
    assert emulator("arm64", str(tmp_path)) == os.path.join(str(tmp_path), "qemu-aarch64")
    assert emulator("riscv64", str(tmp_path)) is None and emulator("s390x", str(tmp_path)) is None


# ---------------------------------------------------------------- the CLI
def test_images_shows_the_platform_column(tmp_path: Any) -> None:
    cache = tmp_path / "cache"
    for digest, platform in (("a" * 64, "linux/arm64"), ("b" * 64, None)):
        d = cache / "entries" / "apptainer" / f"sha256-{digest}"
        d.mkdir(parents=True)
        data = {"runtime": "apptainer", "digest": f"sha256:{digest}", "source": "reg/x:1",
                "location": "image.sif", "relative": True, "size": 1, "files": {}, "format": 1}
        if platform:
            data["platform"] = platform
        (d / "entry.json").write_text(json.dumps(data))
    env = {"HOME": str(tmp_path), "NSDF_HPC_CACHE": str(cache), "PATH": "/usr/bin",
           "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none.toml")}
    res = CliRunner().invoke(cli, ["images"], env=env, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:3] == ["RUNTIME", "PLATFORM", "DIGEST"]
    assert any(ln.split()[1] == "linux/arm64" for ln in lines[1:]), res.output
    assert any(ln.split()[1] == "-" for ln in lines[1:]), res.output
    js = CliRunner().invoke(cli, ["images", "--json"], env=env, catch_exceptions=False)
    assert sorted(str(r["platform"]) for r in json.loads(js.output)) == ["None", "linux/arm64"]


def test_pull_refuses_a_bad_platform_before_any_work(tmp_path: Any) -> None:
    env = {"HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "c"), "PATH": "/nonexistent",
           "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none.toml")}
    res = CliRunner().invoke(cli, ["pull", "--platform", "linux//arm", "busybox"], env=env)
    assert res.exit_code == 2 and "invalid platform" in res.output and "Traceback" not in res.output
