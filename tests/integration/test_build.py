"""Recipes to images for real: `nsdf-run build` with every builder the testbed has (podman as
root and as the unprivileged user, buildah, ch-image, apptainer from the generated definition),
then `nsdf-run run` of the tag straight from the cache, with no registry.

The recipe's FROM names docker.io: the testbed has no internet, so the build works only because
the site config (/etc/nsdf-hpc/config.toml) mirrors docker.io to the local registry.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from .helpers import nsdf_root, nsdf_user, user_cache

pytestmark = [pytest.mark.integration, pytest.mark.registry]

GREETING = "hello from an nsdf recipe"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")   # as tests/conftest.py
NAME = f"nsdf/wt-build-test-{uuid.uuid4().hex[:8]}"
TAG = f"{NAME}:v0.1.0"
DOCKERFILE = f"""\
# a tiny recipe: FROM through the site mirror, LABEL name/version, ENV, COPY, RUN, CMD
FROM docker.io/library/busybox:latest
LABEL org.opencontainers.image.title="{NAME}" \\
      org.opencontainers.image.version="v0.1.0"
ENV GREETING="{GREETING}"
COPY hello.sh /opt/hello.sh
RUN chmod 755 /opt/hello.sh \\
 && echo "$GREETING" > /opt/greeting
