"""Charliecloud: ``ch-image pull`` into a private storage, run the unpacked directory with
``ch-run`` (2 ms per start), and keep a SquashFS file (``ch-convert``) beside it."""
from __future__ import annotations

import os
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from ..environment import EnvEncoding
from ..errors import ImageError, RunError, SpecError, UnexpectedOutputError
from ..host import HostFacts
from ..models import Bind, NativeImage, RunSpec
from ..reference import ImageRef, ImageSource, Platform
from .base import Assessment, ImagePlan, Invocation, Runtime, Step, WORKDIR, effective_binds, parse_first_version

STORAGE = "storage"
ROOTFS = "rootfs"
SQUASH = "image.sqfs"
RUN_TREE = "run"     # per-uid private copies of the rootfs, beside it in the entry
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Charliecloud(Runtime):
    """Charliecloud: fully unprivileged, needs user namespaces."""

    name: ClassVar[str] = "charliecloud"
    foreign_platforms: ClassVar[bool] = True
    executables: ClassVar[Tuple[str, ...]] = ("ch-run",)
    priority: ClassVar[int] = 30
    native_kinds: ClassVar[Tuple[str, ...]] = (".sqfs", ".squashfs", ".squash", "dir")
    bind_unsafe: ClassVar[str] = ":"   # binds are SRC:DST[:opts]

    def probe_env(self, env: Mapping[str, str]) -> Dict[str, str]:
        # ch-run refuses to start without $USER ("error: $USER not set"), even for --version
        out = super().probe_env(env)
        out.setdefault("USER", env.get("LOGNAME") or self.ctx.user)
        return out

    def parse_version(self, stdout: str, stderr: str = "") -> Tuple[str, str]:
        # 0.31 prints a bare "0.31" (on stderr in some versions)
        version = parse_first_version(stdout or stderr, "ch-run --version")
        if not version[:1].isdigit():
            # e.g. "ch-run[123]: error: $USER not set (ch-run.c:122)": not a version
            raise UnexpectedOutputError("ch-run --version", stdout or stderr, expected="a bare version ('0.31')")
        return "charliecloud", version

    def assess(self, host: HostFacts, version: str, flavour: str) -> Assessment:
        caps = {"user_namespaces": host.userns, "fuse": host.fuse_access,
                "squashfs_mount": host.fuse_access, "gpu_nvidia": host.nvidia,
                "root": host.is_root}
        notes: List[str] = []
        usable = host.userns
        if not usable:
            notes.append(f"ch-run needs unprivileged user namespaces: {host.userns_reason()}")
        if not host.fuse_access:
            notes.append("/dev/fuse is not accessible: SquashFS images cannot be mounted "
                         "(directory images still work)")
        if host.nvidia:
            notes.append("GPUs need the host libraries injected once per image (ch-fromhost --nvidia)")
        return Assessment(usable, caps, tuple(notes))

    def ch_image(self) -> str:
        return self._tool("ch-image")

    def ch_convert(self) -> str:
        return self._tool("ch-convert")

    def _tool(self, name: str) -> str:
        # PATH first (a site wrapper, e.g. one pinning the Python that has lark), then the
        # directory of the ch-run that was detected
        found = self.ctx.which(name)
        if found:
            return found
        return os.path.join(os.path.dirname(self.path), name) if os.path.isabs(self.path) else name

    def _env(self) -> Dict[str, Optional[str]]:
        # The build cache is a git repository: a user without a git identity breaks the storage
        # on the first call (charliecloud 0.31), so it is disabled; ch-image needs $USER.
        return {"CH_IMAGE_CACHE": "disabled", "USER": self.ctx.user}

    def login_env(self, user: str, password: str, authfile: str) -> Dict[str, str]:
        # ch-image 0.31 pulls anonymously unless CH_IMAGE_AUTH=yes (charliecloud.py), then
        # reads CH_IMAGE_USERNAME / CH_IMAGE_PASSWORD (registry.py) instead of prompting
        return {"CH_IMAGE_AUTH": "yes", "CH_IMAGE_USERNAME": user, "CH_IMAGE_PASSWORD": password}

    def preflight(self, cache_root: str, mount_options: Sequence[str]) -> Optional[str]:
        if "noexec" in mount_options:
            return (f"the cache {cache_root} is on a noexec filesystem, where Charliecloud "
                    "directory images cannot run; set NSDF_HPC_CACHE elsewhere")
        return None

    def image_plan(self, source: ImageSource, ref: Optional[ImageRef], key: str,
                   insecure: bool = False, platform: Optional[Platform] = None) -> ImagePlan:
        env = self._env()
        steps: List[Step] = []
        if source.kind == "registry":
            assert ref is not None
            if insecure:
                # registry.py in ch-image 0.31..0.38 hard-codes "https://%s:%d/v2"
                raise ImageError(f"Charliecloud can only pull over HTTPS, and {ref.registry} is "
                                 "configured as an insecure (plain HTTP) registry; use a TLS "
                                 "mirror or an offline archive (docker-archive:/oci-archive:)")
            # another platform needs no option: the ref is pinned to that platform's manifest,
            # which ch-image 0.31 pulls as it is ("image arch: arm64 (may not match host
            # amd64)") and records in ch/metadata.json; its --arch would refuse a plain
            # manifest ("image is architecture-unaware; consider --arch=yolo")
            steps.append(Step((self.ch_image(), "-s", STORAGE, "pull", ref.by_digest(), "nsdf"),
                              f"pull {ref}", env, retry=True))
            rootfs_src = f"{STORAGE}/img/nsdf"
            pre = None
        elif source.kind == "native":
            raise SpecError(f"{source.path} is already a native image")
        else:
            # ch-image 0.31 cannot import docker-archive or OCI: nsdf_hpc unpacks the layers
            rootfs_src = ROOTFS
            pre = "rootfs"
        # ch-convert 0.31 makes its temp dir in $TMPDIR (else /var/tmp) and leaves it when it
        # fails or is killed (no trap): in the private work dir it goes with the work dir
        steps.append(Step((self.ch_convert(), "--no-clobber", "-i", "dir", "-o", "squash",
                           rootfs_src, SQUASH), "convert to SquashFS", {**env, "TMPDIR": WORKDIR}))
        return ImagePlan(tuple(steps), artifact=ROOTFS, pre_extract=pre, checksum=SQUASH,
                         location=rootfs_src if rootfs_src != ROOTFS else None)

    def listing_argv(self, native: NativeImage, paths: Sequence[str]) -> Optional[List[str]]:
        # ch-run 0.31 cannot make a mount point in a SquashFS file (read-only, no
        # --write-fake): list the bind targets (and their parents) to plan around it
        if not paths or not os.path.isfile(native.location):
            return None
        depth = max(len([p for p in t.split("/") if p]) for t in paths)
        return [self.ctx.which("unsquashfs") or "unsquashfs", "-ll", "-max-depth", str(depth),
                native.location, *paths]

    def parse_listing(self, stdout: str) -> Dict[str, str]:
        # "drwxr-xr-x root/root  26 2026-12-01 00:18 squashfs-root/var/tmp[ -> target]"
        out: Dict[str, str] = {}
        for line in stdout.splitlines():
            parts = line.split(None, 5)
            if len(parts) < 6 or not parts[5].startswith("squashfs-root"):
                continue
            path = parts[5][len("squashfs-root"):].split(" -> ", 1)[0] or "/"
            out[path] = "d" if parts[0].startswith("d") else "f"
        return out

    def run_invocation(self, spec: RunSpec, native: NativeImage, container_env: Mapping[str, str],
                       host_env: Mapping[str, str]) -> Invocation:
        binds, workdir = effective_binds(spec)
        argv: List[str] = [self.path]
        # The container environment is ch-run's own process environment (ch-run copies it in);
        # then the image's ENV (--set-env with no argument), then explicit values, so that
        # explicit --env wins over the image as on every other runtime. --env-no-expand keeps
        # "$X" literal; values wrapped in single quotes would lose them in --set-env, so those
        # come only through the process environment.
        argv += ["--env-no-expand", "--set-env"]
        for k, v in spec.env.items():
            if not (len(v) >= 2 and v[0] == v[-1] == "'"):
                argv.append(f"--set-env={k}={v}")
        if native.present is not None and os.path.isfile(native.location):
            binds = _squash_binds(spec, native, binds)
        location = native.location
        tree: Optional[Tuple[str, str]] = None
        mkdirs: List[str] = []
        mkfiles: List[str] = []
        missing = [b for b in binds if not _has_mount_point(native.location, b)] \
            if os.path.isdir(native.location) else []
        if missing and native.digest:
            # ch-run 0.31 can only bind onto a path that exists in the image and has no
            # --write-fake: run from a private hard-link copy of the cached directory, where
            # the mount points are made, so the cached image stays exactly as converted
            location = os.path.join(os.path.dirname(native.location), f"{RUN_TREE}-{self.ctx.uid}")
            tree = (native.location, location)
        for b in missing:
            # a directory image the user gave: its own directory receives the mount points
            p = os.path.join(location, b.target.lstrip("/"))
            (mkfiles if os.path.isfile(b.source) else mkdirs).append(p)
        for b in binds:
            argv.append(f"--bind={b.source}:{b.target}")
        # read-only binds: ch-run 0.31 binds are read-write (see the support table)
        if workdir:
            argv.append(f"--cd={workdir}")
        if spec.fakeroot:
            argv += ["--uid=0", "--gid=0"]
        if spec.writable_tmpfs:
            argv.append("--private-tmp")
        argv += list(spec.extra_args)
        # ch-run needs $USER; the PATH default only stops ch-run's "$PATH not set" warning and
        # serves images that set no PATH (the image's ENV, --set-env, replaces it). Container
        # values win over both (the process encoding lays them over the static part).
        static = {"USER": host_env.get("USER") or self.ctx.user, "PATH": DEFAULT_PATH}
        return Invocation(tuple(argv), (location, "--"), tuple(spec.command), static,
                          EnvEncoding("process"), dict(container_env), dict(spec.env), tuple(mkdirs),
                          tuple(mkfiles), tree)


