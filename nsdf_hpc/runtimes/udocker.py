"""UDocker: the fallback that always works without privileges (proot, P1 mode).

udocker comes with nsdf-hpc from PyPI. Its engine (proot, patchelf, runc) is downloaded on
first use unless the site configures a local tarball (``/etc/udocker.conf``: ``tarball =``),
as air-gapped sites must; ``nsdf-run doctor`` says which applies.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from typing import ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

from .._fsutil import resolve_in_root
from ..environment import EnvEncoding
from ..errors import SpecError, UnexpectedOutputError
from ..host import HostFacts
from ..models import NativeImage, RunSpec
from ..reference import ImageRef, ImageSource, Platform
from .base import Assessment, ImagePlan, Invocation, Runtime, Step, effective_binds, process_env


#: the signal relay that runs in front of ``udocker run`` (a script, standard library only)
RELAY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_udocker_relay.py")
#: the signals the relay passes on (its RELAYED): it starts with them blocked and waits for
#: them itself, so one that comes while its interpreter starts is not lost
RELAY_SIGNALS = ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2")


class UDocker(Runtime):
    """UDocker: user-space containers with proot; no namespaces, no setuid, no daemon."""

    name: ClassVar[str] = "udocker"
    foreign_platforms: ClassVar[bool] = True
    executables: ClassVar[Tuple[str, ...]] = ("udocker",)
    priority: ClassVar[int] = 90
    storage: ClassVar[str] = "store"
    bind_unsafe: ClassVar[str] = ":"   # binds are SRC:DST[:opts]
    # `udocker --version` exits non-zero on some versions although it printed the version
    probe_status_matters: ClassVar[bool] = False
    #: the in-container shell every command runs under when the image has /bin/sh, as its
    #: child rather than by exec: PRoot reports a command killed by signal N as 255 (PRoot
    #: 5.1.0 exits with the last tracee's normal exit status, -1 when none exited normally),
    #: and the shell turns it into 128+N. The trap keeps the shell waiting when a whole process
    #: group is signalled (a terminal's ^C, Slurm): it still reports the command's status, and
    #: the command starts with default dispositions (exec resets caught signals). The signal
    #: relay (_udocker_relay.py --in-shell) signals the processes below this shell, never it.
    SHELL_WRAPPER: ClassVar[str] = 'trap : HUP INT QUIT TERM USR1 USR2; "$@"; exit $?'
    #: variables udocker overwrites after the -e values; an explicit --env value is set again
    SHELL_SETS_AGAIN: ClassVar[Tuple[str, ...]] = ("USER", "LOGNAME")

    @classmethod
    def preferred_candidates(cls) -> List[str]:
        # the udocker pip installed with nsdf-hpc (its version is the one nsdf-hpc was tested
        # with) wins over another one found earlier on PATH, also in a venv not activated
        # (detection probes it when it is executable)
        return [_bundled_path()]

    def assessment_inputs(self) -> Optional[Tuple[Sequence[str], Sequence[str]]]:
        return engine_configs(), ("UDOCKER_TARBALL",)

    def _base(self, path: Optional[str] = None) -> List[str]:
        # udocker refuses root ("Error: do not run as root !") without --allow-root
        path = path or self.path
        return [path, "--allow-root"] if self.ctx.is_root else [path]

    def version_argv(self, path: str) -> List[str]:
        return [*self._base(path), "--version"]

    def probe_env(self, env: Mapping[str, str]) -> Dict[str, str]:
        out = process_env(env)
        # `udocker --version` creates its directory as a side effect: keep it out of $HOME
        if "UDOCKER_DIR" in env:
            out["UDOCKER_DIR"] = env["UDOCKER_DIR"]
        return out

    def parse_version(self, stdout: str, stderr: str = "") -> Tuple[str, str]:
        for line in (stdout + "\n" + stderr).splitlines():
            line = line.strip()
            if line.lower().startswith("version:"):
                return "udocker", line.split(":", 1)[1].strip()
            if line.lower().startswith("udocker ") and line.split()[-1][:1].isdigit():
                return "udocker", line.split()[-1]
        raise UnexpectedOutputError("udocker --version", stdout or stderr, expected="'version: X.Y.Z'")

    def assess(self, host: HostFacts, version: str, flavour: str) -> Assessment:
        engine = engine_source()
        caps = {"unprivileged": True, "user_namespaces_needed": False,
                "engine_local": engine != "download", "gpu_nvidia": host.nvidia}
        notes: List[str] = []
        if engine == "download":
            notes.append("udocker downloads its engine (proot) from the internet on first use; "
                         "on an air-gapped site set `tarball =` in /etc/udocker.conf")
        notes.append("read-only binds are not enforced (proot binds are read-write)")
        return Assessment(True, caps, tuple(notes))

    def runtime_env(self, env: Mapping[str, str], cache_root: str) -> Dict[str, str]:
        return {"UDOCKER_DIR": env.get("UDOCKER_DIR") or f"{cache_root}/udocker"}

    def image_plan(self, source: ImageSource, ref: Optional[ImageRef], key: str,
                   insecure: bool = False, platform: Optional[Platform] = None) -> ImagePlan:
        container = f"nsdf-{key[:24]}"
        base = tuple(self._base())
        steps: List[Step] = []
        if source.kind == "registry":
            assert ref is not None
            scheme = "http" if insecure else "https"
            # udocker 1.3.17 cannot pull by digest ("must specify image:tag"): pull the tag that
            # was just resolved to the digest; the entry records the digest
            image = f"{ref.repository}:{ref.tag or 'latest'}"
            # by tag, so --platform chooses from an index as nsdf-hpc did (udocker 1.3.17:
            # "--platform=os/arch"; without it udocker takes the host's)
            plat = (f"--platform={platform}",) if platform is not None else ()
            steps.append(Step(base + ("-q", "pull", f"--registry={scheme}://{ref.registry}", *plat, image),
                              f"pull {ref}", retry=True))
        elif source.kind == "native":
            raise SpecError(f"{source.path} is already a native image")
        else:
            # nsdf_hpc repacks offline sources into "source.tar" first (unpack.py
            # repack_for_udocker): udocker 1.3.17 fails on skopeo's symlinked layer.tar, and it
            # tags an OCI image with the index's ref name (a random one when untagged), so the
            # repack tags the chosen manifest "latest" (unpack.UDOCKER_TAG) whatever the source says
            image = f"nsdf/{key[:24]}:latest"
            steps.append(Step(base + ("-q", "load", "-i", "source.tar", image.rsplit(":", 1)[0]),
                              f"load {source.text}"))
        # --force: a container left by a killed conversion may hold the name (its directory
        # is replaced); saves a separate `udocker rm` (~0.2 s of udocker start-up)
        # udocker 1.3.17 exits 0 when a layer cannot be extracted (a full UDOCKER_DIR): it
        # prints "Error: while extracting image layer" and leaves a truncated container
        steps.append(Step(base + ("-q", "create", "--force", f"--name={container}", image),
                          "create container", fail_if="Error:"))
        # a failed create must not leave a (truncated) container behind, and a failed load or
        # create not the tag: no cache entry owns them, so prune would never remove them (a
        # registry pull's tag is the registry's name: kept)
        undo: Tuple[Step, ...] = (Step(base + ("-q", "rm", "-f", container), f"remove container {container}",
                                       check=False),)
        if source.kind != "registry":
            undo += (Step(base + ("-q", "rmi", "-f", image), f"remove {image}", check=False),)
        return ImagePlan(tuple(steps), location=container,
                         pre_extract="repack" if source.kind != "registry" else None, undo=undo)

    def run_invocation(self, spec: RunSpec, native: NativeImage, container_env: Mapping[str, str],
                       host_env: Mapping[str, str]) -> Invocation:
        binds, workdir = effective_binds(spec)
        argv: List[str] = [*self._base(), "-q", "run", "--nobanner"]
        # udocker 1.3.17's option parser strips whitespace from "--opt=value" but not from
        # "--opt value", so values always go in the separate-argument form (they start with
        # "/" or a variable name, never with "-", which that form requires)
        for b in binds:
            argv += ["-v", f"{b.source}:{b.target}"]
        store = self.store_path(native.location, host_env) if host_env.get("UDOCKER_DIR") else None
        # without -w, udocker starts in the image's WorkingDir, else in the user's home, which
        # an image may lack ("invalid working directory: /root"); the others start in "/"
        workdir = workdir or (_image_workdir(store) if store else None) or "/"
        argv += ["-w", workdir]
        env = dict(container_env)
        command = list(spec.command)
        prelude: List[str] = []
        if any(a == "" for a in command):
            # udocker's parser drops empty arguments ("if not arg: continue"): carry the argv
            # shell-quoted in a variable and rebuild it with /bin/sh inside the container
            env["NSDF_HPC_ARGV"] = shlex.join(command)
            prelude.append('eval "set -- $NSDF_HPC_ARGV"; unset NSDF_HPC_ARGV')
            command = []
        # udocker 1.3.17 sets USER, LOGNAME (and USERNAME) after the -e values (engine/base.py
        # _run_env_set), so an explicit value is set again by the in-container shell
        prelude += [f"export {k}={shlex.quote(spec.env[k])}" for k in self.SHELL_SETS_AGAIN
                    if k in spec.env]
        # the shell would add these to the command's environment (as on the other runtimes)
        added = [k for k in ("SHLVL", "PWD") if k not in spec.env]
        # the one look at the disk (_has_sh): the unpacked image, which exists by now except
        # for a --dry-run of an image not converted yet (shown without the shell)
        in_shell = bool(prelude) or (store is not None and self._has_sh(store))
        if in_shell:
            unset = [f"unset {' '.join(added)}"] if added else []
            command = ["/bin/sh", "-c", "; ".join([*prelude, *unset, self.SHELL_WRAPPER]), "sh", *command]
        explicit = {k: v for k, v in env.items() if k in spec.env or k not in container_env}
        tail: List[str] = []
        if not spec.fakeroot and not self.ctx.is_root:
            # run as the caller (proot otherwise emulates root), with the host's passwd
            tail += [f"--user={self.ctx.uid}:{self.ctx.gid}", "--hostauth"]
        tail += list(spec.extra_args)
        tail.append(native.location)
        static = process_env(host_env, {k: v for k, v in host_env.items() if k in ("UDOCKER_DIR",)})
        blocked: Tuple[str, ...] = ()
        if self.ctx.python:
            # signals sent to nsdf-run must reach the command: see _udocker_relay.py
            argv = [self.ctx.python, "-I", "-S", RELAY, *(["--in-shell"] if in_shell else []), "--", *argv]
            blocked = RELAY_SIGNALS
        # udocker 1.3.17 creates a missing mount point in the container's ROOT and removes it
        # when the run ends (utils/mountpoint.py: create, then restore/delete_all), also while
        # another run of the same container still uses it: concurrent runs (array tasks,
        # Executor calls) then intermittently saw ENOENT under their binds. Made here first,
        # they exist, so udocker neither records nor removes them (a read-only store: left alone)
        mkdirs: List[str] = []
        mkfiles: List[str] = []
        root = os.path.join(store, "ROOT") if store else None
        if root and os.access(root, os.W_OK):
            for b in binds:
                p = os.path.join(root, b.target.lstrip("/"))
                (mkfiles if os.path.isfile(b.source) else mkdirs).append(p)
        return Invocation(tuple(argv), tuple(tail), tuple(command), static,
                          EnvEncoding("argv", flag="-e"), env, explicit, tuple(mkdirs), tuple(mkfiles),
                          blocked_signals=blocked)

    def wrap_command(self, command: Sequence[str], explicit_env: Mapping[str, str]) -> Tuple[str, ...]:
        # run_invocation starts the command under its own shell (not by exec: proot reports a
        # death by signal as 255), which also gives 127 and 126
        return tuple(command)

    def store_path(self, location: str, runtime_env: Mapping[str, str]) -> Optional[str]:
        return os.path.join(runtime_env["UDOCKER_DIR"], "containers", location)

    def remove_argv(self, location: str) -> Optional[List[str]]:
        return [*self._base(), "-q", "rm", location]

    def store_has_shell(self, location: str, env: Mapping[str, str]) -> Optional[bool]:
        # the answer run_invocation acts on; saves starting udocker (a Python program, ~0.2 s
        # of the cold pull) only to run `/bin/sh -c 'exit 0'`
        store = self.store_path(location, env) if env.get("UDOCKER_DIR") else None
        if store is None or not os.path.isdir(os.path.join(store, "ROOT")):
            return None
        return self._has_sh(store)

    def _has_sh(self, store: str) -> bool:
        """Whether the container's ROOT (``udocker create`` extracted the layers there) has
        ``/bin/sh``, its symlinks followed inside ROOT (``/bin -> usr/bin``, ``sh -> dash``)."""
        try:
            sh = resolve_in_root(os.path.join(store, "ROOT"), "bin/sh", follow_last=True)
        except (ValueError, OSError):
            return False
        return self.ctx.exists(sh)


def engine_configs() -> Tuple[str, str]:
    """udocker's configuration files that may name a local engine tarball."""
    return "/etc/udocker.conf", os.path.expanduser("~/.udocker/udocker.conf")


def engine_source(env: Optional[Mapping[str, str]] = None) -> str:
    """"installed", "tarball" (a configured local tarball) or "download"."""
    env = os.environ if env is None else env
    if env.get("UDOCKER_TARBALL"):
        return "tarball"
    for conf in engine_configs():
        try:
            with open(conf) as fh:
                if any(line.split("=", 1)[0].strip() == "tarball" for line in fh if "=" in line):
                    return "tarball"
        except OSError:
            continue
    return "download"


def _bundled_path() -> str:
    return os.path.join(os.path.dirname(sys.executable), "udocker")


def bundled_udocker() -> Optional[str]:
    """The udocker that pip installed beside nsdf-hpc (when this environment is not on PATH)."""
    path = _bundled_path()
    return path if os.access(path, os.X_OK) else None


def _image_workdir(store: str) -> Optional[str]:
    """The image's WorkingDir from udocker's container.json (what udocker itself reads)."""
    try:
        with open(os.path.join(store, "container.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    for key in ("config", "container_config"):
        section = meta.get(key) if isinstance(meta, dict) else None
        if isinstance(section, dict) and section.get("WorkingDir"):
            return str(section["WorkingDir"])
    return None
