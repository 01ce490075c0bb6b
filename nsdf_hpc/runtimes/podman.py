"""Podman (rootful or rootless) and NERSC's podman-hpc wrapper."""
from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import replace
from typing import Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

from .._fsutil import load_toml
from ..environment import EnvEncoding
from ..errors import SpecError, UnexpectedOutputError
from ..host import HostFacts
from ..models import NativeImage, RunSpec
from ..reference import ImageRef, ImageSource, Platform
from .base import (IMPORTED, PREVIOUS, Assessment, ImagePlan, Invocation, OrphanGuard, Runtime, Step, effective_binds,
                   parse_first_version, process_env, require_paths)

logger = logging.getLogger(__name__)

#: every store name an NSDF cache entry owns lives under this repository (``podman images``)
PRIVATE_REPO = "localhost/nsdf-hpc"


class Podman(Runtime):
    """Podman: images live in podman's own store; run with ``--pull=never``."""

    name: ClassVar[str] = "podman"
    foreign_platforms: ClassVar[bool] = True
    executables: ClassVar[Tuple[str, ...]] = ("podman",)
    priority: ClassVar[int] = 50
    storage: ClassVar[str] = "store"
    bind_unsafe: ClassVar[str] = ":"   # binds are SRC:DST[:opts]
    #: the container's process before the command starts (``OrphanGuard.started``): runc's
    #: (measured here, podman 4.3.1 + runc 1.1.5: ``runc:[2:INIT]`` until start, then
    #: ``podman-init``); crun's is its own name (not measured here: crun cannot run on this
    #: testbed's hybrid cgroups)
    startup_names: ClassVar[Tuple[str, ...]] = ("runc:[2:INIT]", "crun")

    def parse_version(self, stdout: str, stderr: str = "") -> Tuple[str, str]:
        return "podman", parse_first_version(stdout or stderr, "podman --version", "podman version")

    def assess(self, host: HostFacts, version: str, flavour: str) -> Assessment:
        caps = {"root": host.is_root, "user_namespaces": host.userns,
                "subuid": host.subuid and host.subgid, "gpu_nvidia": host.nvidia}
        notes: List[str] = []
        usable = host.is_root or host.userns
        if not usable:
            notes.append(f"rootless podman needs user namespaces: {host.userns_reason()}")
        elif not host.is_root and not caps["subuid"]:
            notes.append(f"no /etc/subuid or /etc/subgid entry for {host.user}: rootless podman "
                         "can map only your own uid (images with other owners fail to unpack)")
        return Assessment(usable, caps, tuple(notes))

    def image_plan(self, source: ImageSource, ref: Optional[ImageRef], key: str,
                   insecure: bool = False, platform: Optional[Platform] = None) -> ImagePlan:
        if source.kind == "registry":
            assert ref is not None
            argv = [self.path, "pull", "-q"]
            if insecure:
                argv.append("--tls-verify=false")
            if platform is not None:
                # podman 4.3 pulls another platform's manifest by digest anyway, but warns
                # "image platform (...) does not match the expected platform" without this
                argv.append(f"--platform={platform}")
            argv.append(ref.by_digest())
            # runs by digest so a moved tag never changes what runs
            loc = ref.by_digest()
            # no retry=: containers/image tries a failed pull 3 times itself (podman 4.3:
            # "Failed, retrying in 1s ... (1/3)")
            return ImagePlan((Step(tuple(argv), f"pull {ref}", registry=True),), location=loc)
        if source.kind == "native":
            raise SpecError(f"{source.path} is already a native image")
        transport = source.transport
        src = f"{transport}:{source.path}" + (f":{source.layout_ref}" if source.layout_ref else "")
        # `podman pull -q` prints the image id, which becomes the location ("@stdout")
        return ImagePlan((Step((self.path, "pull", "-q", src), f"import {source.text}"),),
                         location="@stdout")

    def run_invocation(self, spec: RunSpec, native: NativeImage, container_env: Mapping[str, str],
                       host_env: Mapping[str, str]) -> Invocation:
        binds, workdir = effective_binds(spec)
        require_paths(binds, self.name, ":")
        # -i: podman passes stdin only when asked (without it `echo x | ... cat` prints
        # nothing); -t only under a terminal; --init: the command is not PID 1, which ignores
        # SIGTERM/SIGINT without a handler (Ctrl-C and scancel would not stop it)
        argv: List[str] = [self.path, "run", "--rm", "--pull=never", "-i", "--init",
                           "--network=" + ("host" if spec.network else "none")]
        if spec.tty:
            argv.append("-t")
        if not self.ctx.is_root and not spec.fakeroot:
            # run as the caller, with files in binds owned by the caller (HPC expectation)
            argv.append("--userns=keep-id")
        for b in binds:
            argv += ["-v", f"{b.source}:{b.target}" + (":ro" if b.read_only else "")]
        if workdir:
            argv += ["-w", workdir]
        tail: List[str] = []
        if spec.gpu:
            tail += self.gpu_args()
        if spec.writable_tmpfs:
            tail += ["--read-only=false"]
        tail += list(spec.extra_args)
        tail.append(native.location)
        return Invocation(tuple(argv), tuple(tail), tuple(spec.command), process_env(host_env),
                          EnvEncoding("argv", flag="-e"), dict(container_env), dict(spec.env))

    def parse_import_output(self, stdout: str) -> str:
        lines = [ln.strip() for ln in stdout.strip().splitlines() if ln.strip()]
        # `podman-hpc pull` prints "INFO: Migrating image to ..." after the id (podman_hpc.py)
        ids = [ln for ln in lines if re.fullmatch(r"(sha256:)?[0-9a-f]{12,64}", ln)]
        if not lines:
            raise UnexpectedOutputError(f"{self.name} pull", stdout, expected="the image id")
        return (ids or lines)[-1]

    def remove_argv(self, location: str) -> Optional[List[str]]:
        if not location.startswith(PRIVATE_REPO + "/"):
            # an entry made before names were per entry runs a name (repo@digest, an image
            # id) that every cache of this user shares: removing it could take the image
            # from another cache, so it is left to `podman image prune` / `podman rmi`
            return None
        # no --force: podman removes only this name while another name (another cache's
        # entry) refers to the image, deletes the image with its last name, and refuses
        # while a container uses it (the unnamed image is then left to `podman image prune`)
        return [self.path, "rmi", "--ignore", location]

    def login_env(self, user: str, password: str, authfile: str) -> Dict[str, str]:
        # containers-image reads REGISTRY_AUTH_FILE (never --creds, which puts it in argv)
        return {"REGISTRY_AUTH_FILE": authfile}

    def claim_plan(self, location: str, owner: str) -> Optional[ImagePlan]:
        digest = location.rpartition("@")[2] if "@" in location else location
        hexpart = re.sub(r"[^0-9a-f]", "", digest.partition(":")[2] or digest)[:16] or "image"
        name = f"{PRIVATE_REPO}/{hexpart}:{owner}"
        steps = [Step((self.path, "tag", location, name), "name the image for this cache")]
        if "@" in location:
            # the pull left the shared name repo@digest; without it the image is deleted with
            # its last entry name. Entries that still run repo@digest keep working: podman
            # finds a digest reference by the image's digest, not only by its names
            steps.append(Step((self.path, "untag", name, location), "drop the shared pull name",
                              check=False))
        return ImagePlan(tuple(steps), location=name)

    def holds_argv(self, location: str) -> Optional[List[str]]:
        return [self.path, "image", "exists", location]

    def store_holds(self, location: str, env: Mapping[str, str]) -> Optional[bool]:
        # an image listed in the store's own images.json needs no `podman image exists`
        # (about 50 ms a run); anything else (not listed, a store podman may find elsewhere)
        # is asked of podman, whose answer is the authority
        path = store_images_file(env, self.ctx.uid, _read_toml, os.path.isdir)
        if path is None:
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                listed = squash_record(json.load(fh), location)
        except (OSError, ValueError):
            return None
        return True if listed is not None else None

    def store_size_argv(self, location: str) -> Optional[List[str]]:
        return [self.path, "image", "inspect", "--format", "{{.Size}}", location]

    def orphan_guard(self, name: str, scratch: str) -> Optional[OrphanGuard]:
        # --sig-proxy forwards signals only once the client has set it up, just before it
        # starts the container; a SIGINT/SIGTERM before that ends the client (podman 4.3's
        # shutdown handler exits 1 on INT and 0 on TERM, or the signal kills it) and leaves
        # the container created or running under conmon. So a signal is held until the
        # container's process (--pidfile, written once the OCI runtime created it) runs the
        # command, and passed on then, when the proxy is there. If the client ends anyway
        # (a terminal's ^C reaches it directly), `rm -f` stops the container (its stop
        # signal, SIGKILL after --time) and prints its name; --cidfile is written once it exists
        return OrphanGuard(("--name", name, "--cidfile", scratch, "--pidfile", scratch + ".pid"),
                           (self.path, "rm", "-f", "--ignore", "--time", "5", name), scratch,
                           started=scratch + ".pid")

    def gpu_args(self) -> List[str]:
        return ["--device", "nvidia.com/gpu=all"]