def _squash_binds(spec: RunSpec, native: NativeImage, binds: List[Bind]) -> List[Bind]:
    """The binds for a SquashFS image file, where no mount point can be made: the automatic
    current-directory bind moves up to the deepest parent the image has (so the directory
    is still seen at its own path); any other bind onto a missing path cannot run here."""
    present = native.present or {}
    out: List[Bind] = []
    for b in binds:
        want = "f" if os.path.isfile(b.source) else "d"
        if present.get(b.target) == want:
            out.append(b)
            continue
        automatic = spec.bind_cwd and b.source == b.target == spec.cwd and b not in spec.binds
        parent = os.path.dirname(b.target.rstrip("/"))
        while automatic and parent not in ("/", "") and present.get(parent) != "d":
            parent = os.path.dirname(parent)
        if automatic and parent not in ("/", ""):
            if not any(x.target == parent for x in out):
                out.append(Bind(source=parent, target=parent))
            continue
        raise RunError(f"charliecloud: the SquashFS image {native.location} has no {b.target} to "
                       f"bind {b.source} onto, and ch-run 0.31 cannot create one in a read-only "
                       "image; bind onto a directory the image has, use --no-bind-cwd, or run "
                       "the image by reference (cached as a directory)")
    return out


def _has_mount_point(rootfs: str, bind: Bind) -> bool:
    """Whether the image has what ch-run binds onto: a directory, or a file for a file."""
    target = os.path.join(rootfs, bind.target.lstrip("/"))
    return os.path.isfile(target) if os.path.isfile(bind.source) else os.path.isdir(target)