CMD ["/opt/hello.sh"]
"""
#: a config whose docker.io mirror does not exist: a run that reached for a registry would fail
NO_REGISTRY = '[mirrors]\n"docker.io" = "127.0.0.1:9"\n'


def _write_recipe(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "Dockerfile").write_text(DOCKERFILE)
    (d / "hello.sh").write_text("#!/bin/sh\ncat /opt/greeting\n")
    for p in (d, d / "Dockerfile", d / "hello.sh"):
        os.chmod(p, 0o755)
    return d


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return _write_recipe(tmp_path / "recipe")


@pytest.fixture
def no_registry(tmp_path: Path) -> str:
    conf = tmp_path / "no-registry.toml"
    conf.write_text(NO_REGISTRY)
    os.chmod(tmp_path, 0o755)
    os.chmod(conf, 0o644)
    return str(conf)


def _user_no_registry(user_dir: Path) -> str:
    conf = user_dir / "no-registry.toml"
    conf.write_text(NO_REGISTRY)
    os.chmod(conf, 0o644)
    return str(conf)


@pytest.fixture(autouse=True)
def _remove_podman_images() -> Iterator[None]:
    """Builds by podman/buildah tag NAME in a podman store: remove those tags afterwards."""
    yield
    subprocess.run(["podman", "rmi", "--ignore", "--force", f"localhost/{TAG}"], capture_output=True)


def _built(stdout: str) -> dict:
    return dict(json.loads(stdout))


@pytest.mark.parametrize("builder,runtime", [
    pytest.param("podman", "podman", marks=pytest.mark.podman, id="podman"),
    pytest.param("buildah", "podman", marks=[pytest.mark.buildah, pytest.mark.podman], id="buildah"),
    pytest.param("ch-image", "charliecloud", marks=pytest.mark.charliecloud, id="ch-image"),
])
def test_build_as_root_then_run_without_a_registry(builder: str, runtime: str, recipe: Path,
                                                   tmp_path: Path, no_registry: str) -> None:
    cache = tmp_path / "cache"
    res = nsdf_root(["build", "--json", "--builder", builder, str(recipe)], cache)
    assert res.returncode == 0, res.stderr[-2000:]
    built = _built(res.stdout)
    assert (built["tag"], built["builder"], built["runtime"]) == (TAG, builder, runtime)
    assert built["digest"].startswith("sha256:") and built["image"]["digest"] == built["digest"]
    # the entry is in the cache, keyed by the digest, under the tag
    listed = json.loads(nsdf_root(["images", "--json"], cache).stdout)
    assert [(e["runtime"], e["digest"], e["source"]) for e in listed] == [(runtime, built["digest"], TAG)]
    ran = nsdf_root(["run", "--runtime", runtime, TAG, "--", "/opt/hello.sh"], cache,
                    NSDF_HPC_CONFIG=no_registry)
    assert (ran.returncode, ran.stdout.strip()) == (0, GREETING), ran.stderr[-2000:]
    ran = nsdf_root(["run", "--runtime", runtime, TAG, "--", "sh", "-c", 'echo "$GREETING"'], cache,
                    NSDF_HPC_CONFIG=no_registry)
    assert (ran.returncode, ran.stdout.strip()) == (0, GREETING), ran.stderr[-2000:]
    # a second build of the same recipe is the same tag, still runnable, nothing left in tmp/
    again = nsdf_root(["build", "--json", "--builder", builder, str(recipe)], cache)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not [p for p in (cache / "tmp").iterdir() if not p.name.startswith("trash-")]


@pytest.mark.podman
def test_the_choice_is_explained_and_an_unusable_forced_builder_lists_what_was_found(
        recipe: Path, tmp_path: Path) -> None:
    # a PATH with podman and Charliecloud only: buildah cannot be found
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("podman", "ch-image", "ch-convert", "ch-run"):
        found = shutil.which(tool)
        assert found
        (bindir / tool).symlink_to(found)
    path = f"{bindir}:/usr/local/sbin"
    res = nsdf_root(["build", "--builder", "buildah", str(recipe)], tmp_path / "cache", PATH=path)
    assert res.returncode != 0
    assert "builder 'buildah' was requested (--builder) but cannot be used: not found" in res.stderr
    assert "builders found here: podman 4" in res.stderr and "ch-image 0." in res.stderr
    dry = nsdf_root(["build", "--dry-run", "--runtime", "podman", str(recipe)], tmp_path / "cache",
                    PATH=path)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == "builder: podman (first usable builder for the podman runtime)"
    assert any(ln.startswith("  not ch-image: usable, but builds for charliecloud") for ln in lines)
    assert any(ln.startswith("  not buildah: not found on PATH") for ln in lines)
    argv = [ln for ln in lines if ln.startswith(str(bindir / "podman"))]
    assert len(argv) == 1 and f" -t {TAG} " in argv[0]
    # the Dockerfile the builder reads has FROM through the site's docker.io mirror
    assert " --pull=missing " in argv[0]


@pytest.mark.podman
def test_a_version_that_is_not_vxyz_is_refused(recipe: Path, tmp_path: Path) -> None:
    (recipe / "Dockerfile").write_text(DOCKERFILE.replace('version="v0.1.0"', 'version="0.1"'))
    res = nsdf_root(["build", "--builder", "podman", str(recipe)], tmp_path / "cache")
    assert res.returncode == 2 and "version '0.1' is not vX.Y.Z" in res.stderr


@pytest.mark.unprivileged
@pytest.mark.parametrize("builder,runtime", [
    pytest.param("podman", "podman", marks=pytest.mark.podman, id="podman-rootless"),
    pytest.param("buildah", "podman", marks=[pytest.mark.buildah, pytest.mark.podman], id="buildah-rootless"),
    pytest.param("ch-image", "charliecloud", marks=pytest.mark.charliecloud, id="ch-image"),
    pytest.param("apptainer", "apptainer", marks=pytest.mark.apptainer, id="apptainer-fakeroot"),
])
def test_build_as_the_unprivileged_user(builder: str, runtime: str, as_user, user_dir: Path  # type: ignore[no-untyped-def]
                                        ) -> None:
    recipe = _write_recipe(user_dir / "recipe")
    no_registry = _user_no_registry(user_dir)
    cache = user_cache(as_user) / f"build-{builder}-{uuid.uuid4().hex[:6]}"
    try:
        res = nsdf_user(as_user, ["build", "--json", "--builder", builder, str(recipe)], cache,
                        cwd=str(user_dir))
        assert res.returncode == 0, res.stderr[-2000:]
        built = _built(res.stdout)
        assert (built["tag"], built["runtime"]) == (TAG, runtime)
        ran = nsdf_user(as_user, ["run", "--runtime", runtime, TAG, "--", "sh", "-c",
                                  'cat /opt/greeting; id -un'], cache, cwd=str(user_dir),
                        NSDF_HPC_CONFIG=no_registry)
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert GREETING in ran.stdout
        assert ran.stdout.strip().splitlines()[-1] == as_user.user
    finally:
        if runtime == "podman":
            as_user.run(["podman", "rmi", "--ignore", "--force", f"localhost/{TAG}"])
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.unprivileged
@pytest.mark.apptainer
def test_apptainer_is_the_automatic_choice_and_the_tag_runs_with_the_default_runtime(  # type: ignore[no-untyped-def]
        as_user, user_dir: Path) -> None:
    """The user's default runtime is Apptainer (NSDF's order): the Dockerfile is converted with
    spython, built from the definition, and `nsdf-run run TAG` runs it with no --runtime."""
    recipe = _write_recipe(user_dir / "recipe")
    no_registry = _user_no_registry(user_dir)
    cache = user_cache(as_user) / f"build-auto-{uuid.uuid4().hex[:6]}"
    try:
        dry = nsdf_user(as_user, ["build", "--dry-run", str(recipe)], cache, cwd=str(user_dir))
        assert dry.returncode == 0, dry.stderr
        out: List[str] = dry.stdout.splitlines()
        assert out[0] == "builder: apptainer (first usable builder for the apptainer runtime)"
        assert "Bootstrap: docker" in out and "%runscript" in out
        # FROM docker.io/... goes through the site's mirror (the testbed has no internet)
        assert "From: 127.0.0.1:5443/library/busybox:latest" in out
        res = nsdf_user(as_user, ["build", str(recipe)], cache, cwd=str(user_dir))
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.startswith(f"built: {TAG} -> apptainer: ") and ".sif" in res.stdout
        ran = nsdf_user(as_user, ["run", TAG, "--", "/opt/hello.sh"], cache, cwd=str(user_dir),
                        NSDF_HPC_CONFIG=no_registry)
        assert (ran.returncode, ran.stdout.strip()) == (0, GREETING), ran.stderr[-2000:]
        # another runtime was not built for: a clear error, never the registry's image
        other = nsdf_user(as_user, ["run", "--runtime", "charliecloud", TAG, "--", "true"], cache,
                          cwd=str(user_dir), NSDF_HPC_CONFIG=no_registry)
        assert other.returncode == 125
        assert f"{TAG} was built here for apptainer, not for charliecloud" in other.stderr
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ---------------------------------------------------------------- push with a login
def _auth_registry(testbed: Dict[str, str]) -> Tuple[str, str, str]:
    """(address, user, password) of the testbed's registry that requires a login."""
    addr = testbed.get("NSDF_TESTBED_REGISTRY_AUTH")
    pwfile = testbed.get("NSDF_TESTBED_REGISTRY_AUTH_PASSWORD_FILE", "")
    if not addr or not os.path.isfile(pwfile):
        why = "the testbed has no registry that requires a login (runtimes.sh registry-auth)"
        if IN_CI:
            pytest.fail(f"CI=true and the testbed is required: {why}", pytrace=False)
        pytest.skip(why)
    return addr, testbed.get("NSDF_TESTBED_REGISTRY_AUTH_USER", "nsdf-ci"), Path(pwfile).read_text().strip()


