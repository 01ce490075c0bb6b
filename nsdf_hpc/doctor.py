"""``nsdf-run doctor``: what is wrong on this machine for this user, and how to fix it."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, List

from .errors import NsdfError
from .host import free_bytes, mount_options

if TYPE_CHECKING:
    from .client import Client

GiB = 1 << 30


@dataclass(frozen=True)
class Finding:
    level: str          # ok | info | warn | FAIL
    message: str
    fix: str = ""


def diagnose(client: "Client") -> List[Finding]:
    out: List[Finding] = []
    host = client.host
    infos = client.detect(refresh=True)
    found = [i for i in infos if i.found]
    out.append(Finding("info", f"user {host.user} (uid {host.uid}); config files: "
                               f"{', '.join(client.settings.files) or 'none'}"))
    try:
        choice = client.choose()
        out.append(Finding("ok", f"runtime: {choice.explain()}; {choice.info.version} at {choice.info.path}"))
    except NsdfError as err:
        out.append(Finding("FAIL", f"no runtime can be used: {str(err).splitlines()[0]}",
                           "pip install udocker (it needs no privileges), or `module load apptainer`"))
    for i in found:
        if not i.usable:
            out.append(Finding("warn", f"{i.name} {i.version} is installed but unusable: {'; '.join(i.notes)}"))
    if not host.userns:
        out.append(Finding("warn", host.userns_reason() + ": Charliecloud, rootless Podman and "
                           "non-setuid Apptainer cannot run",
                           "use UDocker (nsdf-run --runtime udocker), or ask your admins for a setuid "
                           "Apptainer or to enable user namespaces (sysctl user.max_user_namespaces)"))
    else:
        out.append(Finding("ok", "unprivileged user namespaces are available"))
    if not host.fuse_access:
        out.append(Finding("warn", "/dev/fuse is not accessible: SIF and SquashFS images cannot be "
                           "mounted without privileges (Apptainer extracts them on each run instead)",
                           "ask your admins to make /dev/fuse 0666 (the usual udev rule), or use "
                           "directory/sandbox images"))
    elif not host.squashfuse:
        out.append(Finding("info", "squashfuse is not installed: unprivileged Apptainer extracts SIF "
                           "images to a sandbox on every run", "install squashfuse (apt/dnf)"))
    podman = next((i for i in infos if i.name == "podman" and i.found), None)
    if podman and not host.is_root and not (host.subuid and host.subgid):
        out.append(Finding("warn", f"no /etc/subuid and /etc/subgid entries for {host.user}: rootless "
                           "Podman cannot unpack most images", f"ask your admins: usermod --add-subuids "
                           f"100000-165535 --add-subgids 100000-165535 {host.user}"))
    ud = next((i for i in infos if i.name == "udocker" and i.found), None)
    if ud and not ud.capabilities.get("engine_local", True):
        out.append(Finding("warn", "udocker will download its engine from the internet on first use",
                           "on air-gapped sites put `tarball = /path/udocker-englib-X.tar.gz` in "
                           "/etc/udocker.conf"))
    root = client.cache.root
    probe = root
    while not os.path.exists(probe) and probe != "/":
        probe = os.path.dirname(probe)
    free = free_bytes(probe)
    home = client.env.get("HOME") or os.path.expanduser("~")
    on_home = os.path.realpath(probe).startswith(os.path.realpath(home).rstrip("/") + "/") or \
        os.path.realpath(probe) == os.path.realpath(home)
    src = client.settings.sources.get("cache_dir", "default")
    msg = f"image cache: {root} ({src}; {free / GiB:.1f} GiB free)" if free is not None else f"image cache: {root}"
    if on_home and (free is None or free < 20 * GiB or mount_options(probe).get("fstype") in ("nfs", "nfs4")):
        out.append(Finding("warn", msg + " is in $HOME, which is usually small and quota-limited",
                           "export NSDF_HPC_CACHE=$SCRATCH/nsdf-hpc (or set cache_dir in "
                           "~/.config/nsdf-hpc/config.toml)"))
    elif free is not None and free < 5 * GiB:
        out.append(Finding("warn", msg + ": little free space left", "set NSDF_HPC_CACHE to a larger filesystem"))
    else:
        out.append(Finding("ok", msg))
    if "noexec" in mount_options(probe).get("options", "").split(","):
        out.append(Finding("warn", f"{probe} is mounted noexec: Charliecloud directory images cannot run there",
                           "set NSDF_HPC_CACHE to a filesystem without noexec"))
    tmp = tempfile.gettempdir()
    tmo = mount_options(tmp)
    if tmo.get("fstype") == "tmpfs":
        out.append(Finding("info", f"{tmp} is a tmpfs (RAM): nsdf-hpc converts images inside the "
                           "cache directory instead, so large images do not fill memory"))
    if client.settings.mirrors:
        out.append(Finding("info", "registry mirrors: " + ", ".join(f"{k} -> {v}" for k, v in client.settings.mirrors.items())))
    out.extend(_slurm_backend(client))
    if host.in_slurm_allocation:
        out.append(Finding("info", f"inside Slurm job {client.env.get('SLURM_JOB_ID')}: images are "
                           "taken from the cache only" + (" (pull_on_compute is on)" if client.settings.pull_on_compute else "")))
    return out


def _slurm_backend(client: "Client") -> List[Finding]:
    """Which Slurm backend nsdf-hpc would use and why; slurmrestd is pinged when chosen."""
    try:
        sched = client.scheduler()
    except NsdfError as err:
        return [Finding("FAIL", f"Slurm backend: {str(err).splitlines()[0]}",
                        "fix the [slurm] settings (backend, rest_url) or SLURMRESTD_URL/SLURM_JWT")]
    line = f"Slurm backend: {sched.backend} ({sched.choice_reason})"
    if sched.backend != "rest":
        return [Finding("info", line)]
    try:
        return [Finding("ok", f"{line}; {sched.ping()}")]   # type: ignore[attr-defined]
    except NsdfError as err:
        return [Finding("FAIL", f"{line}; {str(err).splitlines()[0]}",
                        "start slurmrestd, check rest_url / SLURMRESTD_URL, or renew SLURM_JWT "
                        "(`scontrol token`)")]
