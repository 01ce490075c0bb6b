"""Builders (pure): argv builders, detection through the fake runner, and the choice with its
reasons (found / chosen / why not the others)."""
from __future__ import annotations

from typing import Dict, Sequence

import pytest

from nsdf_hpc.builders import (builder_class, builder_names, choose_builder, detect_builders,
                               full_capabilities)
from nsdf_hpc.builders.base import BuildJob
from nsdf_hpc.errors import BuilderNotFoundError, ConfigError
from nsdf_hpc.models import BuilderInfo
from nsdf_hpc.runtimes.base import RuntimeContext

from _fakes import FakeRunner, make_host

JOB = BuildJob(recipe="/w/Dockerfile", context="/r/hello", tag="nsdf/hello:v0.1.0", workdir="/w")
USER = RuntimeContext(1000, 1000, "alice", which=lambda name: f"/usr/bin/{name}")
ROOT = RuntimeContext(0, 0, "root", which=lambda name: f"/usr/bin/{name}")


def test_registry_order() -> None:
    assert builder_names() == ["podman", "buildah", "ch-image", "apptainer"]
    with pytest.raises(ConfigError, match="unknown builder 'docker'; known: podman"):
        builder_class("docker")


def test_podman_argv() -> None:
    b = builder_class("podman")("/usr/bin/podman", "4.3.1", USER)
    plan = b.build_plan(JOB)
    assert plan.steps[0].argv == (
        "/usr/bin/podman", "build", "--pull=missing", "--layers", "--iidfile", "/w/image.iid",
        "-t", "nsdf/hello:v0.1.0", "-f", "/w/Dockerfile", "/r/hello")
    assert plan.iidfile == "image.iid" and plan.artifact is None
    insecure = b.build_plan(BuildJob(**{**JOB.__dict__, "insecure": True}))
    assert insecure.steps[0].argv[-2:] == ("--tls-verify=false", "/r/hello")


def test_buildah_argv() -> None:
    b = builder_class("buildah")("/usr/bin/buildah", "1.28.2", USER)
    assert b.build_plan(JOB).steps[0].argv == (
        "/usr/bin/buildah", "build", "--layers", "--iidfile", "/w/image.iid", "-t",
        "nsdf/hello:v0.1.0", "-f", "/w/Dockerfile", "/r/hello")
    assert b.runtime == "podman"


def test_ch_image_argv() -> None:
    b = builder_class("ch-image")("/usr/local/bin/ch-image", "0.31", USER)
    plan = b.build_plan(JOB)
    assert [s.argv for s in plan.steps] == [
        ("/usr/local/bin/ch-image", "-s", "/w/storage", "build", "--force", "-t", "nsdf",
         "-f", "/w/Dockerfile", "/r/hello"),
        ("/usr/bin/ch-convert", "--no-clobber", "-i", "dir", "-o", "squash", "/w/storage/img/nsdf",
         "/w/image.sqfs")]
    assert plan.steps[0].env == {"CH_IMAGE_CACHE": "disabled", "USER": "alice"}
    assert (plan.artifact, plan.move, plan.checksum, plan.cleanup) == (
        "rootfs", ("storage/img/nsdf", "rootfs"), "image.sqfs", ("storage",))


@pytest.mark.parametrize("ctx,caps,fakeroot", [
    (USER, {}, True), (ROOT, {"full_caps": True}, False), (ROOT, {"full_caps": False}, True)])
def test_apptainer_argv(ctx: RuntimeContext, caps: Dict[str, bool], fakeroot: bool) -> None:
    b = builder_class("apptainer")("/usr/local/bin/apptainer", "1.4.5", ctx, caps)
    job = BuildJob(recipe="/w/recipe.def", context="/r/hello", tag="nsdf/hello:v0.1.0", workdir="/w")
    plan = b.build_plan(job)
    expected = ["/usr/local/bin/apptainer", "-s", "build", "--force",
                *(["--fakeroot"] if fakeroot else []), "/w/image.sif", "/w/recipe.def"]
    assert list(plan.steps[0].argv) == expected
    assert plan.artifact == "image.sif" and plan.steps[0].env == {"APPTAINER_TMPDIR": "{workdir}"}


def test_full_capabilities() -> None:
    status = "Name:\tx\nCapBnd:\t000001fffeffffff\n"
    assert full_capabilities(status, "40\n") is False            # CAP_SYS_RESOURCE missing
    assert full_capabilities("CapBnd:\t000001ffffffffff\n", "40") is True
    assert full_capabilities("CapBnd:\t000001ffffffffff\n", "") is None
    assert full_capabilities("", "40") is None


def test_assessments() -> None:
    podman = builder_class("podman")()
    assert podman.assess(make_host()).usable
    no_sub = podman.assess(make_host(subuid=False))
    assert not no_sub.usable and "subuid" in no_sub.notes[0]
    assert podman.assess(make_host(uid=0, user="root", max_user_namespaces=0)).usable
    app = builder_class("apptainer")()
    root_in_container = app.assess(make_host(uid=0, user="root", subuid=False), full_caps=False)
    assert not root_in_container.usable and "capability" in root_in_container.notes[0]
    assert app.assess(make_host(uid=0, user="root", subuid=False), full_caps=True).usable
    assert app.assess(make_host()).capabilities["fakeroot"]
    ch = builder_class("ch-image")()
    assert not ch.assess(make_host(max_user_namespaces=0)).usable