def _cmdlines_with(secret: bytes, stop: threading.Event, found: List[str], seen: List[int]) -> None:
    """Scan every process's argv until ``stop``; record any that holds ``secret``."""
    while not stop.is_set():
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            seen[0] += 1
            if secret in cmd:
                found.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
        time.sleep(0.005)


@pytest.mark.podman
@pytest.mark.apptainer
@pytest.mark.charliecloud
def test_push_and_pull_with_a_login_keep_the_password_out_of_every_argv(recipe: Path, tmp_path: Path,
                                                                 testbed: Dict[str, str]) -> None:
    addr, user, password = _auth_registry(testbed)
    cache = tmp_path / "cache"
    built = nsdf_root(["build", "--json", "--builder", "podman", str(recipe)], cache)
    assert built.returncode == 0, built.stderr[-2000:]
    # no credentials: a clear error naming the ways to log in
    res = nsdf_root(["push", TAG, "--to", addr], cache)
    assert res.returncode == 1
    assert f"registry {addr} requires a login to push" in res.stderr and "NSDF_HPC_REGISTRY_USER" in res.stderr
    # a wrong password: refused, and the (wrong) password is nowhere in the output
    res = nsdf_root(["push", TAG, "--to", addr], cache, NSDF_HPC_REGISTRY_USER=user,
                    NSDF_HPC_REGISTRY_PASSWORD="not-the-password")
    assert res.returncode == 1
    assert f"registry {addr} refused the credentials from NSDF_HPC_REGISTRY_USER" in res.stderr
    assert "not-the-password" not in res.stderr + res.stdout
    # the watcher itself sees a secret in a short-lived process's argv
    stop, found, seen = threading.Event(), [], [0]
    watcher = threading.Thread(target=_cmdlines_with, args=(b"decoy-" + password.encode()[:4], stop, found, seen))
    watcher.start()
    subprocess.run(["sh", "-c", "sleep 0.2", "decoy-" + password[:4]], check=True)
    stop.set()
    watcher.join()
    assert found, "the /proc/*/cmdline watcher missed a process"
    # the right one, with debug logging, while every process's argv is watched
    stop, found, seen = threading.Event(), [], [0]
    watcher = threading.Thread(target=_cmdlines_with, args=(password.encode(), stop, found, seen))
    watcher.start()
    try:
        res = nsdf_root(["-vv", "push", "--json", TAG, "--to", addr], cache,
                        NSDF_HPC_REGISTRY_USER=user, NSDF_HPC_REGISTRY_PASSWORD=password)
    finally:
        stop.set()
        watcher.join()
    assert res.returncode == 0, res.stderr[-2000:]
    assert seen[0] > 0 and found == [], found
    assert password not in res.stderr + res.stdout                       # not in the debug log
    assert "podman push --digestfile" in res.stderr                      # the log did show argv
    pushed = json.loads(res.stdout)
    assert pushed["destination"] == f"{addr}/{NAME}:v0.1.0" and pushed["digest"].startswith("sha256:")
    assert not list((cache / "tmp").glob("push-*"))                      # the auth file is gone
    # the registry has it under that digest, read with the same credentials (nsdf-hpc's client)
    from nsdf_hpc.reference import parse_reference
    from nsdf_hpc.registry import RegistryClient
    creds = {"NSDF_HPC_REGISTRY_USER": user, "NSDF_HPC_REGISTRY_PASSWORD": password, "HOME": str(tmp_path)}
    info = RegistryClient(addr, env=creds).manifest(parse_reference(pushed["destination"]))
    assert info.digest == pushed["digest"]

    # pull it back with the login through every runtime that can, argv watched again
    dest = pushed["destination"]
    bad = nsdf_root(["pull", "--runtime", "podman", dest], tmp_path / "pull-bad",
                    NSDF_HPC_REGISTRY_USER=user, NSDF_HPC_REGISTRY_PASSWORD="not-the-password")
    assert bad.returncode == 1 and f"registry {addr} denied access" in bad.stderr, bad.stderr
    assert "HTTP 401" in bad.stderr and "not-the-password" not in bad.stderr
    for runtime in ("podman", "apptainer", "charliecloud"):
        pulled_cache = tmp_path / f"pull-{runtime}"
        stop, found, seen = threading.Event(), [], [0]
        watcher = threading.Thread(target=_cmdlines_with, args=(password.encode(), stop, found, seen))
        watcher.start()
        try:
            res = nsdf_root(["-vv", "pull", "--json", "--runtime", runtime, dest], pulled_cache,
                            NSDF_HPC_REGISTRY_USER=user, NSDF_HPC_REGISTRY_PASSWORD=password)
        finally:
            stop.set()
            watcher.join()
        assert res.returncode == 0, f"{runtime}: {res.stderr[-2000:]}"
        assert found == [], found
        assert password not in res.stderr + res.stdout
        native = json.loads(res.stdout)
        assert native["digest"] == pushed["digest"]
        assert not list(pulled_cache.rglob(".nsdf-login.json"))          # the auth file is gone
        ran = nsdf_root(["run", "--runtime", runtime, f"{addr}/{NAME}@{pushed['digest']}", "--",
                         "/opt/hello.sh"], pulled_cache)
        assert (ran.returncode, ran.stdout.strip()) == (0, GREETING), f"{runtime}: {ran.stderr[-2000:]}"
        if runtime == "podman":
            subprocess.run(["podman", "rmi", "--ignore", "--force", native["location"]], capture_output=True)


