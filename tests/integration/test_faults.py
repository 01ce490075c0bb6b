"""Issue 12 items 1 and 2, for real: registry faults and a cache filesystem that fills up.

The registry stays the testbed's own (never stopped): a fault-injecting proxy of the tests'
own (``faultproxy.py``) sits in front of it on a port of its own. Who talks to the registry in
a pull: nsdf_hpc's own client (``registry.py``: the tag -> digest HEAD and the manifest GET for
the free-space preflight), then the runtime's own tool for the blobs (``apptainer pull``,
``ch-image pull``, ``udocker pull``; Podman's containers/image). Our requests are retried
request by request; a runtime's pull step is run again as a whole (``Step.retry``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from .faultproxy import FaultProxy
from .helpers import BUSYBOX, nsdf_root

pytestmark = [pytest.mark.integration, pytest.mark.registry]

TLS = ("127.0.0.1", 5443)
HTTP = ("127.0.0.1", 5000)
#: ~24 MB of random bytes on busybox: a cold pull takes many reads, so a cut lands mid-blob
BIG = "test/faults-big:v2"
#: 150 MB of zeros on busybox: ~1.3 MB compressed, so the free-space preflight (4x the
#: compressed size, at least 64 MiB) lets it through, and unpacking fills an 80 MiB tmpfs
ZEROS = "test/faults-zeros:v1"
HELLO = "hello from busybox image"


def _config(tmp: Path, *, insecure: str = "", attempts: int = 3, backoff: float = 0.2,
            timeout: float = 5) -> Dict[str, str]:
    conf = tmp / "faults.toml"
    conf.write_text((f'insecure_registries = ["{insecure}"]\n' if insecure else "")
                    + f"registry_attempts = {attempts}\nregistry_backoff = {backoff}\n"
                    + f"registry_timeout = {timeout}\n")
    return {"NSDF_HPC_CONFIG": str(conf)}


def _ensure_image(name: str, run: str) -> None:
    """Build ``busybox + RUN <run>`` and push it to the TLS registry, unless it is there."""
    ref = f"{TLS[0]}:{TLS[1]}/{name}"
    if subprocess.run(["skopeo", "inspect", "--raw", f"docker://{ref}"], capture_output=True).returncode == 0:
        return
    local = f"localhost/nsdf-faults-{name.split('/')[-1].replace(':', '-')}"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        (Path(d) / "Containerfile").write_text(f"FROM {BUSYBOX}\nRUN {run}\n")
        r = subprocess.run(["podman", "build", "-q", "--tls-verify=false", "-t", local, d],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    try:
        r = subprocess.run(["podman", "push", "-q", "--tls-verify=false", local, f"docker://{ref}"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        subprocess.run(["podman", "rmi", "-f", local], capture_output=True)


@pytest.fixture(scope="module")
def big_image() -> str:
    _ensure_image(BIG, "head -c 24000000 /dev/urandom > /big.bin")
    return BIG


@pytest.fixture(scope="module")
def zeros_image() -> str:
    _ensure_image(ZEROS, "head -c 150000000 /dev/zero > /zeros.bin")
    return ZEROS


def _files(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _assert_nothing_left(cache: Path, runtime: str) -> None:
    """Nothing published, no work directory, and no partial download: every file left is a
    ref record, a lock, or a blob of the runtime's own layer cache whose bytes match its name."""
    entries = cache / "entries" / runtime
    assert not entries.exists() or not list(entries.iterdir()), f"published: {list(entries.iterdir())}"
    tmp = cache / "tmp"
    assert not tmp.exists() or not list(tmp.iterdir()), f"work directory left: {list(tmp.iterdir())}"
    for rel in _files(cache):
        p = cache / rel
        if rel.startswith(("refs/", "locks/")):
            continue
        if "/blobs/sha256/" in rel:
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            assert digest == p.name, f"a partial blob was kept: {rel}"
            continue
        if rel.endswith(("index.json", "oci-layout")) or rel.startswith("udocker/"):
            continue
        raise AssertionError(f"unexpected file left in the cache: {rel}")


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


# ---------------------------------------------------------------- item 1: the registry goes away
def _image_id(ref: str) -> str:
    """The image id (config digest) Podman gives ``ref``."""
    r = subprocess.run(["skopeo", "inspect", "--config", "--raw", f"docker://{ref}"], capture_output=True)
    assert r.returncode == 0, r.stderr
    return hashlib.sha256(r.stdout).hexdigest()


@pytest.mark.parametrize("runtime", [pytest.param("apptainer", marks=pytest.mark.apptainer),
                                     pytest.param("charliecloud", marks=pytest.mark.charliecloud),
                                     pytest.param("podman", marks=pytest.mark.podman)])
