"""The recipes NSDF ships (recipes/), built for real in the testbed and run from the cache (issue
10 item 6): `nsdf-python` (Python 3 + numpy) and `nsdf-openvisus` (openvisusnogui from PyPI,
whose smoke test writes a small IDX dataset into the bound working directory and reads it
back).

Their FROM is docker.io/library/debian:12-slim. This machine cannot reach docker.io: the
testbed makes that image from Debian packages (runtimes.sh, step base-images) and serves it
through the docker.io mirror of the site config. The recipes' `apt-get` and `pip` reach Debian's
mirror and PyPI. Each build is tagged with a name of its own (`--tag`), so no other test's image
is replaced, and podman's tags are removed afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from .helpers import nsdf_root, nsdf_user, user_cache

pytestmark = [pytest.mark.integration, pytest.mark.registry, pytest.mark.slow]

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
RUN_ID = uuid.uuid4().hex[:8]

BUILDERS = [
    pytest.param("podman", "podman", marks=pytest.mark.podman, id="podman"),
    pytest.param("buildah", "podman", marks=[pytest.mark.buildah, pytest.mark.podman], id="buildah"),
    pytest.param("ch-image", "charliecloud", marks=pytest.mark.charliecloud, id="ch-image"),
    # as root, apptainer build needs every capability, which the testbed's root lacks (it runs in
    # a container); the unprivileged user builds with --fakeroot, as on a cluster
    pytest.param("apptainer", "apptainer", marks=[pytest.mark.apptainer, pytest.mark.unprivileged],
                 id="apptainer-fakeroot"),
]

#: the command run in each image, and the line it must print
CHECKS = {
    "nsdf-python": (["python3", "-c", "import numpy, sys; print(sys.version_info[0], numpy.arange(4).sum())"],
                    "3 6"),
    # Open MPI linked to the external (Debian) PMIx, and mpi4py; the 2-node run: test_mpi.py
    "nsdf-mpi": (["sh", "-c", "echo $(ompi_info | grep -o 'MCA pmix: ext3x' | head -n 1) "
                              "mpi4py $(python3 -c 'import mpi4py; print(mpi4py.__version__)')"],
                 "MCA pmix: ext3x mpi4py 3.1.4"),
    "nsdf-openvisus": (["python3", "/opt/nsdf/idx_smoke.py", "."],
                       "idx ok: ./smoke/smoke.idx shape=(8, 32, 16) dtype=float32 sum=8386560"),
}


@pytest.fixture
def tags() -> Iterator[List[str]]:
    made: List[str] = []
    yield made
    for tag in made:
        subprocess.run(["podman", "rmi", "--ignore", "--force", f"localhost/{tag}"], capture_output=True)


def _check_run(recipe: str, ran: "subprocess.CompletedProcess[str]", work: Path) -> None:
    assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
    assert ran.stdout.strip().splitlines()[-1] == CHECKS[recipe][1], ran.stdout + ran.stderr[-2000:]
    if recipe == "nsdf-openvisus":      # written through the bind: the dataset is on the host
        assert (work / "smoke" / "smoke.idx").is_file()


@pytest.mark.parametrize("recipe", sorted(CHECKS))
@pytest.mark.parametrize("builder,runtime", BUILDERS)
def test_recipe_builds_offline_and_runs(recipe: str, builder: str, runtime: str, tmp_path: Path,
                                        tags: List[str], request: pytest.FixtureRequest) -> None:
    tag = f"nsdf/wt-{recipe}-{RUN_ID}:v1.0.0"
    tags.append(tag)
    command = CHECKS[recipe][0]
    if builder == "apptainer":
        as_user = request.getfixturevalue("as_user")
        user_dir: Path = request.getfixturevalue("user_dir")
        source = user_dir / recipe
        shutil.copytree(RECIPES / recipe, source)
        work = user_dir / "work"
        work.mkdir()
        for d in (source, work):
            subprocess.run(["chown", "-R", f"{as_user.pw.pw_uid}:{as_user.pw.pw_gid}", str(d)], check=True)
        cache = user_cache(as_user) / f"recipe-{recipe}-{uuid.uuid4().hex[:6]}"
        try:
            built = nsdf_user(as_user, ["build", "--json", "--builder", builder, "--tag", tag, str(source)],
                              cache, cwd=str(user_dir), timeout=900)
            assert built.returncode == 0, built.stderr[-3000:]
            ran = nsdf_user(as_user, ["run", "--runtime", runtime, tag, "--", *command], cache,
                            cwd=str(work))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    else:
        cache = tmp_path / "cache"
        built = nsdf_root(["build", "--json", "--builder", builder, "--tag", tag, str(RECIPES / recipe)],
                          cache, timeout=900)
        assert built.returncode == 0, built.stderr[-3000:]
        work = tmp_path / "work"
        work.mkdir()
        os.chmod(work, 0o755)
        ran = nsdf_root(["run", "--runtime", runtime, tag, "--", *command], cache, cwd=str(work))
    result = json.loads(built.stdout)
    assert (result["tag"], result["builder"], result["runtime"]) == (tag, builder, runtime)
    # FROM went through the docker.io mirror
    assert "docker.io/library/debian:12-slim -> " in built.stderr, built.stderr[-2000:]
    _check_run(recipe, ran, work)
