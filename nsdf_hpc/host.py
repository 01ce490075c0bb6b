"""Facts about this host and this user that decide what a runtime can do (no processes)."""
from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def _subid(path: str, user: str, uid: int) -> bool:
    text = _read(path) or ""
    return any(line.split(":", 1)[0] in (user, str(uid)) for line in text.splitlines() if line)


@dataclass(frozen=True)
class HostFacts:
    """A snapshot of the kernel and user facts runtimes depend on."""

    uid: int
    user: str
    max_user_namespaces: int
    unprivileged_userns_clone: Optional[bool]   # Debian/Ubuntu sysctl; None when absent
    apparmor_restricts_userns: bool
    fuse_access: bool
    subuid: bool
    subgid: bool
    squashfuse: bool
    nvidia: bool
    amd_gpu: bool
    in_slurm_allocation: bool
    paths: Tuple[Tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def userns(self) -> bool:
        """Unprivileged user namespaces are available to this user."""
        if self.max_user_namespaces <= 0 or self.unprivileged_userns_clone is False:
            return False
        return not self.apparmor_restricts_userns

    def userns_reason(self) -> str:
        if self.max_user_namespaces <= 0:
            return f"user namespaces are disabled (user.max_user_namespaces={self.max_user_namespaces})"
        if self.unprivileged_userns_clone is False:
            return "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)"
        if self.apparmor_restricts_userns:
            return "AppArmor restricts unprivileged user namespaces"
        return "user namespaces are available"


def probe_host(env: Optional[Mapping[str, str]] = None) -> HostFacts:
    """Read /proc, /dev and /etc; never raises."""
    env = os.environ if env is None else env
    uid = os.getuid()
    try:
        import pwd
        user = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        user = env.get("USER", str(uid))
    try:
        max_ns = int(_read("/proc/sys/user/max_user_namespaces") or 0)
    except ValueError:
        max_ns = 0
    clone = _read("/proc/sys/kernel/unprivileged_userns_clone")
    apparmor = _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1"
    fuse = os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)
    return HostFacts(
        uid=uid, user=user, max_user_namespaces=max_ns,
        unprivileged_userns_clone=None if clone is None else clone == "1",
        apparmor_restricts_userns=apparmor and uid != 0,
        fuse_access=fuse,
        subuid=_subid("/etc/subuid", user, uid), subgid=_subid("/etc/subgid", user, uid),
        squashfuse=bool(shutil.which("squashfuse") or shutil.which("squashfuse_ll")),
        nvidia=bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/proc/driver/nvidia/version"),
        amd_gpu=os.path.exists("/dev/kfd"),
        in_slurm_allocation=bool(env.get("SLURM_JOB_ID")),
    )


def free_bytes(path: str) -> Optional[int]:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def mount_options(path: str) -> Dict[str, str]:
    """``{"fstype": ..., "options": ...}`` of the mount holding ``path`` (longest prefix)."""
    best: Dict[str, str] = {}
    best_len = -1
    real = os.path.realpath(path)
    for line in (_read("/proc/self/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > best_len:
            best, best_len = {"fstype": parts[2], "options": parts[3], "mountpoint": mnt}, len(mnt)
    return best


#: GOARCH -> the name binfmt_misc registers its QEMU user-mode emulator under (qemu-user-binfmt)
_QEMU = {"amd64": "x86_64", "arm64": "aarch64", "arm": "arm", "386": "i386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def emulator(architecture: str, root: str = "/proc/sys/fs/binfmt_misc") -> Optional[str]:
    """The binfmt_misc entry that runs ``architecture``'s binaries here (qemu-user), when one
    is registered and enabled; None otherwise."""
    name = _QEMU.get(architecture, architecture)
    for entry in (f"qemu-{name}", f"qemu-{name}-static"):
        text = _read(os.path.join(root, entry))
        if text is not None and text.splitlines()[:1] == ["enabled"]:
            return os.path.join(root, entry)
    return None
