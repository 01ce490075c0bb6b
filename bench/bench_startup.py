"""`nsdf-run --version` start-up time and peak memory against `python -c pass`.

Target: at most 40 ms added, at most 35 MB peak.
"""
from __future__ import annotations

import os

from harness import bench_venv, compare_commands


def run(runs: int = 21) -> list:
    venv = bench_venv()
    nsdf_run, python = os.path.join(venv, "bin", "nsdf-run"), os.path.join(venv, "bin", "python")
    return [compare_commands("nsdf-run --version (start-up)", [nsdf_run, "--version"],
                             [python, "-c", "pass"], runs=runs, baseline_name="python -c pass",
                             target="<= 40 ms added, <= 35 MB",
                             check=lambda r: r.added_ms <= 40 and (r.peak_rss_mb or 0) <= 35),
            compare_commands("nsdf-run --help (imports click)", [nsdf_run, "--help"],
                             [python, "-c", "pass"], runs=runs, baseline_name="python -c pass")]


if __name__ == "__main__":
    from harness import report
    report(run())