def test_registry_going_away_mid_pull(runtime: str, big_image: str, tmp_path: Path) -> None:
    """The proxy cuts the connection 6 MB into the cold pull of a 24 MB image, then refuses
    every connection (the registry is down); after the "restart" the next pull works."""
    cache = tmp_path / "cache"
    env = _config(tmp_path)
    podman_id = ""
    if runtime == "podman":     # Podman's store is shared: make the pull cold
        podman_id = _image_id(f"{TLS[0]}:{TLS[1]}/{big_image}")
        subprocess.run(["podman", "rmi", "-f", podman_id], capture_output=True)
    try:
        with FaultProxy(TLS) as proxy:
            ref = f"{proxy.address}/{big_image}"
            proxy.cut_after = 6_000_000
            t0 = time.monotonic()
            r = nsdf_root(["-v", "pull", "--runtime", runtime, ref], cache, timeout=300, **env)
            took = time.monotonic() - t0
            _no_traceback(r.stderr)
            assert r.returncode == 1, r.stderr
            assert proxy.cuts == 1, "the cut happened during the pull"
            error = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("nsdf-run: INFO"))
            assert error.startswith("nsdf-run: error:"), r.stderr
            if runtime == "podman":
                # containers/image retries by itself (3 times, 1 s apart); nsdf-run does not add more
                assert f"from registry {proxy.address} failed" in error, error
                assert "(3/3)" in error and "trying again in" not in r.stderr, r.stderr
                exists = subprocess.run(["podman", "image", "exists", podman_id])
                assert exists.returncode == 1, "nothing kept in Podman's store"
            else:
                assert f"from registry {proxy.address} (3 attempts) failed" in error, error
                assert r.stderr.count("trying again in") == 2, r.stderr
                assert "attempt 1 of 3" in r.stderr and "attempt 2 of 3" in r.stderr
            assert took < 120, f"bounded: {took:.0f} s"
            _assert_nothing_left(cache, runtime)
            proxy.heal()                       # the registry is back
            r = nsdf_root(["pull", "--json", "--runtime", runtime, ref], cache, timeout=300, **env)
            assert r.returncode == 0, r.stderr
            native = json.loads(r.stdout)
            assert native["cached"] is False
            ran = nsdf_root(["run", "--runtime", runtime, ref, "--", "cat", "/etc/hello.txt"], cache, **env)
            assert (ran.returncode, ran.stdout.strip()) == (0, HELLO), ran.stderr
    finally:
        if runtime == "podman":
            nsdf_root(["prune", "--max-size", "0"], cache)
            subprocess.run(["podman", "rmi", "-f", podman_id], capture_output=True)
    print(f"\n{runtime}: registry went away after 6 MB; error after {took:.1f} s; the next pull worked")


@pytest.mark.apptainer
def test_a_registry_that_stops_sending_mid_blob_is_not_a_hang(big_image: str, tmp_path: Path) -> None:
    """The proxy stops forwarding 4 MB into each blob connection and keeps it open: Apptainer
    would wait forever (Go's client has no read timeout); the stall watchdog stops it after
    pull_stall_timeout s without I/O, the step is retried, then a clear error."""
    cache = tmp_path / "cache"
    conf = _config(tmp_path, attempts=2)
    with open(conf["NSDF_HPC_CONFIG"], "a") as fh:
        fh.write("pull_stall_timeout = 3\n")
    with FaultProxy(TLS) as proxy:
        proxy.stall_after = 4_000_000
        t0 = time.monotonic()
        r = nsdf_root(["-v", "pull", "--runtime", "apptainer", f"{proxy.address}/{big_image}"], cache,
                      timeout=120, **conf)
        took = time.monotonic() - t0
    _no_traceback(r.stderr)
    assert r.returncode == 1, r.stderr
    assert f"from registry {proxy.address} (2 attempts) failed" in r.stderr, r.stderr
    assert "made no progress (read and wrote nothing) for 3 s and was killed" in r.stderr
    assert "attempt 1 of 2, exit -9: no progress for 3 s, stopped" in r.stderr, r.stderr
    assert took < 40, took
    _assert_nothing_left(cache, "apptainer")


# ---------------------------------------------------------------- item 1: statuses and resets
def _http_pull(tmp_path: Path, proxy: FaultProxy, attempts: int = 4,
               timeout: float = 5) -> "Tuple[subprocess.CompletedProcess[str], float]":
    env = _config(tmp_path, insecure=proxy.address, attempts=attempts, timeout=timeout)
    t0 = time.monotonic()
    r = nsdf_root(["-v", "pull", "--runtime", "apptainer", f"{proxy.address}/hpc/busybox:latest"],
                  tmp_path / "cache", timeout=120, **env)
    return r, time.monotonic() - t0