@pytest.mark.charliecloud
def test_a_rebuild_is_what_the_next_run_runs(recipe: Path, tmp_path: Path) -> None:
    """The second identical `run` replays a launch record; a rebuild of the tag must not let it
    run the old image (the tag's ref file is rewritten, which the record checks)."""
    cache = tmp_path / "cache"
    run = ["run", "--runtime", "charliecloud", TAG, "--", "/opt/hello.sh"]
    assert nsdf_root(["-q", "build", "--builder", "ch-image", str(recipe)], cache).returncode == 0
    for _ in range(2):
        ran = nsdf_root(run, cache, cwd=str(tmp_path))
        assert ran.stdout.strip() == GREETING, ran.stderr
    (recipe / "Dockerfile").write_text(DOCKERFILE.replace(GREETING, "rebuilt"))
    res = nsdf_root(["build", "--builder", "ch-image", str(recipe)], cache)
    assert res.returncode == 0, res.stderr
    ran = nsdf_root(run, cache, cwd=str(tmp_path))
    assert ran.stdout.strip() == "rebuilt", ran.stderr


@pytest.mark.charliecloud
@pytest.mark.podman
def test_push_a_ch_image_build_with_a_login(recipe: Path, tmp_path: Path, testbed: Dict[str, str]) -> None:
    """ch-image builds are pushed from the cache entry's unpacked image (`ch-image push
    --image DIR`), the password in ch-image's environment only; podman then pulls it back."""
    addr, user, password = _auth_registry(testbed)
    cache = tmp_path / "cache"
    assert nsdf_root(["build", "--builder", "ch-image", str(recipe)], cache).returncode == 0
    res = nsdf_root(["push", TAG, "--to", addr], cache)
    assert res.returncode == 1 and f"registry {addr} requires a login to push" in res.stderr, res.stderr
    res = nsdf_root(["push", TAG, "--to", addr], cache, NSDF_HPC_REGISTRY_USER=user,
                    NSDF_HPC_REGISTRY_PASSWORD="not-the-password")
    assert res.returncode == 1 and "refused the credentials" in res.stderr, res.stderr
    stop, found, seen = threading.Event(), [], [0]
    watcher = threading.Thread(target=_cmdlines_with, args=(password.encode(), stop, found, seen))
    watcher.start()
    try:
        res = nsdf_root(["-vv", "push", "--json", TAG, "--to", addr], cache,
                        NSDF_HPC_REGISTRY_USER=user, NSDF_HPC_REGISTRY_PASSWORD=password)
    finally:
        stop.set()
        watcher.join()
    assert res.returncode == 0, res.stderr[-2000:]
    assert found == [] and password not in res.stderr + res.stdout
    pushed = json.loads(res.stdout)
    assert pushed["runtime"] == "charliecloud" and pushed["digest"].startswith("sha256:")
    pulled = nsdf_root(["pull", "--json", "--runtime", "podman", pushed["destination"]], tmp_path / "pull",
                       NSDF_HPC_REGISTRY_USER=user, NSDF_HPC_REGISTRY_PASSWORD=password)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    native = json.loads(pulled.stdout)
    assert native["digest"] == pushed["digest"]
    ran = nsdf_root(["run", "--runtime", "podman", f"{addr}/{NAME}@{pushed['digest']}", "--",
                     "/opt/hello.sh"], tmp_path / "pull")
    subprocess.run(["podman", "rmi", "--ignore", "--force", native["location"]], capture_output=True)
    assert (ran.returncode, ran.stdout.strip()) == (0, GREETING), ran.stderr[-2000:]


