"""Start-up against `python -c pass`: `nsdf-run --version` (target: at most 40 ms added, at
most 35 MB peak), `import nsdf_hpc` (at most 20 ms added), `nsdf-run images` and `runtimes`
(at most 100 ms in all, warm; issue 11 goal 3), and `status` against its one `sacct` call (at
most 100 ms added); each of the last three beside its full path (`NSDF_HPC_NO_FAST_PATH=1`).
"""
from __future__ import annotations

import os
import shutil
import subprocess

from harness import bench_venv, compare_commands


def run(runs: int = 21) -> list:
    venv = bench_venv()
    nsdf_run, python = os.path.join(venv, "bin", "nsdf-run"), os.path.join(venv, "bin", "python")
    return [compare_commands("nsdf-run --version (start-up)", [nsdf_run, "--version"],
                             [python, "-c", "pass"], runs=runs, baseline_name="python -c pass",
                             target="<= 40 ms added, <= 35 MB",
                             check=lambda r: r.added_ms <= 40 and (r.peak_rss_mb or 0) <= 35),
            compare_commands("python -c 'import nsdf_hpc'", [python, "-c", "import nsdf_hpc"],
                             [python, "-c", "pass"], runs=runs, baseline_name="python -c pass",
                             target="<= 20 ms added", check=lambda r: r.added_ms <= 20),
            compare_commands("nsdf-run --help (imports click)", [nsdf_run, "--help"],
                             [python, "-c", "pass"], runs=runs, baseline_name="python -c pass"),
            # warm: the detection cache and the image cache as a previous call left them
            compare_commands("nsdf-run images", [nsdf_run, "images"], [python, "-c", "pass"], runs=runs,
                             baseline_name="python -c pass", target="<= 100 ms",
                             check=lambda r: r.candidate_ms <= 100),
            # the first listing of new settings (or NSDF_HPC_NO_FAST_PATH=1): click and the models
            compare_commands("nsdf-run images, full path", [nsdf_run, "images"], [python, "-c", "pass"],
                             runs=runs, env={**os.environ, "NSDF_HPC_NO_FAST_PATH": "1"},
                             baseline_name="python -c pass"),
            compare_commands("nsdf-run runtimes", [nsdf_run, "runtimes"], [python, "-c", "pass"], runs=runs,
                             baseline_name="python -c pass", target="<= 100 ms",
                             check=lambda r: r.candidate_ms <= 100),
            # the kept answer's inputs changed (or NSDF_HPC_NO_FAST_PATH=1): click, the models, detection
            compare_commands("nsdf-run runtimes, full path", [nsdf_run, "runtimes"], [python, "-c", "pass"],
                             runs=runs, env={**os.environ, "NSDF_HPC_NO_FAST_PATH": "1"},
                             baseline_name="python -c pass")] + _status(nsdf_run, runs)


def _status(nsdf_run: str, runs: int) -> list:
    """`nsdf-run status JOBID` of a finished job against the one `sacct` query it makes
    (target: at most 100 ms more). Needs Slurm (the testbed); skipped without sbatch."""
    if not shutil.which("sbatch"):
        return []
    out = subprocess.run(["sbatch", "--parsable", "--wait", "-o", "/dev/null", "--wrap", "true"],
                         capture_output=True, text=True, check=True).stdout
    job = out.strip().split(";")[0]
    sacct = ["sacct", "--parsable2", "--noheader", "-X", "-o", "JobID,State,ExitCode,Reason,NodeList,JobName",
             "-j", job]
    subprocess.run([nsdf_run, "status", job], capture_output=True, check=True)   # validates the settings
    return [compare_commands("nsdf-run status JOBID (sacct)", [nsdf_run, "status", job], sacct,
                             runs=runs, baseline_name="sacct -j JOBID", target="<= 100 ms added",
                             check=lambda r: r.added_ms <= 100),
            # the first status of new settings, an array, or NSDF_HPC_NO_FAST_PATH=1: click and the models
            compare_commands("nsdf-run status JOBID, full path", [nsdf_run, "status", job], sacct,
                             runs=runs, env={**os.environ, "NSDF_HPC_NO_FAST_PATH": "1"},
                             baseline_name="sacct -j JOBID")]


if __name__ == "__main__":
    from harness import report
    report(run())
