"""Shifter (NERSC): images are pulled by the site's image gateway (``shifterimg pull``) and
run by a setuid helper (``shifter --image=docker:REPO:TAG``).

Shifter cannot be installed on our testbed (it needs its gateway, MongoDB and munge), so this
module is checked against recorded command contracts taken from Shifter's documentation and
NERSC's user guide (tests/contracts/), not against a running Shifter.
"""
from __future__ import annotations

import os
import re
from typing import ClassVar, List, Mapping, Optional, Sequence, Tuple

from ..environment import EnvEncoding
from ..errors import ImageError, SpecError, UnexpectedOutputError
from ..host import HostFacts
from ..models import NativeImage, RunSpec
from ..reference import DOCKER_HUB, ImageRef, ImageSource, Platform
from .base import Assessment, ImagePlan, Invocation, Runtime, Step, effective_binds, require_paths

#: Shifter refuses binds onto these (udiRoot.conf siteFs/volume rules)
FORBIDDEN_TARGETS = ("/dev", "/etc", "/opt/udiImage", "/proc", "/var")
#: ... and onto exactly these (NERSC/shifter src/VolumeMap.c, validateVolumeMap_userRequest)
FORBIDDEN_EXACT_TARGETS = ("/opt",)
#: Shifter's userInputPathFilter (src/utility.c) silently DROPS every other character from a
#: --volume path, so "/data/my dir" would become "/data/mydir": refuse such paths instead
_VOLUME_PATH_RE = re.compile(r"[A-Za-z0-9_.+/-]+")


def shifter_image_name(ref: ImageRef) -> str:
    """``docker:REPO:TAG`` as shifterimg names it (Docker Hub's ``library/`` dropped)."""
    repo = ref.repository
    if ref.registry == DOCKER_HUB:
        if repo.startswith("library/"):
            repo = repo[len("library/"):]
    else:
        repo = f"{ref.registry}/{repo}"
    return f"docker:{repo}:{ref.tag or 'latest'}"


class Shifter(Runtime):
    """Shifter: setuid, images converted by the site's gateway."""

    name: ClassVar[str] = "shifter"
    executables: ClassVar[Tuple[str, ...]] = ("shifter",)
    priority: ClassVar[int] = 40
    bind_unsafe: ClassVar[str] = ":;"   # binds are SRC:DST[:opts]
    storage: ClassVar[str] = "store"

    def version_argv(self, path: str) -> List[str]:
        return [path, "--version"]

    def parse_version(self, stdout: str, stderr: str = "") -> Tuple[str, str]:
        text = (stdout or stderr).strip()
        if _is_shifter_usage(stdout + "\n" + stderr):
            # upstream shifter has no --version option (NERSC/shifter src/shifter.c: getopt_long
            # knows help/volume/verbose/image/entrypoint/workdir/module/env): it prints its usage
            # and exits 1. That still proves a working shifter; the version is unknown.
            return "shifter", "unknown"
        for line in text.splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0].lower() == "shifter" and words[-1][:1].isdigit():
                return "shifter", words[-1]
            if words and words[0][:1].isdigit():
                return "shifter", words[0]
        raise UnexpectedOutputError("shifter --version", text, expected="'shifter version X'")

    def assess(self, host: HostFacts, version: str, flavour: str) -> Assessment:
        gw = bool(self._shifterimg())
        notes = () if gw else ("shifterimg not found: images cannot be pulled here",)
        return Assessment(True, {"setuid": True, "gateway": gw, "gpu_nvidia": host.nvidia}, notes)

    def assessment_inputs(self) -> Optional[Tuple[Sequence[str], Sequence[str]]]:
        return None     # shifterimg beside it or anywhere on PATH: not kept

    def _shifterimg(self) -> Optional[str]:
        if os.path.isabs(self.path):
            cand = os.path.join(os.path.dirname(self.path), "shifterimg")
            if os.access(cand, os.X_OK):
                return cand
        return self.ctx.which("shifterimg")

    def image_plan(self, source: ImageSource, ref: Optional[ImageRef], key: str,
                   insecure: bool = False, platform: Optional[Platform] = None) -> ImagePlan:
        if source.kind != "registry":
            raise ImageError(f"Shifter imports images only through its gateway from a registry; "
                             f"{source.text} must be pushed to a registry first")
        assert ref is not None
        name = shifter_image_name(ref)
        tool = self._shifterimg() or "shifterimg"
        # `shifterimg pull` blocks until the gateway reports READY (or FAILURE)
        return ImagePlan((Step((tool, "pull", name), f"gateway pull {name}"),), location=name)

    def run_invocation(self, spec: RunSpec, native: NativeImage, container_env: Mapping[str, str],
                       host_env: Mapping[str, str]) -> Invocation:
        binds, workdir = effective_binds(spec)
        require_paths(binds, self.name, ":;")
        for b in binds:
            if any(b.target == t or b.target.startswith(t + "/") for t in FORBIDDEN_TARGETS) \
                    or b.target in FORBIDDEN_EXACT_TARGETS:
                raise SpecError(f"Shifter refuses bind targets under {', '.join(FORBIDDEN_TARGETS)} "
                                f"and onto {', '.join(FORBIDDEN_EXACT_TARGETS)}: {b.target}")
            for p in (b.source, b.target):
                if not _VOLUME_PATH_RE.fullmatch(p):
                    raise SpecError(f"Shifter cannot bind {p!r}: its --volume accepts only letters, "
                                    "digits and '_.+-/' (other characters are silently dropped)")
        argv: List[str] = [self.path, f"--image={native.location}"]
        for b in binds:
            argv.append(f"--volume={b.source}:{b.target}" + (":ro" if b.read_only else ""))
        if workdir:
            argv.append(f"--workdir={workdir}")
        # Shifter copies its own environment into the container and then applies the image's
        # ENV; explicit values go on the command line so that they win over the image
        for k, v in spec.env.items():
            argv.append(f"--env={k}={v}")
        if spec.gpu:
            argv.append("--module=gpu")
        argv += list(spec.extra_args)
        static = {"PATH": "/usr/local/bin:/usr/bin:/bin"}   # container values win over it
        return Invocation(tuple(argv), ("--",), tuple(spec.command), static, EnvEncoding("process"),
                          dict(container_env), dict(spec.env))


def _is_shifter_usage(text: str) -> bool:
    """``shifter --version`` on upstream Shifter: the usage text of src/shifter.c."""
    return "Usage:" in text and "shifter [-h|--help]" in text
