"""Shared helpers for the integration tests: run nsdf-run as root or as the test user."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

RUNTIMES = ["apptainer", "charliecloud", "podman", "podman-hpc", "udocker"]
#: one parameter per real runtime, each carrying its tool marker (podman-hpc: podman_hpc)
RUNTIME_PARAMS = [pytest.param(r, marks=getattr(pytest.mark, r.replace("-", "_")), id=r) for r in RUNTIMES]
BUSYBOX = "127.0.0.1:5443/hpc/busybox:latest"
PYDEB = "127.0.0.1:5443/hpc/pydeb:latest"


def root_env(cache: Path, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env["NSDF_HPC_CACHE"] = str(cache)
    env.update(extra)
    return env


def nsdf_root(args: List[str], cache: Path, cwd: Optional[str] = None, timeout: float = 600,
              **extra: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "nsdf_hpc", *args], env=root_env(cache, **extra),
                          cwd=cwd or "/tmp", capture_output=True, text=True, timeout=timeout)


def root_cache() -> Path:
    """The cache the root tests share (images pulled once for the whole run)."""
    d = Path("/var/tmp/nsdf-hpc-test-cache") / str(os.getuid())
    d.mkdir(parents=True, exist_ok=True)
    return d


def user_cache(as_user: object) -> Path:
    pw = as_user.pw  # type: ignore[attr-defined]
    d = Path("/var/tmp/nsdf-hpc-test-cache") / str(pw.pw_uid)
    d.mkdir(parents=True, exist_ok=True)
    os.chown(d, pw.pw_uid, pw.pw_gid)
    os.chown(d.parent, 0, 0)
    os.chmod(d.parent, 0o755)
    return d


def nsdf_user(as_user: object, args: List[str], cache: Path, cwd: Optional[str] = None,
              timeout: float = 600, **extra: str) -> "subprocess.CompletedProcess[str]":
    return as_user.run(["nsdf-run", *args], cwd=cwd, timeout=timeout,  # type: ignore[attr-defined]
                       NSDF_HPC_CACHE=str(cache), **extra)
