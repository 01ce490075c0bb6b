"""Charliecloud's ``ch-image build``: fully unprivileged; the built image is unpacked into the
cache entry and packed into SquashFS beside it, as a ``pull`` for the charliecloud runtime is."""
from __future__ import annotations

import os
from typing import ClassVar, Dict, List, Optional, Tuple

from ..host import HostFacts
from ..runtimes.base import Assessment, Step, parse_first_version
from ..runtimes.charliecloud import ROOTFS, SQUASH, STORAGE
from .base import BuildJob, BuildPlan, Builder

#: the name of the image in the private build storage (one build per storage)
TAG = "nsdf"


class ChImageBuilder(Builder):
    """``ch-image build`` into a private storage in the work directory."""

    name: ClassVar[str] = "ch-image"
    executables: ClassVar[Tuple[str, ...]] = ("ch-image",)
    priority: ClassVar[int] = 30
    runtime: ClassVar[str] = "charliecloud"

    def parse_version(self, stdout: str, stderr: str = "") -> str:
        # ch-image 0.31 prints a bare "0.31"
        return parse_first_version(stdout or stderr, "ch-image --version")

    def assess(self, host: HostFacts, full_caps: Optional[bool] = None) -> Assessment:
        caps = {"user_namespaces": host.userns, "root": host.is_root}
        if not host.userns:
            return Assessment(False, caps, (f"ch-image needs unprivileged user namespaces: "
                                            f"{host.userns_reason()}",))
        return Assessment(True, caps)

    def env(self) -> Dict[str, Optional[str]]:
        # the build cache is a git repository that breaks without a git identity (0.31), and
        # ch-image refuses to start without $USER
        return {"CH_IMAGE_CACHE": "disabled", "USER": self.ctx.user}

    def build_plan(self, job: BuildJob) -> BuildPlan:
        # PATH first: ch-image may be a site wrapper (/usr/local/bin) apart from ch-convert
        ch_convert = self.ctx.which("ch-convert") or (
            os.path.join(os.path.dirname(self.path), "ch-convert") if os.path.isabs(self.path)
            else "ch-convert")
        # --force: ch-image's own workarounds for package managers that want root (apt, dnf)
        build = [self.path, "-s", job.out(STORAGE), "build", "--force", "-t", TAG, "-f", job.recipe]
        if job.insecure:
            build.insert(3, "--tls-no-verify")
        build.append(job.context)
        built = f"{STORAGE}/img/{TAG}"
        return BuildPlan(
            (Step(tuple(build), f"ch-image build {job.tag}", self.env()),
             Step((ch_convert, "--no-clobber", "-i", "dir", "-o", "squash", job.out(built),
                   job.out(SQUASH)),
                  "convert to SquashFS", self.env())),
            artifact=ROOTFS, move=(built, ROOTFS), checksum=SQUASH, cleanup=(STORAGE,))

    pushes: ClassVar[bool] = True

    def push_argv(self, image: str, destination: str, *, authfile: Optional[str], insecure: bool,
                  digestfile: str) -> List[str]:
        # pushes the unpacked image of the cache entry (--image DIR); the storage directory is
        # a private scratch one beside the digest file (ch-image writes its upload files there)
        argv = [self.path, "-s", os.path.join(os.path.dirname(digestfile), STORAGE), "push"]
        if insecure:
            argv.append("--tls-no-verify")
        return [*argv, "--image", image, destination]

    def push_env(self, user: Optional[str], password: Optional[str]) -> Dict[str, str]:
        # ch-image 0.31 reads CH_IMAGE_USERNAME/CH_IMAGE_PASSWORD (registry.py); without them
        # it would prompt, and stdin is /dev/null: it fails instead of hanging
        env = {"CH_IMAGE_CACHE": "disabled", "USER": self.ctx.user}
        if user is not None and password is not None:
            env.update({"CH_IMAGE_USERNAME": user, "CH_IMAGE_PASSWORD": password})
        return env
