"""`nsdf-run build` against the builder alone on the same recipe, side by side in one run
(issue 10's target: at most 1.05x).

* podman, unchanged recipe (its layer cache warm on both sides): what a user's rebuild costs;
* ch-image from scratch (its build cache is disabled on both sides) + the SquashFS conversion.

The builder alone gets the Dockerfile nsdf-run would write (FROM through the site's mirror) and
the same flags. Needs the testbed (the recipe's base comes from its registry).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Dict, List

from harness import Result, bench_venv, compare_commands

RUNS = int(os.environ.get("NSDF_BENCH_RUNS", "5"))
NSDF_RUN = os.path.join(bench_venv(), "bin", "nsdf-run")
MIRROR = os.environ.get("NSDF_BENCH_REGISTRY", "127.0.0.1:5443")
DOCKERFILE = """\
FROM {base}
LABEL org.opencontainers.image.title="nsdf/bench-build" org.opencontainers.image.version="v0.1.0"
ENV GREETING="hello"
COPY hello.sh /opt/hello.sh
RUN chmod 755 /opt/hello.sh && echo "$GREETING" > /opt/greeting && ls -R /etc > /opt/etc.txt
CMD ["/opt/hello.sh"]
"""


def _recipe(d: str) -> str:
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "Dockerfile"), "w") as fh:
        fh.write(DOCKERFILE.format(base="docker.io/library/busybox:latest"))
    with open(os.path.join(d, "Dockerfile.mirrored"), "w") as fh:
        fh.write(DOCKERFILE.format(base=f"{MIRROR}/library/busybox:latest"))
    with open(os.path.join(d, "hello.sh"), "w") as fh:
        fh.write("#!/bin/sh\ncat /opt/greeting\n")
    return d


def run() -> List[Result]:
    work = tempfile.mkdtemp(prefix="nsdf-bench-build-", dir="/var/tmp")
    recipe = _recipe(os.path.join(work, "recipe"))
    env: Dict[str, str] = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env["NSDF_HPC_CACHE"] = os.path.join(work, "cache")
    env.setdefault("USER", "root")
    results = []
    try:
        results.append(compare_commands(
            "build: podman, unchanged recipe (layers warm)",
            [NSDF_RUN, "-q", "build", "--builder", "podman", recipe],
            ["podman", "build", "--pull=missing", "--layers", "--iidfile", f"{work}/iid", "-t",
             "nsdf/bench-build:v0.1.0", "-f", f"{recipe}/Dockerfile.mirrored", recipe],
            runs=RUNS, warmup=1, env=env, baseline_name="podman build (same flags)",
            target="<= 1.05x", check=lambda r: r.ratio <= 1.05))
        storage = os.path.join(work, "ch")
        results.append(compare_commands(
            "build: ch-image from scratch + SquashFS",
            [NSDF_RUN, "-q", "build", "--builder", "ch-image", recipe],
            ["sh", "-c", 'rm -rf "$1" && ch-image -s "$1" build --force -t nsdf -f "$2" "$3" && '
             'ch-convert --no-clobber -i dir -o squash "$1/img/nsdf" "$1.sqfs" && rm -rf "$1" "$1.sqfs"',
             "sh", storage, f"{recipe}/Dockerfile.mirrored", recipe],
            runs=RUNS, warmup=1, env={**env, "CH_IMAGE_CACHE": "disabled"},
            baseline_name="ch-image build + ch-convert", target="<= 1.05x",
            check=lambda r: r.ratio <= 1.05))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(["podman", "rmi", "--ignore", "--force", "localhost/nsdf/bench-build:v0.1.0"],
                       capture_output=True)
    return results
