"""`nsdf-run --version` start-up time and peak memory against `python -c pass`.

Target: at most 40 ms added, at most 35 MB peak.
"""
from __future__ import annotations

import os
import sys

from harness import Result, compare_commands

BIN = os.path.dirname(sys.executable)


def run(runs: int = 21) -> list:
    nsdf_run = os.path.join(BIN, "nsdf-run")
    return [compare_commands("nsdf-run --version (start-up)", [nsdf_run, "--version"],
                             [sys.executable, "-c", "pass"], runs=runs, baseline_name="python -c pass",
                             target="<= 40 ms added, <= 35 MB",
                             check=lambda r: r.added_ms <= 40 and (r.peak_rss_mb or 0) <= 35),
            compare_commands("nsdf-run --help", [nsdf_run, "--help"],
                             [sys.executable, "-c", "pass"], runs=runs, baseline_name="python -c pass")]


if __name__ == "__main__":
    from harness import report
    report(run())