@pytest.mark.unprivileged
@pytest.mark.apptainer
def test_a_definition_only_recipe_builds_with_apptainer(as_user, user_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """A recipe directory with only an Apptainer definition (here the one `recipe convert`
    makes): only Apptainer reads it, FROM still goes through the mirror."""
    from nsdf_hpc.recipe import to_apptainer_def
    recipe = _write_recipe(user_dir / "recipe")
    (recipe / "apptainer.def").write_text(to_apptainer_def(DOCKERFILE))
    (recipe / "Dockerfile").unlink()
    os.chmod(recipe / "apptainer.def", 0o644)
    no_registry = _user_no_registry(user_dir)
    cache = user_cache(as_user) / f"build-def-{uuid.uuid4().hex[:6]}"
    try:
        res = nsdf_user(as_user, ["build", "--runtime", "podman", str(recipe)], cache, cwd=str(user_dir))
        assert res.returncode == 1 and "no usable image builder for the podman runtime" in res.stderr
        res = nsdf_user(as_user, ["build", "--json", str(recipe)], cache, cwd=str(user_dir))
        assert res.returncode == 0, res.stderr[-2000:]
        built = _built(res.stdout)
        assert (built["tag"], built["builder"], built["definition"]) == (TAG, "apptainer", None)
        ran = nsdf_user(as_user, ["run", TAG, "--", "/opt/hello.sh"], cache, cwd=str(user_dir),
                        NSDF_HPC_CONFIG=no_registry)
        assert (ran.returncode, ran.stdout.strip()) == (0, GREETING), ran.stderr[-2000:]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