FAULTS = {
    "429": (429, {"Retry-After": "1"}),
    "500": (500, {}),
    "503": (503, {}),
}


@pytest.mark.apptainer
def test_transient_faults_are_retried_then_the_pull_works(tmp_path: Path) -> None:
    """A reset, then 429 (Retry-After: 1), 500 and 503, then the registry answers: one pull
    rides through all four (5 attempts allowed) and `-v` shows each attempt."""
    with FaultProxy(HTTP, http=True) as proxy:
        proxy.reset_next = 1
        proxy.inject = [FAULTS["429"], FAULTS["500"], FAULTS["503"]]
        r, took = _http_pull(tmp_path, proxy, attempts=5)
        _no_traceback(r.stderr)
        assert r.returncode == 0, r.stderr
        for n, word in enumerate(["connection reset by the registry", "HTTP 429 (Retry-After: 1 s)",
                                  "HTTP 500", "HTTP 503"], 1):
            assert f"{word} for HEAD /v2/hpc/busybox/manifests/latest (attempt {n} of 5)" in r.stderr, r.stderr
        assert "attempt 5 of 5" not in r.stderr
        assert took >= 1.0, "Retry-After was honoured"
        ran = nsdf_root(["run", "--runtime", "apptainer", f"{proxy.address}/hpc/busybox:latest", "--",
                         "cat", "/etc/hello.txt"], tmp_path / "cache",
                        NSDF_HPC_CONFIG=str(tmp_path / "faults.toml"))
        assert (ran.returncode, ran.stdout.strip()) == (0, HELLO), ran.stderr


@pytest.mark.apptainer
@pytest.mark.parametrize("fault", [*FAULTS, "reset"])
def test_persistent_faults_end_in_a_clear_error_after_bounded_attempts(fault: str, tmp_path: Path) -> None:
    with FaultProxy(HTTP, http=True) as proxy:
        if fault == "reset":
            proxy.down = True
        else:
            proxy.always = FAULTS[fault]
        r, took = _http_pull(tmp_path, proxy)
        seen = proxy.connections
    _no_traceback(r.stderr)
    assert r.returncode == 1, r.stderr
    error = [ln for ln in r.stderr.splitlines() if ln.startswith("nsdf-run: error:")]
    assert len(error) == 1, r.stderr
    msg = error[0]
    assert f"registry {proxy.address}" in msg and "4 attempts" in msg, msg
    expected = {"429": "rate-limited the request: HTTP 429", "500": "failed: HTTP 500",
                "503": "failed: HTTP 503", "reset": "connection reset by the registry"}[fault]
    assert expected in msg, msg
    assert seen == 4, f"{seen} requests reached the proxy, 4 expected"
    assert r.stderr.count("trying again in") == 3
    # bounded: waits of at most 0.2, 0.4, 0.8 s (1 s each for 429's Retry-After)
    assert took < 30, took
    assert not (tmp_path / "cache" / "entries" / "apptainer").exists() or \
        not list((tmp_path / "cache" / "entries" / "apptainer").iterdir())


@pytest.mark.apptainer
def test_a_retry_after_beyond_the_limit_fails_at_once(tmp_path: Path) -> None:
    with FaultProxy(HTTP, http=True) as proxy:
        proxy.always = (429, {"Retry-After": "3600"})
        r, took = _http_pull(tmp_path, proxy)
        seen = len(proxy.requests)
    assert r.returncode == 1 and seen == 1, r.stderr
    assert "asks to retry after 3600 s" in r.stderr and "mirror" in r.stderr
    assert took < 20
    # `run` says nothing ran (125) for a registry error, with the same message
    with FaultProxy(HTTP, http=True) as proxy:
        proxy.always = (429, {"Retry-After": "3600"})
        env = _config(tmp_path, insecure=proxy.address)
        r = nsdf_root(["run", "--runtime", "apptainer", f"{proxy.address}/hpc/busybox:latest", "--", "true"],
                      tmp_path / "cache", timeout=60, **env)
    assert r.returncode == 125 and "asks to retry after 3600 s" in r.stderr, r.stderr


