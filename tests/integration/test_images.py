"""The image layer for real: every source format on every real runtime, digest pinning,
mirrors, the site tier, and the reliability claims (concurrency, SIGKILL, tampering)."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

import pytest

from .helpers import BUSYBOX, RUNTIME_PARAMS, nsdf_root, nsdf_user, root_env

pytestmark = [pytest.mark.integration, pytest.mark.registry]

HELLO = "hello from busybox image"


def _sources(images: Path) -> List[str]:
    bb = images / "busybox"
    return [
        "127.0.0.1:5443/hpc/busybox:latest",          # Docker v2s2 manifest, TLS
        "127.0.0.1:5443/hpc/busybox:oci",             # OCI manifest
        "nsdf/busybox:v1.0.0",                        # NSDF naming (nsdf_registry below)
        f"docker-archive:{bb}/busybox.docker.tar",
        f"oci-archive:{bb}/busybox.oci.tar",
        f"oci:{bb}/oci",
    ]


def node_env(runtime: str, where: Path) -> Dict[str, str]:
    """podman-hpc's per-node writable store (node-local at NERSC: only the squash store, on a
    shared filesystem, is what another node sees), kept under ``where``; {} for the others."""
    if runtime != "podman-hpc":
        return {}
    run_root = tempfile.mkdtemp(prefix="nsdf-ph-", dir="/tmp")   # podman: at most 50 characters
    return {"PODMANHPC_GRAPH_ROOT": str(where / "storage"), "PODMANHPC_RUN_ROOT": run_root}


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_conversion_matrix(runtime: str, images_dir: Path, tmp_path: Path) -> None:
    """Each source format converts to the runtime's native form and runs; podman-hpc's run is
    a compute node's (an empty writable store of its own: the squash alone must do), and
    inside an allocation, where nothing may be pulled again."""
    conf = tmp_path / "config.toml"
    conf.write_text('nsdf_registry = "127.0.0.1:5443"\n')
    failures = []
    login, compute = node_env(runtime, tmp_path / "login"), node_env(runtime, tmp_path / "compute")
    for src in _sources(images_dir):
        cache = tmp_path / f"cache-{abs(hash(src))}"
        pulled = nsdf_root(["pull", "--json", "--runtime", runtime, src], cache, NSDF_HPC_CONFIG=str(conf), **login)
        if pulled.returncode != 0:
            failures.append(f"{src}: pull rc={pulled.returncode}: {pulled.stderr[-500:]}")
            continue
        native = json.loads(pulled.stdout)
        assert native["cached"] is False and native["digest"].startswith("sha256:")
        on_node = {"SLURM_JOB_ID": "1", **compute} if compute else {}
        ran = nsdf_root(["run", "--runtime", runtime, src, "--", "cat", "/etc/hello.txt"], cache,
                        NSDF_HPC_CONFIG=str(conf), **on_node)
        if ran.returncode != 0 or ran.stdout.strip() != HELLO:
            failures.append(f"{src}: run rc={ran.returncode}: {ran.stdout[-200:]} {ran.stderr[-500:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_32_concurrent_pulls_convert_once(runtime: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "nsdf_hpc", "pull", "--json", "--runtime", runtime, BUSYBOX]
    env = root_env(cache, **node_env(runtime, tmp_path / "login"))   # podman-hpc: a cold store

    def one(_: int) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    bad = [r.stderr for r in results if r.returncode != 0]
    assert not bad, bad[0]
    natives = [json.loads(r.stdout) for r in results]
    assert sum(1 for n in natives if not n["cached"]) == 1, "exactly one process converts"
    assert len({n["location"] for n in natives}) == 1
    ran = nsdf_root(["run", "--runtime", runtime, BUSYBOX, "--", "cat", "/etc/hello.txt"], cache,
                    **node_env(runtime, tmp_path / "compute"))
    assert ran.stdout.strip() == HELLO, ran.stderr


def _podman_hpc_cold(env: Dict[str, str], squash_dir: Path) -> None:
    """Empty podman-hpc's private writable store and the cache's squash store, so that the
    next pull pulls and squashes again (only stores this test owns: PODMANHPC_GRAPH_ROOT)."""
    for argv in (["podman-hpc", "rm", "-af"], ["podman-hpc", "rmi", "-af"]):
        subprocess.run(argv, env=env, capture_output=True, timeout=120, cwd="/tmp")
    subprocess.run(["rm", "-rf", "--one-file-system", str(squash_dir)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [p for p in RUNTIME_PARAMS
                                     if p.values[0] in ("apptainer", "charliecloud", "podman-hpc", "udocker")])
def test_sigkill_during_conversion_never_leaves_a_used_entry(runtime: str, tmp_path: Path) -> None:
    """Kill the conversion (nsdf-run alone, or its whole process group as a node death would)
    at random moments; a later run must never use a broken entry, and the next pull works.

    podman-hpc: every trial starts cold (a private writable store, emptied with the squash
    store), and the run after each kill is a compute node's (an empty writable store of its
    own, inside an allocation): what the kill left in the squash store must not pass for a
    squash (a half-written one would otherwise be taken as "already generated" by migrate)."""
    import nsdf_hpc
    cache = tmp_path / "cache"
    login = node_env(runtime, tmp_path / "login")
    env = root_env(cache, **login)
    compute = {"SLURM_JOB_ID": "1", **node_env(runtime, tmp_path / "compute")} if login else {}
    squash_dir = cache / "podman-hpc"      # SQUASH_DIR: nsdf-hpc's default, in the cache
    # how long a cold conversion takes here, to spread the kills over it
    t0 = time.monotonic()
    first = nsdf_root(["pull", "--runtime", runtime, BUSYBOX], cache, **login)
    assert first.returncode == 0, first.stderr
    cold = time.monotonic() - t0
    client = nsdf_hpc.Client(env=env)
    digest = client.resolve(client.parse_image(BUSYBOX))[0]
    rng = random.Random(20261126)
    outcomes = {"killed": 0, "finished first": 0}
    trials = 12 if login else 20           # podman-hpc: about 8 s a trial
    try:
        for trial in range(trials):
            entry = client.cache.lookup(runtime, digest, touch=False)
            if entry is not None:
                client.remove(entry)
            if login:
                _podman_hpc_cold(env, squash_dir)
            proc = subprocess.Popen([sys.executable, "-m", "nsdf_hpc", "pull", "--runtime", runtime, BUSYBOX],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
            started = time.monotonic()
            time.sleep(rng.uniform(0.0, 0.9 * cold))
            if proc.poll() is None:
                if trial % 2:
                    os.killpg(proc.pid, signal.SIGKILL)    # the whole tree, like a node crash
                else:
                    proc.send_signal(signal.SIGKILL)       # only nsdf-run; the runtime may linger
                outcomes["killed"] += 1
            else:
                outcomes["finished first"] += 1
                cold = min(cold, time.monotonic() - started)   # aim the next kills earlier
            proc.wait()
            time.sleep(0.05)
            # whatever is published now must be complete and valid
            published = client.cache.entry_dir(runtime, digest)
            if os.path.exists(published):
                entry = client.cache.lookup(runtime, digest, touch=False)
                assert entry is not None, f"trial {trial}: an invalid entry was left published"
            if compute:
                pulled = nsdf_root(["pull", "--runtime", runtime, BUSYBOX], cache, **login)
                assert pulled.returncode == 0, f"trial {trial}: {pulled.stderr[-800:]}"
            ran = nsdf_root(["run", "--runtime", runtime, BUSYBOX, "--", "cat", "/etc/hello.txt"], cache, **compute)
            assert ran.returncode == 0 and ran.stdout.strip() == HELLO, f"trial {trial}: {ran.stderr[-800:]}"
    finally:
        if login:   # migrate's container, left Created (and mounted) when its client was killed
            _podman_hpc_cold(env, squash_dir)
    print(f"\n{runtime}: {trials} trials, cold conversion {cold:.2f} s, {outcomes}")
    assert outcomes["killed"] >= trials // 2


@pytest.mark.parametrize("runtime", [p for p in RUNTIME_PARAMS if p.values[0] in ("apptainer", "charliecloud")])
def test_truncated_or_tampered_entry_is_rebuilt(runtime: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pulled = json.loads(nsdf_root(["pull", "--json", "--runtime", runtime, BUSYBOX], cache).stdout)
    artifact = Path(pulled["location"])
    if artifact.is_dir():
        artifact = artifact.parent / "image.sqfs"
    size = artifact.stat().st_size
    with open(artifact, "r+b") as fh:            # truncate
        fh.truncate(size // 2)
    again = json.loads(nsdf_root(["pull", "--json", "--runtime", runtime, BUSYBOX], cache).stdout)
    assert again["cached"] is False, "a truncated entry must be rebuilt"
    assert artifact.stat().st_size == size
    with open(artifact, "r+b") as fh:            # same size, different bytes
        fh.seek(size // 3)
        fh.write(b"\xde\xad\xbe\xef")
    again = json.loads(nsdf_root(["pull", "--json", "--runtime", runtime, BUSYBOX], cache).stdout)
    assert again["cached"] is False, "a tampered entry must be rebuilt"
    ran = nsdf_root(["run", "--runtime", runtime, BUSYBOX, "--", "cat", "/etc/hello.txt"], cache)
    assert ran.stdout.strip() == HELLO


def test_digest_pinned_reference_needs_no_network(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pulled = json.loads(nsdf_root(["pull", "--json", "--runtime", "apptainer", BUSYBOX], cache).stdout)
    digest = pulled["digest"]
    # the same digest through a dead registry: served from the cache, no request made
    conf = tmp_path / "dead.toml"
    conf.write_text('[mirrors]\n"127.0.0.1:5443" = "127.0.0.1:5999"\n')
    pinned = f"127.0.0.1:5443/hpc/busybox@{digest}"
    r = nsdf_root(["run", "--runtime", "apptainer", pinned, "--", "cat", "/etc/hello.txt"], cache,
                  NSDF_HPC_CONFIG=str(conf))
    assert r.returncode == 0 and r.stdout.strip() == HELLO, r.stderr
    # but a tag through the dead mirror must fail clearly (pull always asks the registry)
    r = nsdf_root(["pull", "--runtime", "apptainer", BUSYBOX], cache, NSDF_HPC_CONFIG=str(conf))
    assert r.returncode == 1 and "cannot reach registry 127.0.0.1:5999" in r.stderr


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_docker_io_names_through_the_site_mirror(runtime: str, tmp_path: Path) -> None:
    """The testbed's site config maps docker.io to the local TLS registry (as a site mirror
    would): `busybox` resolves to docker.io/library/busybox and is served by the mirror."""
    cache = tmp_path / "cache"
    r = nsdf_root(["run", "--runtime", runtime, "busybox", "--", "cat", "/etc/hello.txt"], cache)
    assert r.returncode == 0 and r.stdout.strip() == HELLO, r.stderr


@pytest.mark.parametrize("runtime", ["apptainer", "podman", "udocker"])
def test_insecure_http_mirror(runtime: str, tmp_path: Path) -> None:
    conf = tmp_path / "http.toml"
    conf.write_text('insecure_registries = ["127.0.0.1:5000"]\n[mirrors]\n"docker.io" = "127.0.0.1:5000"\n')
    r = nsdf_root(["run", "--runtime", runtime, "busybox", "--", "cat", "/etc/hello.txt"], tmp_path / "c",
                  NSDF_HPC_CONFIG=str(conf))
    assert r.returncode == 0 and r.stdout.strip() == HELLO, r.stderr


def test_charliecloud_refuses_an_http_registry_clearly(tmp_path: Path) -> None:
    conf = tmp_path / "http.toml"
    conf.write_text('insecure_registries = ["127.0.0.1:5000"]\n')
    r = nsdf_root(["pull", "--runtime", "charliecloud", "127.0.0.1:5000/hpc/busybox:latest"], tmp_path / "c",
                  NSDF_HPC_CONFIG=str(conf))
    assert r.returncode == 1 and "Charliecloud can only pull over HTTPS" in r.stderr


def test_site_tier_is_used_first_without_converting(tmp_path: Path) -> None:
    site = tmp_path / "site"
    assert nsdf_root(["pull", "--runtime", "apptainer", BUSYBOX], site).returncode == 0
    os.chmod(site, 0o555)
    conf = tmp_path / "tier.toml"
    conf.write_text(f'site_cache_dirs = ["{site}"]\n')
    user_cache = tmp_path / "user"
    r = nsdf_root(["pull", "--json", "--runtime", "apptainer", BUSYBOX], user_cache, NSDF_HPC_CONFIG=str(conf))
    native = json.loads(r.stdout)
    assert native["cached"] is True and native["location"].startswith(str(site))
    assert not (user_cache / "entries").exists() or not any((user_cache / "entries").rglob("entry.json"))
    os.chmod(site, 0o755)


def test_inside_an_allocation_nothing_is_pulled(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = nsdf_root(["run", "--runtime", "apptainer", BUSYBOX, "--", "true"], cache, SLURM_JOB_ID="4242")
    assert r.returncode == 125 and "never contacts a registry" in r.stderr
    assert nsdf_root(["pull", "--runtime", "apptainer", BUSYBOX], cache).returncode == 0
    r = nsdf_root(["run", "--runtime", "apptainer", BUSYBOX, "--", "cat", "/etc/hello.txt"], cache,
                  SLURM_JOB_ID="4242")
    assert r.returncode == 0 and r.stdout.strip() == HELLO


def test_preflight_names_the_variable_on_a_full_disk(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)]).returncode == 0
    if not mounted:
        pytest.fail("cannot mount a tmpfs (the testbed runs as root)")
    try:
        r = nsdf_root(["pull", "--runtime", "apptainer", "127.0.0.1:5443/hpc/pydeb:latest"], small)
        assert r.returncode == 1
        assert "not enough space" in r.stderr and "NSDF_HPC_CACHE" in r.stderr
        assert not list((small / "entries").rglob("entry.json")) if (small / "entries").exists() else True
    finally:
        subprocess.run(["umount", str(small)])


def test_images_and_prune(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for rt in ("apptainer", "udocker"):
        assert nsdf_root(["pull", "--runtime", rt, BUSYBOX], cache).returncode == 0
    listed = json.loads(nsdf_root(["images", "--json"], cache).stdout)
    assert {e["runtime"] for e in listed} == {"apptainer", "udocker"} and all(e["ok"] for e in listed)
    # later bare listings come from the cache's files without the settings models (_listing.py,
    # test_listing.py): the same rows and table as the click command's
    assert json.loads(nsdf_root(["images", "--json"], cache).stdout) == listed
    table = nsdf_root(["images"], cache).stdout
    assert table == nsdf_root(["images"], cache, NSDF_HPC_NO_FAST_PATH="1").stdout and "busybox" in table
    r = nsdf_root(["prune", "--max-size", "0"], cache)
    assert r.returncode == 0 and "removed 2 entries" in r.stdout, r.stdout + r.stderr
    assert json.loads(nsdf_root(["images", "--json"], cache).stdout) == []
    r = nsdf_root(["run", "--runtime", "udocker", BUSYBOX, "--", "cat", "/etc/hello.txt"], cache)
    assert r.stdout.strip() == HELLO


@pytest.mark.charliecloud
def test_absurd_prune_values_leave_the_cache_alone(tmp_path: Path) -> None:
    """Issue 14: `prune --max-size -5G` printed "removed 8 entries" and emptied the cache."""
    cache = tmp_path / "cache"
    assert nsdf_root(["pull", "--runtime", "charliecloud", BUSYBOX], cache).returncode == 0
    for option, value in (("--max-size", "-5G"), ("--older-than", "-1d"), ("--max-size", "nan"),
                          ("--max-size", "1e400G"), ("--older-than", "")):
        r = nsdf_root(["prune", option, value], cache)
        assert r.returncode == 2, (option, value, r.stdout, r.stderr)
        assert f"Invalid value for '{option}'" in r.stderr and "removed" not in r.stdout
    listed = json.loads(nsdf_root(["images", "--json"], cache).stdout)
    assert [(e["runtime"], e["ok"]) for e in listed] == [("charliecloud", True)]


def test_json_progress_events(tmp_path: Path) -> None:
    r = nsdf_root(["pull", "--json", "--runtime", "charliecloud", BUSYBOX], tmp_path / "c")
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "resolve" and kinds[-1] == "done" and "step" in kinds


@pytest.mark.podman_hpc
def test_podman_hpc_squash_that_failed_is_an_error_and_publishes_nothing(tmp_path: Path) -> None:
    """podman-hpc's pull and migrate exit 0 when squashing failed: a mksquashfs that fails
    (PODMANHPC_MKSQUASHFS_BIN, the site setting) must make the pull fail, naming the check."""
    cache = tmp_path / "cache"
    r = nsdf_root(["pull", "--runtime", "podman-hpc", "127.0.0.1:5443/hpc/pydeb:latest"], cache,
                  PODMANHPC_MKSQUASHFS_BIN="/usr/bin/false")
    assert r.returncode == 1 and "check the squash failed" in r.stderr, r.stderr
    assert not list((cache / "entries").rglob("entry.json"))
    assert not [p for p in (cache / "tmp").iterdir() if not p.name.startswith("trash-")]
    ok = nsdf_root(["run", "--runtime", "podman-hpc", "--no-bind-cwd", BUSYBOX, "--", "cat", "/etc/hello.txt"], cache)
    assert (ok.returncode, ok.stdout.strip()) == (0, HELLO), ok.stderr


@pytest.mark.podman_hpc
def test_podman_hpc_half_written_squash_is_made_again(tmp_path: Path) -> None:
    """A migrate whose mksquashfs died (node crash, OOM, killed job) leaves its half-written
    <link>.squash and no image record; podman-hpc's next migrate takes the file as done
    ("Squash file already generated"), and every run from the squash failed with exit 1
    ("catatonit: failed to exec pid1"). That state is made here from a real pull (the record
    dropped, the file cut in half); the next pull must make the squash again."""
    cache = tmp_path / "cache"
    login, compute = node_env("podman-hpc", tmp_path / "login"), node_env("podman-hpc", tmp_path / "compute")
    assert nsdf_root(["pull", "--runtime", "podman-hpc", BUSYBOX], cache, **login).returncode == 0
    squash = cache / "podman-hpc"
    (squash / "overlay-images" / "images.json").write_text("[]")
    [half] = (squash / "overlay" / "l").glob("*.squash")
    os.truncate(half, half.stat().st_size // 2)
    subprocess.run(["rm", "-rf", str(cache / "entries")], check=True)
    pulled = nsdf_root(["pull", "--runtime", "podman-hpc", BUSYBOX], cache, **login)
    assert pulled.returncode == 0 and "making it again" in pulled.stderr, pulled.stderr
    ran = nsdf_root(["run", "--runtime", "podman-hpc", BUSYBOX, "--", "cat", "/etc/hello.txt"], cache,
                    SLURM_JOB_ID="1", **compute)
    assert (ran.returncode, ran.stdout.strip()) == (0, HELLO), ran.stderr


@pytest.mark.podman_hpc
@pytest.mark.unprivileged
@pytest.mark.xfail(strict=True, reason="podman 4.3.1 + fuse-overlayfs 1.10: --userns=keep-id over an image "
                   "only in the squash store exits 126 'creating /etc/mtab symlink: operation not supported'")
def test_podman_hpc_unprivileged_run_from_the_squash_alone(as_user, user_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The unprivileged user's run on a compute node (an empty writable store of its own):
    KNOWN DEFECT. Root runs from the squash alone (test_conversion_matrix); the user's run
    does only while the node's writable store has the image. `podman-hpc run` without
    --userns=keep-id works, but the command would then run as uid 0 (the caller's uid is the
    contract: test_pull_and_run_as_unprivileged_user)."""
    cache = user_dir / "cache"
    login = node_env("podman-hpc", user_dir / "login")
    compute = node_env("podman-hpc", user_dir / "compute")
    for d in (login, compute):
        os.chown(d["PODMANHPC_RUN_ROOT"], as_user.pw.pw_uid, as_user.pw.pw_gid)
    pulled = nsdf_user(as_user, ["pull", "--runtime", "podman-hpc", BUSYBOX], cache, **login)
    assert pulled.returncode == 0, pulled.stderr
    ran = nsdf_user(as_user, ["run", "--runtime", "podman-hpc", BUSYBOX, "--", "sh", "-c", "cat /etc/hello.txt; id -u"],
                    cache, cwd=str(user_dir), SLURM_JOB_ID="1", **compute)
    assert (ran.returncode, ran.stdout.splitlines()) == (0, [HELLO, str(as_user.pw.pw_uid)]), ran.stderr