def _read_toml(path: str) -> Optional[Dict[str, object]]:
    """A storage.conf's ``[storage]`` table; None when the file does not exist, and ``{"?":
    ...}`` when it cannot be read (the caller then trusts nothing it would say)."""
    try:
        return load_toml(path).get("storage") or {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return {"?": str(err)}


def store_images_file(env: Mapping[str, str], uid: int,
                      read: Callable[[str], Optional[Mapping[str, object]]],
                      isdir: Callable[[str], bool]) -> Optional[str]:
    """The ``images.json`` in which podman's store (containers/storage) lists its images:
    ``GRAPHROOT/DRIVER-images/images.json``, found as containers/storage finds its
    configuration (``CONTAINERS_STORAGE_CONF``; a rootless user's own storage.conf; the
    system's ``/etc`` then ``/usr/share`` file) and its defaults. None whenever that reading is
    not certain (an unreadable file, a path with ``$``, no driver named and both stores
    present): the caller then asks podman. ``read`` gives a file's ``[storage]`` table (None:
    no such file); pure otherwise."""
    system = read("/etc/containers/storage.conf")
    if system is None:
        system = read("/usr/share/containers/storage.conf")
    system = system or {}
    if uid == 0:
        own = read(env["CONTAINERS_STORAGE_CONF"]) if env.get("CONTAINERS_STORAGE_CONF") else system
        conf, graph = own or {}, str((own or {}).get("graphroot") or "/var/lib/containers/storage")
    else:
        data = env.get("XDG_DATA_HOME") or (f"{env['HOME']}/.local/share" if env.get("HOME") else "")
        default = str(system.get("rootless_storage_path") or (f"{data}/containers/storage" if data else ""))
        config = env.get("CONTAINERS_STORAGE_CONF") or (
            f"{env['XDG_CONFIG_HOME']}/containers/storage.conf" if env.get("XDG_CONFIG_HOME")
            else f"{env['HOME']}/.config/containers/storage.conf" if env.get("HOME") else "")
        own = read(config) if config else None
        conf = own if own is not None else system
        graph = str((own or {}).get("graphroot") or (own or {}).get("rootless_storage_path") or default)
    if "?" in conf or "?" in system or not graph.startswith("/") or "$" in graph:
        return None
    driver = str(conf.get("driver") or system.get("driver") or "")
    if not driver:
        found = [d for d in ("overlay", "vfs") if isdir(f"{graph}/{d}-images")]
        if len(found) != 1:
            return None
        driver = found[0]
    return f"{graph}/{driver}-images/images.json"


def squash_record(images: object, location: str) -> Optional[Dict[str, object]]:
    """The record of ``location`` (a name, ``repo@digest`` or an image id) in a squash store's
    (or podman's own store's) ``images.json`` (pure)."""
    if not isinstance(images, list):
        return None
    bare = location.rpartition(":")[2] if re.fullmatch(r"(sha256:)?[0-9a-f]{64}", location) else None
    digest = location.rpartition("@")[2] if "@" in location else None
    for rec in images:
        if not isinstance(rec, dict):
            continue
        names = rec.get("names") or []
        if (bare and rec.get("id") == bare) or location in names or (digest and (
                rec.get("digest") == digest or any(str(n).endswith("@" + digest) for n in names))):
            return rec
    return None


def squashfs_problem(head: bytes, size: int) -> Optional[str]:
    """Why a SquashFS file whose first bytes are ``head`` and whose size is ``size`` is not
    whole (pure): the superblock (written last by mksquashfs) has the magic ``hsqs`` and, at
    offset 40, the bytes the filesystem uses (the file is padded beyond them)."""
    if len(head) < 48 or head[:4] != b"hsqs":
        return "not a SquashFS file (no superblock: mksquashfs did not finish)"
    used = struct.unpack_from("<Q", head, 40)[0]
    if used > size:
        return f"truncated ({size} of {used} bytes)"
    return None


class PodmanHPC(Podman):
    """podman-hpc (NERSC): podman with site hooks; a pull also *migrates* the image to a
    read-only SquashFS store (the squash dir) that runs and compute nodes use.

    Checked against podman-hpc 1.2.2 from PyPI on the testbed (tests/testbed/podman-hpc.sh):
    it needs ``$USER`` for every call, keeps its writable store per uid (the site config's
    ``graph_root_template``) and its squashes in ``SQUASH_DIR`` (default ``$SCRATCH/storage``,
    else ``/tmp/storage``, which every user would share: nsdf-hpc then uses its own cache).
    """

    name: ClassVar[str] = "podman-hpc"
    executables: ClassVar[Tuple[str, ...]] = ("podman-hpc",)
    priority: ClassVar[int] = 45

    def version_argv(self, path: str) -> List[str]:
        # podman-hpc (a click group) has no --version, and `podman-hpc version` is podman's
        # (4.3.1); `infohpc` prints "Podman-HPC Version: 1.2.2" (checked on 1.2.2)
        return [path, "infohpc"]

    def probe_env(self, env: Mapping[str, str]) -> Dict[str, str]:
        out = super().probe_env(env)
        out.update(self._own_env(env))
        return out

    def _own_env(self, env: Mapping[str, str], cache_root: Optional[str] = None) -> Dict[str, str]:
        # without $USER every podman-hpc call stops: "Error: 'USER'... Exiting"
        out = {"USER": env.get("USER") or env.get("LOGNAME") or self.ctx.user}
        # migrate runs a container on podman's default network, whose CNI plugins need
        # iptables (in /usr/sbin): without it the squash silently fails
        path = env.get("PATH") or "/usr/local/bin:/usr/bin:/bin"
        missing = [d for d in ("/usr/sbin", "/sbin") if d not in path.split(":")]
        out["PATH"] = ":".join([path, *missing])
        # the site's podman-hpc settings (PODMANHPC_*, from its module file) pass through
        out.update({k: v for k, v in env.items() if k.startswith("PODMANHPC_")})
        if env.get("SQUASH_DIR"):
            out["SQUASH_DIR"] = env["SQUASH_DIR"]
        elif cache_root and not env.get("SCRATCH"):
            out["SQUASH_DIR"] = f"{cache_root}/podman-hpc"   # podman-hpc makes it (one level)
        return out

    def runtime_env(self, env: Mapping[str, str], cache_root: str) -> Dict[str, str]:
        return self._own_env(env, cache_root)

    def parse_version(self, stdout: str, stderr: str = "") -> Tuple[str, str]:
        text = stdout or stderr
        for line in text.splitlines():
            key, sep, value = line.strip().partition(":")
            # `podman-hpc infohpc` (1.1+) prints "Podman-HPC Version: 1.1.1"
            if sep and key.strip().lower() == "podman-hpc version" and value.strip():
                return "podman-hpc", value.strip().split()[0]
        for line in text.splitlines():
            key, sep, value = line.strip().partition(":")
            # `podman version`: "Version:      4.3.1" (the podman underneath)
            if sep and key.strip().lower() == "version" and value.strip():
                return "podman-hpc", value.strip().split()[0]
        if "podman-hpc version" in text.lower():
            return "podman-hpc", parse_first_version(text, "podman-hpc version", "podman-hpc version")
        return "podman-hpc", parse_first_version(text, "podman-hpc version", "podman version")

    def image_plan(self, source: ImageSource, ref: Optional[ImageRef], key: str,
                   insecure: bool = False, platform: Optional[Platform] = None) -> ImagePlan:
        plan = super().image_plan(source, ref, key, insecure, platform)
        # `podman-hpc pull` migrates by itself, and an explicit migrate makes the squash also
        # where a site turned that off; both exit 0 when squashing failed ("Squash Failed" in
        # the log only), so the squash store (the read-only images) must list the image id
        check = Step(self._squashed_argv(), "check the squash", expect=PREVIOUS)
        if source.kind != "registry":
            # an archive or layout: the pull's own migrate looks the image up by the source's
            # name ("docker-archive:..."), finds nothing and exits 0 without a squash (1.2.2),
            # so the image would run only where this node's writable store has it: migrate
            # the imported image by its id
            pull = replace(plan.steps[0], names_import=True)
            return ImagePlan((
                pull,
                Step((self.path, "migrate", IMPORTED), "migrate to the squash store"),
                replace(check, expect=IMPORTED),
            ), location="@stdout")
        assert ref is not None
        loc = ref.by_digest()
        return ImagePlan(plan.steps + (
            Step((self.path, "migrate", loc), "migrate to the squash store"),
            # one "ID READONLY" line per name of the image under that reference: " true" only
            # for the squash store's copy (one call: each podman-hpc call costs about 0.3 s)
            Step(self._squashed_argv(loc), "check the squash", expect=" true"),
        ), location=plan.location)

    def _squashed_argv(self, location: Optional[str] = None) -> Tuple[str, ...]:
        # `images` is the one listing podman-hpc gives the squash store (additionalimagestore);
        # `image exists` and `image inspect` see only this node's writable store
        fmt = ("--no-trunc", "--format", "{{.ID}} {{.ReadOnly}}")
        if location is None:
            return (self.path, "images", "--filter", "readonly=true", "--no-trunc", "--format", "{{.ID}}")
        if re.fullmatch(r"(sha256:)?[0-9a-f]{64}", location):
            # podman lists no image for a bare id given as a reference: filter by id instead
            return (self.path, "images", "--filter", "id=" + location.rpartition(":")[2], *fmt)
        return (self.path, "images", *fmt, location)

    def holds_argv(self, location: str) -> Optional[List[str]]:
        # a node runs an entry from the squash store (on a shared filesystem), not from its own
        # writable store (node-local at NERSC, and emptied by `podman-hpc rmi`): ask the
        # squash store, or every node without the writable copy would drop the entry
        return list(self._squashed_argv(location))

    def _squash_state(self, location: str, env: Mapping[str, str]
                      ) -> Tuple[Optional[bool], str, Optional[Dict[str, object]]]:
        """``(whole, why, record)`` of an image's squash, read from the squash store's files
        (layout of podman-hpc's migrate2scratch.py): whole None when the files cannot tell
        (the image not listed under that name, the store unreadable)."""
        squash_dir = env.get("SQUASH_DIR") or f"{env.get('SCRATCH') or '/tmp'}/storage"
        try:
            with open(os.path.join(squash_dir, "overlay-images", "images.json")) as fh:
                record = squash_record(json.load(fh), location)
        except (OSError, ValueError) as err:
            return None, f"cannot read the squash store {squash_dir}: {err}", None
        if record is None:
            return None, f"{location} is not listed in {squash_dir}", None
        try:
            with open(os.path.join(squash_dir, "overlay", str(record.get("layer")), "link")) as fh:
                link = fh.read().strip()
            path = os.path.join(squash_dir, "overlay", "l", f"{link}.squash")
            with open(path, "rb") as fh:
                problem = squashfs_problem(fh.read(96), os.fstat(fh.fileno()).st_size)
        except FileNotFoundError as err:
            path, problem = str(err.filename), "missing"
        except OSError as err:
            return None, f"cannot read the squash store {squash_dir}: {err}", record
        if problem is None:
            return True, "", record
        return False, f"the squash {path} is {problem}", record

    def store_image_problem(self, location: str, env: Mapping[str, str]
                            ) -> Optional[Tuple[str, Optional[ImagePlan]]]:
        # migrate's mksquashfs writes $SQUASH_DIR/overlay/l/<link>.squash and the image record
        # last; a migrate that died while squashing (node crash, OOM, job killed) leaves a
        # half-written file that the next migrate takes as done ("Squash file already
        # generated", 1.2.2 migrate2scratch._mksq): the image is then listed, and every run
        # from the squash fails ("catatonit: failed to exec pid1", exit 1)
        whole, why, record = self._squash_state(location, env)
        if whole is not False or record is None:
            return None              # not listed: holds_argv and the plan's check say so
        image_id = str(record["id"])
        return why, ImagePlan((
            # by id: `rmsqi NAME` only drops the name while the image has others
            Step((self.path, "rmsqi", image_id), "remove the broken squash"),
            Step((self.path, "migrate", image_id), "migrate to the squash store again"),
            Step(self._squashed_argv(), "check the squash", expect=image_id),
        ), location=location)

    def store_holds(self, location: str, env: Mapping[str, str]) -> Optional[bool]:
        # a whole squash listed in the store's own files needs no podman-hpc call (each
        # costs about 0.3 s here: it runs `podman --help` whenever it starts); anything else
        # is asked of the tool (holds_argv), whose listing is the authority
        whole, _why, _record = self._squash_state(location, env)
        return True if whole else None

    def parse_holds(self, returncode: int, stdout: str) -> Optional[bool]:
        if returncode != 0:
            return None
        # one "ID READONLY" line per name of the image; "true" only for the squash store's copy
        return any(line.split()[-1:] == ["true"] for line in stdout.splitlines())

    def run_invocation(self, spec: RunSpec, native: NativeImage, container_env: Mapping[str, str],
                       host_env: Mapping[str, str]) -> Invocation:
        inv = super().run_invocation(spec, native, container_env, host_env)
        own = self._own_env(host_env)
        # podman-hpc's click parser drops the first "--" among the command's arguments
        # (`printf %s a -- b` lost its "--" on 1.2.2): a "--" before the image is the one it eats
        tail = (*inv.tail[:-1], "--", inv.tail[-1])
        return replace(inv, tail=tail, static_env={**inv.static_env, **own})

    def claim_plan(self, location: str, owner: str) -> Optional[ImagePlan]:
        # a name given in podman's writable store would not reach the squashed copy that
        # `migrate` made: entries keep the pulled name, and remove_argv leaves such shared
        # names in the store
        return None

    def gpu_args(self) -> List[str]:
        return ["--gpu"]
