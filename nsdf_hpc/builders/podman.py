"""Podman and Buildah: ``build`` into containers-storage, which the podman runtime runs from;
the image id (``--iidfile``) is the digest and the location."""
from __future__ import annotations

from typing import ClassVar, List, Optional, Tuple

from ..host import HostFacts
from ..runtimes.base import Assessment, Step, parse_first_version
from .base import BuildJob, BuildPlan, Builder

IIDFILE = "image.iid"


def _assess_containers(host: HostFacts, tool: str) -> Assessment:
    caps = {"root": host.is_root, "user_namespaces": host.userns, "subuid": host.subuid and host.subgid}
    if host.is_root:
        return Assessment(True, caps)
    if not host.userns:
        return Assessment(False, caps, (f"rootless {tool} needs user namespaces: {host.userns_reason()}",))
    if not caps["subuid"]:
        return Assessment(False, caps, (f"no /etc/subuid or /etc/subgid entry for {host.user}: rootless "
                                        f"{tool} cannot build (RUN steps need more than one uid)",))
    return Assessment(True, caps)


class PodmanBuilder(Builder):
    """``podman build``, rootful or rootless."""

    name: ClassVar[str] = "podman"
    executables: ClassVar[Tuple[str, ...]] = ("podman",)
    priority: ClassVar[int] = 10
    runtime: ClassVar[str] = "podman"

    def assess(self, host: HostFacts, full_caps: Optional[bool] = None) -> Assessment:
        return _assess_containers(host, "podman")

    def build_argv(self, job: BuildJob) -> List[str]:
        # --pull=missing: FROM comes from the (mirrored) registry once, then from the store;
        # --layers: RUN steps are cached between builds, as `docker build` does
        argv = [self.path, "build", "--pull=missing", "--layers", "--iidfile", job.out(IIDFILE),
                "-t", job.tag, "-f", job.recipe]
        if job.insecure:
            argv.append("--tls-verify=false")
        return [*argv, job.context]

    def build_plan(self, job: BuildJob) -> BuildPlan:
        return BuildPlan((Step(tuple(self.build_argv(job)), f"{self.name} build {job.tag}"),),
                         iidfile=IIDFILE)

    pushes: ClassVar[bool] = True

    def push_argv(self, image: str, destination: str, *, authfile: Optional[str], insecure: bool,
                  digestfile: str) -> List[str]:
        # --authfile: a temporary file nsdf-hpc wrote (never --creds, which puts the password
        # into argv, readable by every user in /proc/PID/cmdline); without it, podman reads
        # its own auth files (REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json, then
        # ~/.docker/config.json)
        argv = [self.path, "push", "--digestfile", digestfile]
        if authfile:
            argv += ["--authfile", authfile]
        if insecure:
            argv.append("--tls-verify=false")
        return [*argv, image, f"docker://{destination}"]


class BuildahBuilder(PodmanBuilder):
    """``buildah build`` (same containers-storage as podman, so podman runs the result)."""

    name: ClassVar[str] = "buildah"
    executables: ClassVar[Tuple[str, ...]] = ("buildah",)
    priority: ClassVar[int] = 20

    def parse_version(self, stdout: str, stderr: str = "") -> str:
        # "buildah version 1.28.2 (image-spec 1.0.2-dev, runtime-spec 1.0.2-dev)"
        return parse_first_version(stdout or stderr, "buildah --version", "buildah version")

    def assess(self, host: HostFacts, full_caps: Optional[bool] = None) -> Assessment:
        return _assess_containers(host, "buildah")

    def build_argv(self, job: BuildJob) -> List[str]:
        # buildah 1.28 pulls a missing base by default (its --pull takes no value there)
        argv = [self.path, "build", "--layers", "--iidfile", job.out(IIDFILE), "-t", job.tag, "-f", job.recipe]
        if job.insecure:
            argv.append("--tls-verify=false")
        return [*argv, job.context]

    def build_plan(self, job: BuildJob) -> BuildPlan:
        return BuildPlan((Step(tuple(self.build_argv(job)), f"buildah build {job.tag}"),),
                         iidfile=IIDFILE)


__all__ = ["PodmanBuilder", "BuildahBuilder"]
