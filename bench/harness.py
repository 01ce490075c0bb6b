"""Benchmark harness: time commands side by side in one run; medians, ratios, peak memory.

Each case runs a baseline and a candidate alternately (so drift hits both), after a warm-up,
and reports medians in milliseconds, the difference, the ratio and the peak RSS of the
candidate's process (from wait4's rusage). Results are printed as a table and can be saved as
JSON (``--json FILE``). Benchmarks are run on demand, never as part of CI's pass/fail.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence


@dataclass
class Result:
    name: str
    baseline: str
    candidate_ms: float
    baseline_ms: float
    runs: int
    peak_rss_mb: Optional[float] = None
    target: str = ""
    met: Optional[bool] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def added_ms(self) -> float:
        return self.candidate_ms - self.baseline_ms

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.baseline_ms if self.baseline_ms else float("inf")


def time_argv(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              cwd: Optional[str] = None) -> "tuple[float, float]":
    """Wall time (s) and peak RSS (MB) of one run of ``argv``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), env=None if env is None else dict(env), cwd=cwd,
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {' '.join(argv)}\n"
                               f"{err.read()[-2000:].decode(errors='replace')}")
    return dt, usage.ru_maxrss / 1024.0


def compare_commands(name: str, candidate: "Sequence[str] | Callable[[int], Sequence[str]]",
                     baseline: Sequence[str], *, runs: int = 21,
                     warmup: int = 2, env: Optional[Mapping[str, str]] = None,
                     baseline_env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                     baseline_name: str = "", target: str = "",
                     check: Optional[Callable[[Result], bool]] = None) -> Result:
    """``candidate`` may be a function of the run's number (0, 1, ...; the warm-up runs get
    their own numbers) that gives another command line each run: a new command or value."""
    argv_of: Callable[[int], Sequence[str]] = candidate if callable(candidate) else (lambda i: candidate)
    n = 0
    for _ in range(warmup):
        time_argv(argv_of(n), env, cwd)
        n += 1
        time_argv(baseline, baseline_env or env, cwd)
    cand: List[float] = []
    base: List[float] = []
    rss: List[float] = []
    for _ in range(runs):
        dt, mb = time_argv(argv_of(n), env, cwd)
        n += 1
        cand.append(dt)
        rss.append(mb)
        base.append(time_argv(baseline, baseline_env or env, cwd)[0])
    res = Result(name, baseline_name or " ".join(baseline)[:60], statistics.median(cand) * 1000,
                 statistics.median(base) * 1000, runs, max(rss), target)
    if check:
        res.met = check(res)
    return res


def compare_calls(name: str, candidate: Callable[[], object], baseline: Callable[[], object], *,
                  runs: int = 51, warmup: int = 3, baseline_name: str = "", target: str = "",
                  check: Optional[Callable[[Result], bool]] = None) -> Result:
    for _ in range(warmup):
        candidate()
        baseline()
    cand: List[float] = []
    base: List[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        candidate()
        cand.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        baseline()
        base.append(time.perf_counter() - t0)
    res = Result(name, baseline_name, statistics.median(cand) * 1000, statistics.median(base) * 1000,
                 runs, None, target)
    if check:
        res.met = check(res)
    return res


def report(results: Sequence[Result], json_path: Optional[str] = None) -> None:
    head = f"{'benchmark':<44} {'median ms':>10} {'baseline ms':>11} {'added ms':>9} {'ratio':>6} {'peak MB':>8}  target"
    print(head)
    print("-" * len(head))
    for r in results:
        mark = "" if r.met is None else ("  ok" if r.met else "  MISSED")
        rss = f"{r.peak_rss_mb:8.1f}" if r.peak_rss_mb is not None else f"{'':>8}"
        print(f"{r.name:<44} {r.candidate_ms:10.2f} {r.baseline_ms:11.2f} {r.added_ms:9.2f} "
              f"{r.ratio:6.2f} {rss}  {r.target}{mark}")
        for k, v in r.extra.items():
            print(f"{'':<46}{k}: {v}")
    if json_path:
        with open(json_path, "w") as fh:
            json.dump([{**asdict(r), "added_ms": r.added_ms, "ratio": r.ratio} for r in results], fh, indent=1)
        print(f"\nsaved {json_path}", file=sys.stderr)


def bench_venv() -> str:
    """A clean, non-editable install of this checkout in a venv of the system Python, so the
    CLI numbers are what a user's `pip install` gets (an editable install, or a Python whose
    site-packages carry .pth hooks, adds 20-50 ms of start-up to *every* Python program).
    Override with NSDF_BENCH_VENV=/path/to/venv."""
    import hashlib
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.environ.get("NSDF_BENCH_VENV", "/var/tmp/nsdf-hpc-bench-venv")
    h = hashlib.sha256()
    for d, _, files in sorted(os.walk(os.path.join(root, "nsdf_hpc"))):
        for f in sorted(files):
            if f.endswith(".py"):
                with open(os.path.join(d, f), "rb") as fh:
                    h.update(fh.read())
    stamp = os.path.join(venv, ".nsdf-source")
    want = h.hexdigest()
    try:
        with open(stamp) as fh:
            if fh.read() == want:
                return venv
    except OSError:
        pass
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        subprocess.run([py, "-m", "venv", venv], check=True)
    pip = os.path.join(venv, "bin", "pip")
    subprocess.run([pip, "install", "-q", "--force-reinstall", "--no-deps", root], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([pip, "install", "-q", root], check=True, stdout=subprocess.DEVNULL)
    with open(stamp, "w") as fh:
        fh.write(want)
    return venv
