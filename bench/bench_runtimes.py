"""The runtime layer's overhead, side by side with each runtime's own command in one run.

* `nsdf-run run --runtime R IMG -- true` vs the exact argv nsdf-run would run (from its
  dry-run plan), per real runtime. Target: at most 40 ms added.
* `Client.run()` in a warm Python process vs calling the runtime directly through the same
  executor. Target: at most 2 ms added.
* Warm detection (target <= 5 ms) and cold detection of all runtimes (target <= 300 ms).
* Peak memory of `nsdf-run run` (issue 11 goal 4: at most 35 MB): the whole process tree beside
  the runtime's own command (`peak MB`, `base MB`), and nsdf-run's own process apart (`own peak
  MB`), since Apptainer and podman are 35-40 MB themselves.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

from harness import bench_venv, compare_calls, compare_commands, own_peak_rss

IMAGE = os.environ.get("NSDF_BENCH_IMAGE", "127.0.0.1:5443/hpc/busybox:latest")
RUNTIMES = os.environ.get("NSDF_BENCH_RUNTIMES", "apptainer,charliecloud,podman,podman-hpc,udocker").split(",")


def run(runs: int = 15) -> list:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import nsdf_hpc
    from nsdf_hpc._exec import SubprocessRunner

    cache = tempfile.mkdtemp(prefix="nsdf-bench-cache-")
    work = tempfile.mkdtemp(prefix="nsdf-bench-work-")
    env = {**os.environ, "NSDF_HPC_CACHE": cache}
    client = nsdf_hpc.Client(env=env)
    nsdf_run = os.path.join(bench_venv(), "bin", "nsdf-run")
    results = []
    runner = SubprocessRunner()
    python = os.path.join(bench_venv(), "bin", "python")

    def own_peak(res, args, env):   # nsdf-run's own process, without the runtime it starts
        peaks = [own_peak_rss(python, args, env, work) for _ in range(3)]
        known = [p for p in peaks if p is not None]
        res.extra["own peak MB"] = f"{max(known):.1f}" if known else "replaced by the runtime (exec)"
        if known:
            res.target = (res.target + ", " if res.target else "") + "own <= 35 MB"
            res.met = (res.met is not False) and max(known) <= 35
        return res

    for name in RUNTIMES:
        client.pull(IMAGE, name)
        spec = client.spec(IMAGE, ["true"], cwd=work)
        inv, native, rt = client.invocation(spec, name)
        client.prepare(inv, rt)   # the private copy of a directory image first, then mount points
        planned_env = {**env, "NSDF_HPC_NO_FAST_PATH": "1"}
        results.append(own_peak(compare_commands(
            f"nsdf-run run --runtime {name} -- true (planned)",
            [nsdf_run, "run", "--runtime", name, IMAGE, "--", "true"],
            list(inv.argv), env=planned_env, baseline_env=inv.env, cwd=work,
            runs=max(5, runs // 3), baseline_name=f"{os.path.basename(inv.argv[0])} directly"),
            ["run", "--runtime", name, IMAGE, "--", "true"], planned_env))
        # another directory bound each run (a task's own input: -B $SCRATCH/run$ID:/mnt), against
        # the runtime's argv for one such bind; /mnt is in busybox (charliecloud keeps it)
        dirs = [os.path.join(work, f"task-{i}") for i in range(runs + 8)]   # warm-up runs included
        for d in dirs:
            os.makedirs(d, exist_ok=True)
        binv, _, _ = client.invocation(client.spec(IMAGE, ["true"], cwd=work, binds=[f"{dirs[0]}:/mnt"]), name)
        client.prepare(binv, rt)
        # the same line again (the launch record), then a new command line each run (issue 11
        # goal 1): a job script's per-task arguments, values and directories, served by the
        # record of any command, any --env values and any bind directories
        for label, argv_of, base in (
                ("-- true", lambda i: [IMAGE, "--", "true"], inv),
                ("-- echo N (new each run)", lambda i: [IMAGE, "--", "echo", str(i)], inv),
                ("-e TASK=N -- true (new each run)", lambda i: ["-e", f"TASK=task {i}", IMAGE, "--", "true"], inv),
                ("-B DIR_N:/mnt -- true (new each run)",
                 lambda i: ["-B", f"{dirs[i % len(dirs)]}:/mnt", IMAGE, "--", "true"], binv)):
            res = compare_commands(
                f"nsdf-run run -r {name} {label}", lambda i, f=argv_of: [nsdf_run, "run", "--runtime", name, *f(i)],
                list(base.argv), env=env, baseline_env=base.env, cwd=work, runs=runs,
                baseline_name=f"{os.path.basename(base.argv[0])} directly", target="<= 40 ms added",
                check=lambda r: r.added_ms <= 40)
            results.append(own_peak(res, ["run", "--runtime", name, *argv_of(0)], env) if label == "-- true" else res)
        # a fresh research script: import nsdf_hpc and one run() (issue 11 goal 2)
        script = f"import nsdf_hpc; nsdf_hpc.run({IMAGE!r}, ['true'], runtime={name!r}, cwd={work!r})"
        results.append(compare_commands(
            f"python: import nsdf_hpc; run(), {name}", [os.path.join(bench_venv(), "bin", "python"), "-c", script],
            list(inv.argv), env=env, baseline_env=inv.env, cwd=work, runs=max(5, runs // 3),
            baseline_name=f"{os.path.basename(inv.argv[0])} directly", target="<= 80 ms added",
            check=lambda r: r.added_ms <= 80))
        results.append(compare_calls(
            f"Client.run() warm, {name}", lambda: client.run(IMAGE, ["true"], runtime=name, cwd=work),
            lambda: runner.run(inv.argv, env=inv.env, check=False, cwd=work), runs=runs,
            baseline_name="executor, same argv", target="<= 2 ms added", check=lambda r: r.added_ms <= 2))
    # detection
    warm_client = nsdf_hpc.Client(env=env)
    warm_client.detect()
    results.append(compare_calls(
        "detect() warm (cached probes)", lambda: nsdf_hpc.Client(env=env).detect(), lambda: None,
        runs=51, baseline_name="nothing", target="<= 5 ms", check=lambda r: r.candidate_ms <= 5))
    results.append(compare_calls(
        "detect() cold (all probes)", lambda: nsdf_hpc.Client(env=env).detect(refresh=True), lambda: None,
        runs=11, baseline_name="nothing", target="<= 300 ms", check=lambda r: r.candidate_ms <= 300))
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    from harness import report
    report(run())