def test_detect_probes_every_builder_at_once(fakebin) -> None:  # type: ignore[no-untyped-def]
    bindir = fakebin("podman", "ch-image", "apptainer")
    runner = FakeRunner({"podman": (0, "podman version 4.3.1\n", ""), "ch-image": (0, "0.31\n", ""),
                         "apptainer": (1, "", "boom\n")})
    infos = detect_builders(runner, make_host(), env={"PATH": str(bindir), "USER": "alice"})
    assert len(runner.batches) == 1 and sorted(runner.probed) == ["apptainer", "ch-image", "podman"]
    by = {i.name: i for i in infos}
    assert by["podman"].usable and by["podman"].version == "4.3.1"
    assert by["ch-image"].usable and by["ch-image"].runtime == "charliecloud"
    assert not by["buildah"].found and "not found on PATH" in by["buildah"].notes[0]
    assert not by["apptainer"].found and by["apptainer"].notes


def _info(name: str, runtime: str, usable: bool = True, reads: Sequence[str] = ("dockerfile",),
          priority: int = 10) -> BuilderInfo:
    return BuilderInfo(name=name, runtime=runtime, reads=tuple(reads), found=True, usable=usable,
                       version="1", path=f"/usr/bin/{name}", priority=priority,
                       notes=() if usable else ("broken here",))


INFOS = [_info("podman", "podman", priority=10), _info("buildah", "podman", priority=20),
         _info("ch-image", "charliecloud", priority=30),
         _info("apptainer", "apptainer", reads=("def", "dockerfile"), priority=40)]


def test_auto_choice_follows_the_runtime_order() -> None:
    c = choose_builder(INFOS, runtime_order=["apptainer", "charliecloud", "podman"])
    assert (c.name, c.source) == ("apptainer", "auto")
    assert c.rejected["ch-image"].startswith("usable, but apptainer builds for apptainer")
    c = choose_builder([*INFOS[:3], _info("apptainer", "apptainer", usable=False, reads=("def",))],
                       runtime_order=["apptainer", "charliecloud", "podman"])
    assert c.name == "ch-image" and c.rejected["apptainer"] == "unusable: broken here"


def test_a_runtime_asked_for_picks_its_builders() -> None:
    c = choose_builder(INFOS, runtime="podman", runtime_source="argument")
    assert c.name == "podman"
    assert c.rejected["buildah"] == "usable, but podman comes first"
    assert c.rejected["apptainer"].startswith("usable, but builds for apptainer, and the runtime is podman")


def test_a_definition_only_recipe_needs_apptainer() -> None:
    c = choose_builder(INFOS, has_dockerfile=False, has_definition=True,
                       runtime_order=["charliecloud", "podman", "apptainer"])
    assert c.name == "apptainer" and c.rejected["podman"] == "usable, but cannot read this recipe"


def test_forced_builder() -> None:
    c = choose_builder(INFOS, explicit="buildah")
    assert (c.name, c.source) == ("buildah", "argument")
    assert c.explain() == "buildah (asked for with --builder)"
    broken = [*INFOS[:3], _info("apptainer", "apptainer", usable=False)]
    with pytest.raises(BuilderNotFoundError) as err:
        choose_builder(broken, explicit="apptainer")
    assert "broken here" in str(err.value)
    assert "builders found here: podman 1, buildah 1, ch-image 1, apptainer 1 (unusable)" in str(err.value)
    with pytest.raises(ConfigError, match="builds for the podman runtime, not charliecloud"):
        choose_builder(INFOS, explicit="podman", runtime="charliecloud")


def test_nothing_usable_lists_what_was_found() -> None:
    with pytest.raises(BuilderNotFoundError, match="no usable image builder for the udocker runtime"):
        choose_builder(INFOS, runtime="udocker", runtime_source="argument")



def test_podman_push_argv_carries_no_secret() -> None:
    b = builder_class("podman")("/usr/bin/podman", "4.3.1", USER)
    assert b.pushes and builder_class("ch-image").pushes and not builder_class("apptainer").pushes
    assert b.push_env("me", "pw") == {}
    assert b.push_argv("abc123", "ghcr.io/nsdf/hello:v0.1.0", authfile="/c/tmp/push-x/auth.json",
                       insecure=False, digestfile="/c/tmp/push-x/digest") == [
        "/usr/bin/podman", "push", "--digestfile", "/c/tmp/push-x/digest", "--authfile",
        "/c/tmp/push-x/auth.json", "abc123", "docker://ghcr.io/nsdf/hello:v0.1.0"]
    assert b.push_argv("abc123", "r:5000/a:v1.0.0", authfile=None, insecure=True, digestfile="/d")[-3:] == [
        "--tls-verify=false", "abc123", "docker://r:5000/a:v1.0.0"]


def test_ch_image_push_argv_and_env() -> None:
    b = builder_class("ch-image")("/usr/local/bin/ch-image", "0.31", USER)
    assert b.push_argv("/c/entries/charliecloud/sha256-x/rootfs", "r:5444/nsdf/hello:v0.1.0",
                       authfile=None, insecure=False, digestfile="/c/tmp/push-x/digest") == [
        "/usr/local/bin/ch-image", "-s", "/c/tmp/push-x/storage", "push", "--image",
        "/c/entries/charliecloud/sha256-x/rootfs", "r:5444/nsdf/hello:v0.1.0"]
    assert b.push_env("me", "pw") == {"CH_IMAGE_CACHE": "disabled", "USER": "alice",
                                      "CH_IMAGE_USERNAME": "me", "CH_IMAGE_PASSWORD": "pw"}
    assert "CH_IMAGE_PASSWORD" not in b.push_env(None, None)
