"""Apptainer, SingularityCE and legacy Singularity: one CLI, three flavours.

Flavour comes from the tool's own output, never from the binary's name: a ``singularity``
that prints ``apptainer version 1.4.5`` is Apptainer (the compat symlink), so it is
reported under ``apptainer`` and the ``singularity`` entry stays for SingularityCE
(``singularity-ce version 4.1.0``) and legacy Singularity (``singularity version 3.7.1``,
``2.6.1-dist``).
"""
from __future__ import annotations

import os
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from ..environment import EnvEncoding
from ..errors import SpecError, UnexpectedOutputError
from ..host import HostFacts
from ..models import NativeImage, RunSpec
from ..reference import ImageRef, ImageSource, Platform
from .base import (WORKDIR, Assessment, ImagePlan, Invocation, Runtime, Step, csv_field, effective_binds,
                   process_env, version_tuple)


def classify_singularity_output(text: str) -> Tuple[str, str]:
    """``(flavour, version)`` for the apptainer/singularity family (pure)."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    low = line.lower()
    for prefix, flavour in (("apptainer version", "apptainer"),
                            ("singularity-ce version", "singularityce"),
                            ("singularityce version", "singularityce"),
                            ("singularity version", "singularity")):
        if low.startswith(prefix):
            rest = line[len(prefix):].split()
            if rest:
                return flavour, rest[0]
    # Singularity 2.x and early 3.x print a bare version ("2.6.1-dist", "3.5.3")
    first = line.split()[0] if line else ""
    if first[:1].isdigit():
        return "singularity", first
    raise UnexpectedOutputError("singularity/apptainer --version", text,
                                expected="'apptainer version X' or 'singularity-ce version X'")


def _listdir(d: str) -> List[str]:
    try:
        return os.listdir(d)
    except OSError:
        return []


class Apptainer(Runtime):
    """Apptainer (formerly Singularity); NSDF's preferred runtime."""

    name: ClassVar[str] = "apptainer"
    foreign_platforms: ClassVar[bool] = True
    executables: ClassVar[Tuple[str, ...]] = ("apptainer", "singularity")
    priority: ClassVar[int] = 10
    native_kinds: ClassVar[Tuple[str, ...]] = (".sif", ".simg", ".sqfs", ".squashfs", "dir")
    env_prefix: ClassVar[str] = "APPTAINER"
    accepts: ClassVar[Tuple[str, ...]] = ("apptainer",)
    #: the CLI, then the starter it becomes (and its child before the command's exec): a
    #: SIGINT sent there was lost 6 times in 60 within the first 0.12 s (Apptainer 1.4.5).
    #: Unprivileged, the starter also runs the FUSE helpers that mount the image (squashfuse_ll,
    #: from before the command's exec to the end): they are not the command, and a signal
    #: passed on when they appeared was lost in 2 of 40 trials (hpcuser, 2026-12-02)
    startup_names: ClassVar[Tuple[str, ...]] = ("apptainer", "singularity", "starter", "starter-suid",
                                                "squashfuse_ll", "squashfuse", "fuse-overlayfs", "fuse2fs",
                                                "gocryptfs")

    def parse_version(self, stdout: str, stderr: str = "") -> Tuple[str, str]:
        flavour, version = classify_singularity_output(stdout or stderr)
        if flavour not in self.accepts:
            label = {"apptainer": "Apptainer", "singularityce": "SingularityCE",
                     "singularity": "legacy Singularity"}[flavour]
            raise UnexpectedOutputError(self.path, stdout or stderr,
                                        note=f"this binary is {label} {version}, not {self.name}")
        return flavour, version

    def assess(self, host: HostFacts, version: str, flavour: str) -> Assessment:
        caps = {
            "root": host.is_root,
            "setuid": self._setuid_starter(),
            "user_namespaces": host.userns,
            "fakeroot": host.is_root or (host.userns and host.subuid and host.subgid),
            "fuse": host.fuse_access,
            "squashfuse": host.squashfuse,
            "gpu_nvidia": host.nvidia,
            "gpu_amd": host.amd_gpu,
            "no_eval": self._has_no_eval(flavour, version),
        }
        notes: List[str] = []
        usable = host.is_root or caps["setuid"] or host.userns
        if not usable:
            notes.append(f"cannot start containers: no setuid starter and {host.userns_reason()}")
        elif not host.is_root and not caps["setuid"] and not (host.fuse_access and host.squashfuse):
            notes.append("SIF images are extracted to a temporary sandbox on every run "
                         "(no access to /dev/fuse or no squashfuse): slower start")
        if not caps["no_eval"]:
            notes.append("this version has no --no-eval: environment values are shell-escaped")
        return Assessment(usable, caps, tuple(notes))

    def assessment_inputs(self) -> Optional[Tuple[Sequence[str], Sequence[str]]]:
        return self._starters(), ()

    def _starters(self) -> List[str]:
        """Where a setuid starter of this installation would be."""
        prefix = os.path.dirname(os.path.dirname(os.path.realpath(self.path)))
        return [os.path.join(prefix, sub) for sub in (
            "libexec/apptainer/bin/starter-suid", "libexec/singularity/bin/starter-suid",
            "lib/x86_64-linux-gnu/apptainer/bin/starter-suid")]

    def _setuid_starter(self) -> bool:
        for p in self._starters():
            try:
                st = os.stat(p)
            except OSError:
                continue
            if st.st_mode & 0o4000 and st.st_uid == 0:
                return True
        return False

    @staticmethod
    def _has_no_eval(flavour: str, version: str) -> bool:
        v = version_tuple(version)
        if flavour == "apptainer":
            return v >= (1, 1)
        if flavour == "singularityce":
            return v >= (3, 10)
        return False

    @staticmethod
    def _has_no_mount(flavour: str, version: str) -> bool:
        # --no-mount was added in Singularity 3.7 (sylabs userdocs, bind_paths_and_mounts);
        # an older legacy binary would refuse the whole command line ("unknown flag")
        if flavour == "singularity":
            return version_tuple(version) >= (3, 7)
        return True

    # ---------------------------------------------------------------- images
    def runtime_env(self, env: Mapping[str, str], cache_root: str) -> Dict[str, str]:
        var = f"{self.env_prefix}_CACHEDIR"
        return {var: env.get(var) or f"{cache_root}/{self.name}/cache"}

    def partial_downloads(self, runtime_env: Mapping[str, str]) -> List[str]:
        # containers/image writes a blob as "<sha256 hex><random digits>" beside the finished
        # ones and renames it when complete; SIGKILL leaves it (Apptainer 1.4.5, seen in
        # tests/integration/test_faults.py)
        cache = runtime_env.get(f"{self.env_prefix}_CACHEDIR")
        if not cache:
            return []
        found: List[str] = []
        d = os.path.join(cache, "cache", "blob", "blobs", "sha256")
        found += [os.path.join(d, n) for n in _listdir(d)
                  if len(n) > 64 and all(c in "0123456789abcdef" for c in n[:64]) and n[64:].isdigit()]
        # ... and its temporary "oci-tmp/tmp_<digits>" files
        d = os.path.join(cache, "cache", "oci-tmp")
        found += [os.path.join(d, n) for n in _listdir(d) if n.startswith("tmp_") and n[4:].isdigit()]
        return found

    def image_plan(self, source: ImageSource, ref: Optional[ImageRef], key: str,
                   insecure: bool = False, platform: Optional[Platform] = None) -> ImagePlan:
        out = "image.sif"
        # conversions need room: the temp dir is the entry's private work dir in the cache
        tmp_env = {f"{self.env_prefix}_TMPDIR": WORKDIR}
        if source.kind == "registry":
            assert ref is not None
            argv = [self.path, "-s", "pull"]
            if insecure:
                argv.append("--no-https")
            if platform is not None:
                # the ref is pinned to that platform's manifest already; --arch also makes
                # Apptainer 1.4 pick it from an index, and it records the SIF's architecture
                # from the image config (`apptainer exec` of it on another host then fails
                # with "the image's architecture (arm64) could not run on the host's (amd64)")
                argv += ["--arch", platform.architecture]
                if platform.variant:
                    argv += ["--arch-variant", platform.variant]
            argv += [out, f"docker://{ref.by_digest()}"]
            return ImagePlan((Step(tuple(argv), f"pull {ref} to SIF", tmp_env, retry=True),), artifact=out)
        if source.kind == "native":
            raise SpecError(f"{source.path} is already a native image")
        prefix = source.transport
        # Apptainer 1.4 takes an OCI layout *path* only: "oci:DIR:tag" fails with "stat DIR:tag"
        build = (self.path, "-s", "build", out, f"{prefix}:{source.path}")
        return ImagePlan((Step(build, f"build SIF from {source.text}", tmp_env),), artifact=out)

    def login_env(self, user: str, password: str, authfile: str) -> Dict[str, str]:
        # read by `apptainer pull docker://` (and SingularityCE's SINGULARITY_ prefix)
        return {f"{self.env_prefix}_DOCKER_USERNAME": user, f"{self.env_prefix}_DOCKER_PASSWORD": password}

    # ---------------------------------------------------------------- run
    def run_invocation(self, spec: RunSpec, native: NativeImage, container_env: Mapping[str, str],
                       host_env: Mapping[str, str]) -> Invocation:
        binds, workdir = effective_binds(spec)
        argv: List[str] = [self.path, "-s", "exec", "--cleanenv"]
        no_eval = self._has_no_eval(self.flavour, self.version or "")
        if no_eval:
            # without --no-eval, APPTAINERENV_ values are evaluated by a shell in the
            # container: "$(cmd)" would run (Apptainer 1.4.5, checked by the hostile-env test)
            argv.append("--no-eval")
        for b in binds:
            if any(c in b.source + b.target for c in ":,\n"):
                fields = ["type=bind", csv_field(f"src={b.source}"), csv_field(f"dst={b.target}")]
                if b.read_only:
                    fields.append("ro")
                argv += ["--mount", ",".join(fields)]
            else:
                argv += ["--bind", f"{b.source}:{b.target}" + (":ro" if b.read_only else "")]
        if not spec.bind_cwd:
            # the same meaning as on the other runtimes: no host directory but the binds
            # (Apptainer otherwise mounts $PWD, $HOME, /tmp and /var/tmp by itself, and starts
            # in $HOME), a private writable /tmp, and the image's root as the start directory
            argv.append("--contain")
            if self._has_no_mount(self.flavour, self.version or ""):
                argv += ["--no-mount", "cwd"]
            workdir = workdir or "/"
        if workdir:
            argv += ["--pwd", workdir]
        if "HOME" in spec.env:
            # Apptainer ignores APPTAINERENV_HOME and sets HOME to the home it mounts: an
            # explicit HOME is set with --home, without mounting a host directory there
            argv += ["--no-home", "--home", spec.env["HOME"]]
        if spec.gpu:
            argv.append("--nv")
        if not spec.network:
            argv += ["--net", "--network", "none"]
        if spec.writable_tmpfs:
            argv.append("--writable-tmpfs")
        if spec.fakeroot:
            argv.append("--fakeroot")
        argv += list(spec.extra_args)
        # APPTAINERENV_K carries each variable; without --no-eval the values are evaluated by
        # a shell in the container, so they are escaped for its double quotes instead
        encoding = EnvEncoding("prefix", prefix=f"{self.env_prefix}ENV_", escape=not no_eval)
        return Invocation(tuple(argv), (native.location,), tuple(spec.command), process_env(host_env),
                          encoding, dict(container_env), dict(spec.env))


class Singularity(Apptainer):
    """SingularityCE (Sylabs) and legacy Singularity: same verbs, ``SINGULARITY*`` variables."""

    name: ClassVar[str] = "singularity"
    executables: ClassVar[Tuple[str, ...]] = ("singularity",)
    priority: ClassVar[int] = 20
    env_prefix: ClassVar[str] = "SINGULARITY"
    accepts: ClassVar[Tuple[str, ...]] = ("singularityce", "singularity")