# ---------------------------------------------------------------- item 1: a silent registry
@pytest.mark.apptainer
@pytest.mark.parametrize("upstream", ["tls", "http"])
def test_a_registry_that_sends_nothing_times_out(upstream: str, tmp_path: Path) -> None:
    """Accepts the connection, reads, never answers: a timeout with a clear error, never a hang."""
    with FaultProxy(TLS if upstream == "tls" else HTTP, http=upstream == "http") as proxy:
        proxy.silent = True
        env = _config(tmp_path, insecure=proxy.address if upstream == "http" else "",
                      attempts=2, timeout=2)
        t0 = time.monotonic()
        r = nsdf_root(["-v", "pull", "--runtime", "apptainer", f"{proxy.address}/hpc/busybox:latest"],
                      tmp_path / "cache", timeout=60, **env)
        took = time.monotonic() - t0
    _no_traceback(r.stderr)
    assert r.returncode == 1, r.stderr
    assert (f"registry {proxy.address} ({'https' if upstream == 'tls' else 'http'}) accepted the "
            "connection but sent nothing within 2 s (2 attempts") in r.stderr, r.stderr
    assert "registry_timeout" in r.stderr
    assert "attempt 1 of 2" in r.stderr
    assert took < 20, f"{took:.1f} s"


# ---------------------------------------------------------------- item 2: disk full
@pytest.fixture
def small_fs() -> Iterator[Path]:
    """An 80 MiB tmpfs (root only), unmounted whatever happens."""
    if os.getuid() != 0:
        pytest.fail("mounting a tmpfs needs root (the testbed runs as root)")
    d = Path(tempfile.mkdtemp(prefix="nsdf-faults-tmpfs-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


def _snapshot(root: Path) -> Dict[str, str]:
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
            for rel in _files(root) if (root / rel).is_file()}


@pytest.mark.parametrize("runtime", [pytest.param("apptainer", marks=pytest.mark.apptainer),
                                     pytest.param("charliecloud", marks=pytest.mark.charliecloud),
                                     pytest.param("udocker", marks=pytest.mark.udocker)])
def test_a_cache_that_fills_during_the_conversion(runtime: str, zeros_image: str, small_fs: Path,
                                                  tmp_path: Path) -> None:
    cache = small_fs / "cache"
    ok = nsdf_root(["pull", "--json", "--runtime", runtime, BUSYBOX], cache)
    assert ok.returncode == 0, ok.stderr
    entry_dir = cache / "entries" / runtime
    names = sorted(p.name for p in entry_dir.iterdir())
    before = _snapshot(entry_dir)
    ref = f"{TLS[0]}:{TLS[1]}/{zeros_image}"
    r = nsdf_root(["-v", "pull", "--runtime", runtime, ref], cache, timeout=300)
    _no_traceback(r.stderr)
    assert r.returncode == 1, r.stderr
    msg = [ln for ln in r.stderr.splitlines() if ln.startswith("nsdf-run: error:")]
    assert len(msg) == 1, r.stderr
    assert "NSDF_HPC_CACHE" in msg[0] and str(cache) in msg[0] and "filled up" in msg[0], msg[0]
    assert "trying again" not in r.stderr, "a full disk is not retried"
    # nothing published, the private work directory removed, the other entry intact
    assert not list((cache / "tmp").iterdir())
    assert sorted(p.name for p in entry_dir.iterdir()) == names
    assert _snapshot(entry_dir) == before
    ran = nsdf_root(["run", "--runtime", runtime, BUSYBOX, "--", "cat", "/etc/hello.txt"], cache)
    assert (ran.returncode, ran.stdout.strip()) == (0, HELLO), ran.stderr
    # run says nothing ran (125) for the same cause
    r = nsdf_root(["run", "--runtime", runtime, ref, "--", "true"], cache, timeout=300)
    assert r.returncode == 125 and "NSDF_HPC_CACHE" in r.stderr, r.stderr
    assert not list((cache / "tmp").iterdir())
    # a larger cache works
    big = tmp_path / "larger-cache"
    r = nsdf_root(["pull", "--runtime", runtime, ref], big, timeout=300)
    assert r.returncode == 0, r.stderr
    ran = nsdf_root(["run", "--runtime", runtime, ref, "--", "wc", "-c", "/zeros.bin"], big)
    assert ran.returncode == 0 and ran.stdout.split()[0] == "150000000", ran.stderr


@pytest.mark.udocker
def test_a_full_runtime_directory_is_named(zeros_image: str, small_fs: Path, tmp_path: Path) -> None:
    """UDOCKER_DIR (the runtime's own store) on the small filesystem, the cache elsewhere:
    udocker 1.3.17 exits 0 with a truncated container ("Error: while extracting image
    layer"); nsdf-run must not publish it, and must name UDOCKER_DIR, not the cache."""
    cache = tmp_path / "cache"
    store = small_fs / "udocker"
    ref = f"{TLS[0]}:{TLS[1]}/{zeros_image}"
    r = nsdf_root(["pull", "--runtime", "udocker", ref], cache, timeout=300, UDOCKER_DIR=str(store))
    _no_traceback(r.stderr)
    assert r.returncode == 1, r.stderr
    assert f"UDOCKER_DIR={store}" in r.stderr and "not the cache" in r.stderr, r.stderr
    assert not (cache / "entries" / "udocker").exists() or not list((cache / "entries" / "udocker").iterdir())
    assert not list((cache / "tmp").iterdir())
    left = list((store / "containers").iterdir()) if (store / "containers").exists() else []
    assert left == [], f"the truncated container was left in the store: {left}"
    r = nsdf_root(["pull", "--runtime", "udocker", ref], cache, timeout=300)     # default store: fits
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- TLS trust
_RESOLVE = """
import sys
from nsdf_hpc.reference import parse_reference
from nsdf_hpc.registry import RegistryClient, _SSL_CONTEXTS
client = RegistryClient("127.0.0.1:5443")
info = client.manifest(parse_reference(sys.argv[1]))
again = client.manifest(parse_reference(sys.argv[1]))   # the same context, at once
assert again.digest == info.digest
print(info.digest, client.requests, ",".join(sorted(_SSL_CONTEXTS)))
"""


@pytest.mark.parametrize("trust", ["directory", "bundle", "nowhere", "another-name",
                                   "named-bundle", "named-bundle-only"])
def test_the_registry_certificate_is_checked_by_the_ca_directory_then_the_bundle(
        trust: str, tmp_path: Path) -> None:
    """The testbed's CA is in the system trust (``update-ca-certificates``: the hashed
    directory and the bundle). Our client first verifies through the directory (one
    certificate read, not the bundle's ~150), also when SSL_CERT_FILE names a bundle; a
    directory without the CA hands over to the bundle (the named one with the CA: it works); a CA nowhere, or a certificate for another name, is one clear error at once, not
    retried like a network fault."""
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    empty = tmp_path / "no-ca"
    empty.mkdir()
    if trust in ("bundle", "nowhere", "named-bundle-only"):
        env["SSL_CERT_DIR"] = str(empty)
    if trust.startswith("named-bundle"):   # SSL_CERT_FILE names a bundle with the CA (a site's)
        env["SSL_CERT_FILE"] = "/usr/local/share/ca-certificates/hpc-ci-registry.crt"
    if trust == "nowhere":
        (tmp_path / "empty.pem").write_text("")
        env["SSL_CERT_FILE"] = str(tmp_path / "empty.pem")
    if trust == "another-name":   # 127.1 is 127.0.0.1, a name the certificate was not made for
        r = subprocess.run([sys.executable, "-c", _RESOLVE.replace("127.0.0.1:5443", "127.1:5443"),
                            BUSYBOX.replace("127.0.0.1:", "127.1:")], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and "its certificate is for another name" in r.stderr, r.stderr
        assert "Hostname mismatch" in r.stderr and "attempts" not in r.stderr, r.stderr
        return
    expected = subprocess.run(["skopeo", "inspect", "--raw", f"docker://{BUSYBOX}"],
                              capture_output=True, check=True).stdout
    r = subprocess.run([sys.executable, "-c", _RESOLVE, BUSYBOX], env=env, capture_output=True,
                       text=True, timeout=120)
    if trust == "nowhere":
        assert r.returncode != 0 and "its certificate is not trusted here" in r.stderr, r.stderr
        t0 = time.monotonic()
        r = nsdf_root(["run", "--runtime", "charliecloud", BUSYBOX, "--", "true"], tmp_path / "cache",
                      timeout=120, SSL_CERT_DIR=str(empty), SSL_CERT_FILE=str(tmp_path / "empty.pem"),
                      **_config(tmp_path, attempts=4, backoff=1))
        assert r.returncode == 125 and "not trusted here" in r.stderr and "SSL_CERT_FILE" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert time.monotonic() - t0 < 10, "no retry with backoff for an untrusted certificate"
        return
    assert r.returncode == 0, r.stderr
    digest, requests, contexts = r.stdout.split()
    assert digest == "sha256:" + hashlib.sha256(expected).hexdigest()
    # two requests; where the directory cannot verify the registry, one more (the first).
    # A bundle named in SSL_CERT_FILE is parsed only when the directory cannot verify it.
    assert (requests, contexts) == (("2", "directory") if trust in ("directory", "named-bundle")
                                    else ("3", "bundle,directory"))
