"""Benchmark harness: time commands side by side in one run; medians, ratios, peak memory.

Each case runs a baseline and a candidate alternately (so drift hits both), after a warm-up,
and reports medians in milliseconds, the difference, the ratio and the peak RSS of the
candidate's and the baseline's process trees (``peak_rss``). Results are printed as a table and
can be saved as JSON (``--json FILE``). Benchmarks are run on demand, never as part of CI's
pass/fail.
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
    baseline_rss_mb: Optional[float] = None
    met: Optional[bool] = None
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def added_ms(self) -> float:
        return self.candidate_ms - self.baseline_ms

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.baseline_ms if self.baseline_ms else float("inf")


#: started as ``python -I -S -c _SPAWN ARGV...``: runs ARGV (stdin and stdout /dev/null, stderr
#: passed on) and prints its peak RSS in KiB from wait4's rusage
_SPAWN = """
import os, sys
null = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0), (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)]
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=null)
_, status, usage = os.wait4(pid, 0)
sys.stdout.write("%d %d" % (os.waitstatus_to_exitcode(status), usage.ru_maxrss))
"""


def _spawned(argv: Sequence[str], env: Optional[Mapping[str, str]], cwd: Optional[str]) -> "tuple[float, str]":
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, "-I", "-S", "-c", _SPAWN, *argv], env=None if env is None else dict(env),
                              cwd=cwd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        err.seek(0)
        text = err.read().decode(errors="replace")
    rc, kib = (int(x) for x in proc.stdout.split())
    if rc != 0:
        raise RuntimeError(f"{argv[0]} exited {rc}: {' '.join(argv)}\n{text[-2000:]}")
    return kib / 1024.0, text


def peak_rss(argv: Sequence[str], env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> float:
    """Peak RSS (MB) of one run of ``argv`` and its waited-for children, started by a small
    spawner process (``python -I -S``, about 8 MB: the floor of this measure).

    Not the rusage of a process this harness starts itself: at ``exec`` the kernel records the
    high-water RSS of the memory the new program replaces (``exec_mmap``), which for a
    ``fork``/``vfork``/``posix_spawn`` child is the parent's. Every command this harness
    started reported the harness's own peak (39.5 MB for every ``nsdf-run run`` row of the
    runtimes bench, ``ch-run`` included) until 2026-12-02."""
    return _spawned(argv, env, cwd)[0]


#: ``python -c _OWN ARGS...`` is ``nsdf-run ARGS...`` that also prints its own process's peak
#: RSS (KiB) at exit; a launch record's ``exec`` prints nothing (the runtime replaced it)
_OWN = """
import atexit, os, resource, sys
atexit.register(lambda: os.write(2, b"\\nnsdf-bench-own-rss %d\\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
sys.argv = ["nsdf-run", *sys.argv[1:]]
from nsdf_hpc._entry import main
sys.exit(main())
"""


def own_peak_rss(python: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None,
                 cwd: Optional[str] = None) -> Optional[float]:
    """Peak RSS (MB) of the ``nsdf-run ARGS`` process alone, without the runtime it starts
    (a runtime such as Apptainer or podman is 35-40 MB itself); None when the process was
    replaced by the runtime (the launch record's ``exec``)."""
    text = _spawned([python, "-c", _OWN, *args], env, cwd)[1]
    marks = [line.split()[1] for line in text.splitlines() if line.startswith("nsdf-bench-own-rss ")]
    return int(marks[-1]) / 1024.0 if marks else None


def time_argv(argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              cwd: Optional[str] = None) -> "tuple[float, float]":
    """Wall time (s) and rusage's peak RSS (MB) of one run of ``argv``: the latter is this
    harness's own peak or more (``peak_rss`` says why), so the tables use ``peak_rss``."""
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
                     check: Optional[Callable[[Result], bool]] = None, memory_runs: int = 3) -> Result:
    """``candidate`` may be a function of the run's number (0, 1, ...; the warm-up runs get
    their own numbers) that gives another command line each run: a new command or value.
    After the timed runs, ``memory_runs`` more of each through ``peak_rss``: the highest peak."""
    argv_of: Callable[[int], Sequence[str]] = candidate if callable(candidate) else (lambda i: candidate)
    n = 0
    for _ in range(warmup):
        time_argv(argv_of(n), env, cwd)
        n += 1
        time_argv(baseline, baseline_env or env, cwd)
    cand: List[float] = []
    base: List[float] = []
    for _ in range(runs):
        cand.append(time_argv(argv_of(n), env, cwd)[0])
        n += 1
        base.append(time_argv(baseline, baseline_env or env, cwd)[0])
    rss: List[float] = []
    base_rss: List[float] = []
    for _ in range(memory_runs):
        rss.append(peak_rss(argv_of(n), env, cwd))
        n += 1
        base_rss.append(peak_rss(baseline, baseline_env or env, cwd))
    res = Result(name, baseline_name or " ".join(baseline)[:60], statistics.median(cand) * 1000,
                 statistics.median(base) * 1000, runs, max(rss, default=None), target,
                 baseline_rss_mb=max(base_rss, default=None))
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
    head = (f"{'benchmark':<44} {'median ms':>10} {'baseline ms':>11} {'added ms':>9} {'ratio':>6} "
            f"{'peak MB':>8} {'base MB':>8}  target")
    print(head)
    print("-" * len(head))
    for r in results:
        mark = "" if r.met is None else ("  ok" if r.met else "  MISSED")
        rss = " ".join(f"{mb:8.1f}" if mb is not None else f"{'':>8}" for mb in (r.peak_rss_mb, r.baseline_rss_mb))
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
