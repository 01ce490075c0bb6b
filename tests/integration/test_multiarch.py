"""Multi-arch images for real (issue 12 item 3), against the testbed registry's
hpc/multi:latest (an index: linux/amd64 + linux/arm64), hpc/armonly:latest (one arm64
manifest) and hpc/armonly:index (an index with only linux/arm64); see
tests/testbed/runtimes.sh step_multiarch_images. This machine is x86_64 with no emulator."""
from __future__ import annotations

import json
import os
import platform as host
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from .helpers import RUNTIME_PARAMS, nsdf_root, nsdf_user

pytestmark = [pytest.mark.integration, pytest.mark.registry]

REG = "127.0.0.1:5443"
MULTI = f"{REG}/hpc/multi:latest"
ARMONLY = f"{REG}/hpc/armonly:latest"
ARMONLY_INDEX = f"{REG}/hpc/armonly:index"
HELLO = "hello from busybox image"


@pytest.fixture(scope="module", autouse=True)
def _amd64_host() -> None:
    if host.machine() != "x86_64":
        pytest.fail(f"these tests expect the testbed's x86_64 host, not {host.machine()}", pytrace=False)


def _index_entries(repo_tag: str) -> Dict[str, str]:
    """``{"linux/amd64": digest, ...}`` of an index in the testbed registry (plain HTTP)."""
    repo, tag = repo_tag.split(":")
    req = urllib.request.Request(f"http://127.0.0.1:5000/v2/{repo}/manifests/{tag}",
                                 headers={"Accept": "application/vnd.oci.image.index.v1+json"})
    with urllib.request.urlopen(req, timeout=10) as resp:   # noqa: S310 (the local registry)
        doc = json.load(resp)
    return {f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"] for m in doc["manifests"]}


def _node_env(runtime: str, where: Path) -> Dict[str, str]:
    """podman-hpc's writable store, private to the test (as in test_images.node_env)."""
    if runtime != "podman-hpc":
        return {}
    run_root = tempfile.mkdtemp(prefix="nsdf-ph-", dir="/tmp")   # podman: at most 50 characters
    return {"PODMANHPC_GRAPH_ROOT": str(where / "storage"), "PODMANHPC_RUN_ROOT": run_root}


def _pull(runtime: str, cache: Path, image: str, *extra: str, **env: str) -> "subprocess.CompletedProcess[str]":
    return nsdf_root(["pull", "--json", "--runtime", runtime, *extra, image], cache, **env)


def _images(cache: Path) -> List[Dict[str, object]]:
    res = nsdf_root(["images", "--json"], cache)
    assert res.returncode == 0, res.stderr
    return list(json.loads(res.stdout))


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_the_host_platform_is_chosen_and_another_is_prepared_for_its_nodes(
        runtime: str, tmp_path: Path) -> None:
    """An index: the host's entry is pulled and runs; --platform linux/arm64 makes a second
    entry (the arm64 manifest's digest, its platform recorded) that `images` shows beside the
    first, and that `run` refuses here with a clear error instead of "exec format error"."""
    cache = tmp_path / "cache"
    env = _node_env(runtime, tmp_path)
    digests = _index_entries("hpc/multi:latest")

    amd = _pull(runtime, cache, MULTI, **env)
    assert amd.returncode == 0, amd.stderr[-2000:]
    native = json.loads(amd.stdout)
    assert native["platform"] == "linux/amd64"
    assert native["digest"] == digests["linux/amd64"]
    ran = nsdf_root(["run", "--runtime", runtime, MULTI, "cat", "/etc/hello.txt"], cache, **env)
    assert ran.returncode == 0 and HELLO in ran.stdout, ran.stderr[-2000:]

    arm = _pull(runtime, cache, MULTI, "--platform", "linux/arm64", **env)
    assert arm.returncode == 0, arm.stderr[-2000:]
    foreign = json.loads(arm.stdout)
    assert foreign["platform"] == "linux/arm64"
    assert foreign["digest"] == digests["linux/arm64"]
    assert foreign["location"] != native["location"]
    again = _pull(runtime, cache, MULTI, "--platform", "arm64", **env)   # an architecture alone
    assert again.returncode == 0 and json.loads(again.stdout)["cached"] is True, again.stderr[-2000:]
    # inside an allocation (no registry): the entry recorded for the index and the platform
    offline = _pull(runtime, cache, MULTI, "--platform", "linux/arm64", SLURM_JOB_ID="1", **env)
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert json.loads(offline.stdout)["digest"] == digests["linux/arm64"]

    rows = {(r["runtime"], r["platform"]): r for r in _images(cache)}
    assert {(runtime, "linux/amd64"), (runtime, "linux/arm64")} <= set(rows), rows
    listing = nsdf_root(["images"], cache)
    assert "PLATFORM" in listing.stdout and "linux/arm64" in listing.stdout, listing.stdout

    refused = nsdf_root(["run", "--runtime", runtime, "--platform", "linux/arm64", MULTI,
                         "cat", "/etc/hello.txt"], cache, **env)
    assert refused.returncode == 125, (refused.returncode, refused.stdout, refused.stderr)
    assert "prepared for linux/arm64" in refused.stderr and "linux/amd64" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    # the host's entry is untouched and still runs
    ran = nsdf_root(["run", "--runtime", runtime, MULTI, "cat", "/etc/hello.txt"], cache, **env)
    assert ran.returncode == 0 and HELLO in ran.stdout, ran.stderr[-2000:]


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
@pytest.mark.parametrize("image", [ARMONLY, ARMONLY_INDEX], ids=["manifest", "index"])
def test_an_arm64_only_image_is_a_clear_error_listing_its_platforms(
        runtime: str, image: str, tmp_path: Path) -> None:
    """On amd64: exit 1, one message naming the platform wanted and the ones offered, nothing
    in the cache; with --platform linux/arm64 it is prepared, and a later pull or run for the
    host's platform gives the same clear error, never the arm64 image."""
    cache = tmp_path / "cache"
    env = _node_env(runtime, tmp_path)
    res = _pull(runtime, cache, image, **env)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "offers no image for linux/amd64" in res.stderr and "linux/arm64 only" in res.stderr, res.stderr
    assert "--platform linux/arm64" in res.stderr and "Traceback" not in res.stderr
    assert _images(cache) == []
    assert not list((cache / "tmp").glob("*")) if (cache / "tmp").exists() else True

    ok = _pull(runtime, cache, image, "--platform", "linux/arm64", **env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["platform"] == "linux/arm64"
    for argv in (["pull", "--runtime", runtime, image],
                 ["run", "--runtime", runtime, image, "cat", "/etc/hello.txt"]):
        res = nsdf_root(argv, cache, **env)
        assert res.returncode in (1, 125), (argv, res.returncode, res.stderr)
        assert "linux/arm64" in res.stderr and "linux/amd64" in res.stderr, res.stderr


@pytest.mark.apptainer
def test_the_arm64_sif_holds_arm64_binaries(tmp_path: Path) -> None:
    """What was prepared is the arm64 image, not the host's: Apptainer records the SIF's
    architecture from the image config, and its busybox is an aarch64 ELF."""
    cache = tmp_path / "cache"
    res = _pull("apptainer", cache, MULTI, "--platform", "linux/arm64")
    assert res.returncode == 0, res.stderr[-2000:]
    sif = json.loads(res.stdout)["location"]
    listed = subprocess.run(["apptainer", "sif", "list", sif], capture_output=True, text=True, timeout=60)
    assert "arm64" in listed.stdout, listed.stdout
    out = tmp_path / "x"
    subprocess.run(["unsquashfs", "-no-progress", "-d", str(out), "-o", _squash_offset(sif), sif,
                    "bin/busybox"], check=True, capture_output=True, timeout=120)
    elf = (out / "bin" / "busybox").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 183   # EM_AARCH64


def _squash_offset(sif: str) -> str:
    """The byte offset of the SIF's SquashFS partition (`apptainer sif list`: start-end)."""
    listed = subprocess.run(["apptainer", "sif", "list", sif], capture_output=True, text=True,
                            timeout=60, check=True).stdout
    for line in listed.splitlines():
        if "Squashfs" in line:
            return line.split("|")[3].strip().split("-")[0]
    raise AssertionError(f"no SquashFS partition in {listed}")


@pytest.mark.slow
@pytest.mark.apptainer
def test_submit_prepares_the_platform_of_the_partition(tmp_path: Path) -> None:
    """`submit --platform linux/arm64` prepares the arm64 image on this (login) node and the
    job script runs that entry; --dry-run shows it without submitting."""
    cache = tmp_path / "cache"
    pulled = _pull("apptainer", cache, MULTI, "--platform", "linux/arm64")
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    sif = json.loads(pulled.stdout)["location"]
    res = subprocess.run(["flock", "/tmp/nsdf-slurm.lock", "python3", "-m", "nsdf_hpc", "submit", "--dry-run",
                          "--runtime", "apptainer", "--platform", "linux/arm64", MULTI, "--",
                          "cat", "/etc/hello.txt"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NSDF_HPC_CACHE": str(cache)}, cwd="/tmp")
    assert res.returncode == 0, res.stderr[-2000:]
    assert sif in res.stdout, res.stdout


@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_the_unprivileged_user_prepares_another_platform(runtime: str, as_user, user_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """As the testbed's unprivileged user: the host's entry and the arm64 entry of the index,
    the arm64-only image's clear error, and the refused run of the arm64 entry."""
    cache = user_dir / "cache"
    env = _node_env(runtime, user_dir)
    if "PODMANHPC_RUN_ROOT" in env:
        os.chown(env["PODMANHPC_RUN_ROOT"], as_user.pw.pw_uid, as_user.pw.pw_gid)
    digests = _index_entries("hpc/multi:latest")
    for platform in ("linux/amd64", "linux/arm64"):
        res = nsdf_user(as_user, ["pull", "--json", "--runtime", runtime, "--platform", platform, MULTI],
                        cache, **env)
        assert res.returncode == 0, res.stderr[-2000:]
        native = json.loads(res.stdout)
        assert (native["platform"], native["digest"]) == (platform, digests[platform])
    bad = nsdf_user(as_user, ["pull", "--runtime", runtime, ARMONLY], cache, **env)
    assert bad.returncode == 1 and "linux/arm64 only" in bad.stderr, bad.stderr
    refused = nsdf_user(as_user, ["run", "--runtime", runtime, "--platform", "linux/arm64", MULTI,
                                  "--", "cat", "/etc/hello.txt"], cache, cwd=str(user_dir), **env)
    assert refused.returncode == 125 and "prepared for linux/arm64" in refused.stderr, refused.stderr
