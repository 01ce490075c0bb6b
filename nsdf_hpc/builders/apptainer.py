"""Apptainer's ``apptainer build`` from a definition file: the SIF is the cache entry itself."""
from __future__ import annotations

from typing import ClassVar, List, Optional, Tuple

from ..host import HostFacts
from ..runtimes.base import WORKDIR, Assessment, Step, parse_first_version
from .base import DEFINITION, DOCKERFILE, BuildJob, BuildPlan, Builder, RecipeKind

SIF = "image.sif"


class ApptainerBuilder(Builder):
    """``apptainer build image.sif recipe.def``; a Dockerfile is converted first (spython)."""

    name: ClassVar[str] = "apptainer"
    executables: ClassVar[Tuple[str, ...]] = ("apptainer",)
    priority: ClassVar[int] = 40
    runtime: ClassVar[str] = "apptainer"
    #: a Dockerfile is read through its conversion to a definition (nsdf_hpc.recipe, spython)
    reads: ClassVar[Tuple[RecipeKind, ...]] = (DEFINITION, DOCKERFILE)

    def parse_version(self, stdout: str, stderr: str = "") -> str:
        return parse_first_version(stdout or stderr, "apptainer --version", "apptainer version")

    def assess(self, host: HostFacts, full_caps: Optional[bool] = None) -> Assessment:
        fakeroot = host.userns and host.subuid and host.subgid
        # as root, %post runs with the full capability set (apptainer 1.4 requests every
        # capability and fails "Requesting capability set ... while permitted capability set
        # is ..." where the bounding set lacks one, e.g. CAP_SYS_RESOURCE in a container)
        as_root = host.is_root and full_caps is not False
        caps = {"root": host.is_root, "full_caps": as_root, "fakeroot": bool(fakeroot)}
        if as_root or fakeroot:
            return Assessment(True, caps)
        if host.is_root:
            return Assessment(False, caps, (
                "apptainer build as root needs every capability, and this process's bounding "
                "set lacks some (in a container?); --fakeroot needs an /etc/subuid entry for root",))
        why = host.userns_reason() if not host.userns else f"no /etc/subuid entry for {host.user}"
        return Assessment(False, caps, (f"apptainer build without root needs --fakeroot: {why}",))

    def build_argv(self, job: BuildJob) -> List[str]:
        argv = [self.path, "-s", "build", "--force"]
        if not (self.ctx.is_root and self.capabilities.get("full_caps", True)):
            argv.append("--fakeroot")
        if job.insecure:
            argv.append("--nohttps")
        return [*argv, job.out(SIF), job.recipe]

    def build_plan(self, job: BuildJob) -> BuildPlan:
        # the build's temp files go to the private work dir on the cache filesystem
        env = {"APPTAINER_TMPDIR": WORKDIR}
        return BuildPlan((Step(tuple(self.build_argv(job)), f"apptainer build {job.tag}", env),),
                         artifact=SIF)
