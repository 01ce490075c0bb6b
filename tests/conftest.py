"""Test configuration: markers, the testbed, and the rule that CI never skips it.

* Unit and contract tests need nothing and always run.
* Tests marked ``integration`` (and per tool: ``apptainer``, ``charliecloud``, ``podman``,
  ``udocker``, ``buildah``, ``registry``, ``slurm``) need the testbed (`tests/testbed/testbed.sh up`).
  When it is missing they are skipped with the reason on a developer's machine, and they
  FAIL when ``CI=true``: a CI run that silently skipped the real runtimes proves nothing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTBED_ENV = os.environ.get("NSDF_TESTBED_ENV", "/var/lib/hpc-runtimes/testbed.env")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
USER_VENV = Path(os.environ.get("NSDF_TEST_USER_VENV", "/var/tmp/nsdf-hpc-user-venv"))

TOOLS = {
    "apptainer": ["apptainer"],
    "charliecloud": ["ch-run", "ch-image", "ch-convert"],
    "podman": ["podman"],
    "podman_hpc": ["podman-hpc"],
    "buildah": ["buildah"],
    "udocker": ["udocker"],
    "slurm": ["sbatch", "squeue", "sacct", "scontrol", "scancel"],
}


def _read_testbed() -> Dict[str, str]:
    try:
        text = Path(TESTBED_ENV).read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


TESTBED = _read_testbed()


def _missing(marker_names: List[str]) -> Optional[str]:
    if not TESTBED:
        return f"testbed not up ({TESTBED_ENV} missing): run `sudo tests/testbed/testbed.sh up`"
    for name in marker_names:
        for tool in TOOLS.get(name, []):
            if shutil.which(tool) is None:
                return f"{tool} not on PATH (the testbed provisions it)"
    if "slurm" in marker_names:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
        if "UP" not in r.stdout:
            return "slurmctld is not answering (`scontrol ping`)"
    if "slurmrestd" in marker_names:
        url = TESTBED.get("NSDF_TESTBED_SLURMRESTD_URL")
        if not url:
            return (f"no slurmrestd in the testbed ({TESTBED_ENV} has no NSDF_TESTBED_SLURMRESTD_URL): "
                    "run `sudo tests/testbed/testbed.sh up`")
        import urllib.error
        import urllib.request
        try:
            urllib.request.urlopen(url + "/openapi/v3", timeout=5)
        except urllib.error.HTTPError:
            pass                    # 401 without a token: it answers
        except OSError as err:
            return f"slurmrestd does not answer at {url} ({err})"
    if "unprivileged" in marker_names and os.getuid() != 0:
        return "the unprivileged-user tests switch users with runuser and need root"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    names = [m.name for m in item.iter_markers()]
    needs = [n for n in names if n in ("integration", "registry", "unprivileged", "slurmrestd", *TOOLS)]
    if not needs:
        return
    why = _missing(needs)
    if why is None:
        return
    if IN_CI:
        pytest.fail(f"CI=true and the testbed is required: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def testbed() -> Dict[str, str]:
    return dict(TESTBED)


@pytest.fixture(scope="session")
def images_dir(testbed: Dict[str, str]) -> Path:
    return Path(testbed.get("NSDF_TESTBED_IMAGES", "/var/lib/hpc-runtimes/images"))


@pytest.fixture
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh image cache, readable by the unprivileged user too."""
    d = tmp_path_factory.mktemp("cache")
    os.chmod(d, 0o777)
    return d


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """One cache for the session (warm after the first pull), under /var/tmp."""
    d = Path("/var/tmp/nsdf-hpc-test-cache") / str(os.getuid())
    d.mkdir(parents=True, exist_ok=True)
    return d


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in sorted((ROOT / "nsdf_hpc").rglob("*.py")) + [ROOT / "setup.cfg"]:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def user_venv() -> Path:
    """nsdf-hpc installed (not editable) in a venv the unprivileged user can run.

    The checkout may live under /root (0700); the user gets a copy in USER_VENV, rebuilt
    only when the sources change.
    """
    stamp = USER_VENV / ".nsdf-source"
    want = _source_hash()
    if not (stamp.exists() and stamp.read_text() == want):
        if not (USER_VENV / "bin" / "python").exists():
            subprocess.run(["/usr/bin/python3", "-m", "venv", str(USER_VENV)], check=True)
        subprocess.run([str(USER_VENV / "bin" / "pip"), "install", "-q", "--no-warn-script-location",
                        "--force-reinstall", "--no-deps", str(ROOT)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([str(USER_VENV / "bin" / "pip"), "install", "-q", str(ROOT)], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["chmod", "-R", "a+rX", str(USER_VENV)], check=True)
        stamp.write_text(want)
    return USER_VENV


class UserShell:
    """Runs commands as the testbed's unprivileged user with a clean environment."""

    def __init__(self, user: str, venv: Path) -> None:
        import pwd
        self.user = user
        self.pw = pwd.getpwnam(user)
        self.venv = venv

    def env(self, **extra: str) -> Dict[str, str]:
        env = {"HOME": self.pw.pw_dir, "USER": self.user, "LOGNAME": self.user, "LANG": "C.UTF-8",
               "PATH": f"{self.venv}/bin:/usr/local/bin:/usr/bin:/bin"}
        for k in ("NSDF_HPC_SITE_CONFIG",):
            if k in os.environ:
                env[k] = os.environ[k]
        env.update(extra)
        return env

    def run(self, argv: List[str], *, cwd: Optional[str] = None, timeout: float = 600,
            **extra: str) -> "subprocess.CompletedProcess[str]":
        env = self.env(**extra)
        cmd = ["runuser", "-u", self.user, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()], *argv]
        return subprocess.run(cmd, cwd=cwd or "/tmp", capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def as_user(testbed: Dict[str, str], user_venv: Path) -> UserShell:
    return UserShell(testbed.get("NSDF_TESTBED_USER", "hpcuser"), user_venv)


@pytest.fixture
def user_dir(as_user: UserShell, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the unprivileged user owns (under /var/tmp, reachable by every user)."""
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="nsdf-user-", dir="/var/tmp"))
    os.chown(d, as_user.pw.pw_uid, as_user.pw.pw_gid)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nsdf_run_argv() -> List[str]:
    """How tests call the CLI: the interpreter running the tests, not whatever is on PATH."""
    return [sys.executable, "-m", "nsdf_hpc"]
