"""The image layer against each runtime's own commands, in one run.

* cold pull + convert: `nsdf-run pull` vs the runtime alone doing the same conversion
  (target: at most 1.05x);
* warm hit of a digest-pinned image (target: at most 20 ms and zero network requests);
* warm hit by tag (target: exactly one manifest request);
* 32 concurrent pulls of one uncached image vs a single pull (target: wall time at most 1.3x).
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List

from harness import Result, bench_venv

REG = os.environ.get("NSDF_BENCH_REGISTRY", "127.0.0.1:5443")
IMAGE = os.environ.get("NSDF_BENCH_IMAGE", f"{REG}/hpc/pydeb:latest")
RUNTIMES = os.environ.get("NSDF_BENCH_RUNTIMES", "apptainer,charliecloud,podman,podman-hpc,udocker").split(",")
RUNS = int(os.environ.get("NSDF_BENCH_RUNS", "3"))
NSDF_RUN = os.path.join(bench_venv(), "bin", "nsdf-run")


def _sh(argv: List[str], env: Dict[str, str], cwd: str = "/tmp") -> None:
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _direct(runtime: str, ref: str, work: str, env: Dict[str, str]) -> Callable[[], None]:
    """The runtime alone, from a clean state, producing what nsdf-run produces."""
    def apptainer() -> None:
        e = {**env, "APPTAINER_CACHEDIR": f"{work}/ac", "APPTAINER_TMPDIR": work}
        _sh(["apptainer", "-s", "pull", f"{work}/x.sif", f"docker://{ref}"], e)

    def charliecloud() -> None:
        e = {**env, "CH_IMAGE_CACHE": "disabled", "USER": env.get("USER", "root")}
        _sh(["ch-image", "-s", f"{work}/st", "pull", ref, "x"], e)
        _sh(["ch-convert", "-i", "dir", "-o", "squash", f"{work}/st/img/x", f"{work}/x.sqfs"], e)

    def podman() -> None:
        subprocess.run(["podman", "rmi", "-a", "-f"], env=env, capture_output=True)
        _sh(["podman", "pull", "-q", ref], env)

    def podman_hpc() -> None:
        # what nsdf-run's plan asks of it: `pull` (which migrates by itself) + an explicit
        # `migrate`, into a squash dir of its own (the writable store is emptied by cold())
        e = {**env, "SQUASH_DIR": f"{work}/squash", "USER": env.get("USER", "root")}
        _sh(["podman-hpc", "pull", "-q", ref], e)
        _sh(["podman-hpc", "migrate", ref], e)

    def udocker() -> None:
        e = {**env, "UDOCKER_DIR": f"{work}/ud"}
        base = ["udocker", "--allow-root"] if os.getuid() == 0 else ["udocker"]
        repo = ref.split("/", 1)[1]
        _sh([*base, "-q", "pull", f"--registry=https://{REG}", repo], e)
        _sh([*base, "-q", "create", "--name=x", repo], e)
    return {"apptainer": apptainer, "charliecloud": charliecloud, "podman": podman, "podman-hpc": podman_hpc,
            "udocker": udocker}[runtime]


def _fresh(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)


def cold(runtime: str) -> Result:
    base = tempfile.mkdtemp(prefix="nsdf-bench-img-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    if runtime == "podman-hpc":
        # a writable store of the bench's own (not the user's), emptied before each side;
        # podman refuses a run root longer than 50 characters
        env.update(PODMANHPC_GRAPH_ROOT=f"{base}/graph", PODMANHPC_RUN_ROOT=tempfile.mkdtemp(prefix="nsdf-ph-"),
                   USER=env.get("USER", "root"))

    def empty_store() -> None:
        if runtime == "podman":   # cold means no layer in the store, under any name
            subprocess.run(["podman", "rmi", "-a", "-f"], capture_output=True)
        elif runtime == "podman-hpc":
            for argv in (["podman-hpc", "rm", "-af"], ["podman-hpc", "rmi", "-af"]):
                subprocess.run(argv, env=env, capture_output=True, cwd="/tmp")
    mine, theirs = [], []
    for _ in range(RUNS):
        _fresh(f"{base}/cache")
        empty_store()
        t0 = time.perf_counter()
        _sh([NSDF_RUN, "-q", "pull", "--runtime", runtime, IMAGE], {**env, "NSDF_HPC_CACHE": f"{base}/cache"})
        mine.append(time.perf_counter() - t0)
        _fresh(f"{base}/direct")
        empty_store()
        t0 = time.perf_counter()
        _direct(runtime, IMAGE, f"{base}/direct", env)()
        theirs.append(time.perf_counter() - t0)
    shutil.rmtree(base, ignore_errors=True)
    r = Result(f"cold pull+convert, {runtime}", f"{runtime} alone", statistics.median(mine) * 1000,
               statistics.median(theirs) * 1000, RUNS, None, "<= 1.05x")
    r.met = r.ratio <= 1.05
    return r


class _CountRequests:
    def __init__(self) -> None:
        self.n = 0
        self._orig = urllib.request.urlopen

    def __enter__(self) -> "_CountRequests":
        def counting(*a, **k):  # type: ignore[no-untyped-def]
            self.n += 1
            return self._orig(*a, **k)
        urllib.request.urlopen = counting  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        urllib.request.urlopen = self._orig  # type: ignore[assignment]


def warm_hits() -> List[Result]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import nsdf_hpc
    cache = tempfile.mkdtemp(prefix="nsdf-bench-warm-")
    client = nsdf_hpc.Client(env={**os.environ, "NSDF_HPC_CACHE": cache})
    native = client.pull(IMAGE, "apptainer")
    pinned = f"{IMAGE.rsplit(':', 1)[0]}@{native.digest}"
    out = []
    for name, ref, target, ok in (
            ("warm hit, digest-pinned (apptainer)", pinned, "<= 20 ms, 0 requests", lambda ms, n: ms <= 20 and n == 0),
            ("warm hit, by tag (apptainer)", IMAGE, "1 manifest request", lambda ms, n: n == 1)):
        times = []
        for _ in range(21):
            with _CountRequests() as c:
                t0 = time.perf_counter()
                client.pull(ref, "apptainer")
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1000
        r = Result(name, "nothing", ms, 0.0, 21, None, target, ok(ms, c.n), {"requests per pull": c.n})
        out.append(r)
    shutil.rmtree(cache, ignore_errors=True)
    return out


def concurrent(runtime: str = "apptainer", n: int = 32) -> Result:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    base = tempfile.mkdtemp(prefix="nsdf-bench-conc-")
    argv = [NSDF_RUN, "-q", "pull", "--runtime", runtime, IMAGE]
    _fresh(f"{base}/one")
    t0 = time.perf_counter()
    _sh(argv, {**env, "NSDF_HPC_CACHE": f"{base}/one"})
    single = time.perf_counter() - t0
    _fresh(f"{base}/many")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(lambda _: _sh(argv, {**env, "NSDF_HPC_CACHE": f"{base}/many"}), range(n)))
    many = time.perf_counter() - t0
    shutil.rmtree(base, ignore_errors=True)
    r = Result(f"{n} concurrent pulls, {runtime}", "a single pull", many * 1000, single * 1000, 1, None, "<= 1.3x")
    r.met = r.ratio <= 1.3
    return r


def run() -> List[Result]:
    results = [cold(rt) for rt in RUNTIMES]
    results += warm_hits()
    results.append(concurrent())
    return results


if __name__ == "__main__":
    from harness import report
    report(run())
