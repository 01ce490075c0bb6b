"""A bad-input sweep (issue 12 item 7): bad inputs through the CLI (``python -m nsdf_hpc`` as a
subprocess) and the API. Each gives the documented exit code (README, nsdf_hpc/errors.py) and
one line naming what to fix; none prints a traceback or leaves partial state behind.

Damaged cache metadata is not the user's input: there the documented outcome is that the run
works (exit 0), the damaged file is named in one warning line, and the entry or tag record is
rebuilt. The cases that need the testbed (registry, Apptainer, the unprivileged user, a
mount for a full HOME) are marked; they fail when it is missing in CI (tests/conftest.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import nsdf_hpc
from nsdf_hpc.errors import SpecError

from .helpers import BUSYBOX, nsdf_user

pytestmark = [pytest.mark.integration]

HEX = "a" * 64


def _env(tmp: Path, **extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSDF_HPC_", "SLURM_"))}
    env.update(HOME=str(tmp / "home"), NSDF_HPC_CACHE=str(tmp / "cache"),
               NSDF_HPC_SITE_CONFIG=str(tmp / "no-site.toml"), NSDF_HPC_SLURM_DIR=str(tmp / "jobs"),
               NSDF_HPC_SLURM_ACCOUNTING="none", XDG_CONFIG_HOME=str(tmp / "xdg"))
    env.update(extra)
    return env


def _nsdf(args: List[str], env: Dict[str, str], cwd: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "nsdf_hpc", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _snapshot(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _one_line(stderr: str) -> str:
    """The error line: nsdf-run's own (one line), or click's usage error (its last line)."""
    assert "Traceback" not in stderr, stderr
    lines = [x for x in stderr.splitlines() if x.strip()]
    assert lines, "no message"
    if lines[0].startswith("Usage:"):
        assert lines[-1].startswith("Error: "), stderr
        return lines[-1]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nsdf-run: error: "), stderr
    return lines[0]


# (id, argv, config file text or None, exit code, what the message names)
CLI_CASES = [
    ("ref-uppercase", ["run", "Ubuntu:22.04", "--", "true"], None, 2, "repository names are lowercase"),
    ("ref-unicode-tag", ["run", "busybox:vé", "--", "true"], None, 2, "bad tag 'vé'"),
    ("ref-space", ["run", "a b", "--", "true"], None, 2, "whitespace"),
    ("ref-transport", ["pull", "http://ghcr.io/x"], None, 2, "unsupported transport"),
    ("ref-uppercase-path", ["pull", "docker://ghcr.io/UPPER/x"], None, 2, "lowercase"),
    ("ref-bare-id", ["run", f"sha256:{HEX}", "--", "true"], None, 2, "bare image id"),
    ("ref-bad-registry", ["pull", "bad-.io/x"], None, 2, "invalid image reference"),
    ("digest-short", ["run", "busybox@sha256:abc", "--", "true"], None, 2, "expected 'sha256:<64 hex digits>'"),
    ("digest-upper", ["run", "busybox@sha256:" + "A" * 64, "--", "true"], None, 2, "64 lowercase hex"),
    ("digest-no-alg", ["pull", "busybox@" + HEX], None, 2, "invalid digest"),
    ("archive-no-path", ["run", "oci-archive:", "--", "true"], None, 2, "needs a path"),
    ("archive-missing", ["run", "docker-archive:/nonexistent/x.tar", "--", "true"], None, 125,
     "/nonexistent/x.tar"),
    ("bind-missing", ["run", "-B", "/nonexistent/x:/x", BUSYBOX, "--", "true"], None, 2,
     "bind source /nonexistent/x does not exist"),
    ("bind-relative-missing", ["run", "-B", "rel/dir:/x", BUSYBOX, "--", "true"], None, 2,
     "rel/dir does not exist"),
    ("bind-relative-target", ["run", "-B", "/tmp:relative", BUSYBOX, "--", "true"], None, 2,
     "destination 'relative' must be absolute"),
    ("bind-mode", ["run", "-B", "/tmp:/x:rx", BUSYBOX, "--", "true"], None, 2, "'ro' or 'rw'"),
    ("bind-empty-source", ["run", "-B", ":/x", BUSYBOX, "--", "true"], None, 2, "empty source"),
    ("env-empty-name", ["run", "-e", "=x", BUSYBOX, "--", "true"], None, 2, "invalid environment variable name ''"),
    ("env-no-value", ["run", "-e", "NOVALUE", BUSYBOX, "--", "true"], None, 2, "expected NAME=VALUE"),
    ("env-bad-name", ["run", "-e", "A-B=x", BUSYBOX, "--", "true"], None, 2, "invalid environment variable name 'A-B'"),
    ("workdir-relative", ["run", "-w", "rel", BUSYBOX, "--", "true"], None, 2, "must be an absolute path"),
    ("runtime-unknown", ["run", "--runtime", "dockr", BUSYBOX, "--", "true"], None, 2, "unknown runtime 'dockr'"),
    ("array-huge", ["submit", "--dry-run", "--array", "0-99999999999", BUSYBOX, "--", "true"], None, 2,
     "more than 4000001 tasks"),
    ("array-empty", ["submit", "--dry-run", "--array", "5-1", BUSYBOX, "--", "true"], None, 2, "empty range '5-1'"),
    ("array-throttle-0", ["submit", "--dry-run", "--array", "0-9%0", BUSYBOX, "--", "true"], None, 2, "throttle"),
    ("array-throttle-x", ["submit", "--dry-run", "--array", "0-9%x", BUSYBOX, "--", "true"], None, 2,
     "the limit after '%' must be a number"),
    ("array-duplicate", ["submit", "--dry-run", "--array", "1,1", BUSYBOX, "--", "true"], None, 2, "unique"),
    ("time-absurd", ["submit", "--dry-run", "--time", "99:99:99:99", BUSYBOX, "--", "true"], None, 2,
     "invalid time '99:99:99:99'"),
    ("time-negative", ["submit", "--dry-run", "--time", "-5", BUSYBOX, "--", "true"], None, 2, "invalid time '-5'"),
    ("nodes-zero", ["submit", "--dry-run", "--nodes", "0", BUSYBOX, "--", "true"], None, 2, "nodes"),
    ("mem-unit", ["submit", "--dry-run", "--mem", "4Q", BUSYBOX, "--", "true"], None, 2, "invalid memory '4Q'"),
    ("sbatch-export", ["submit", "--dry-run", "--sbatch=--export=ALL", BUSYBOX, "--", "true"], None, 2,
     "cannot be overridden"),
    ("jobid", ["status", "abc"], None, 2, "invalid job id 'abc'"),
    ("size-negative", ["prune", "--max-size", "-1G"], None, 2, "invalid size '-1G'"),
    ("age-garbage", ["prune", "--older-than", "xyz"], None, 2, "invalid age 'xyz'"),
    ("config-unknown-key", ["images"], 'runtme = "podman"\n', 2, "unknown setting(s) runtme"),
    ("config-odd-key", ["images"], '"a\\nb" = 1\n', 2, "unknown setting(s) 'a\\nb'"),
    ("config-not-utf8", ["images"], b'runtime = "\xff"\n', 2, "is not UTF-8 text"),
    ("config-not-toml", ["images"], "[env\n", 2, "is not valid TOML"),
    ("config-bad-value", ["images"], 'probe_timeout = "soon"\n', 2, "invalid setting probe_timeout"),
    ("config-slurm-key", ["submit", "--dry-run", BUSYBOX, "--", "true"], "[slurm]\npoll_kap = 3\n", 2,
     "unknown [slurm] setting(s) poll_kap (in "),
    ("config-missing", ["images"], "<missing>", 2, "does not exist"),
    ("config-directory", ["images"], "<directory>", 2, "config.toml is not a file"),
]


@pytest.mark.registry
@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_input_through_the_cli(case: tuple, tmp_path: Path) -> None:
    _id, args, config, code, message = case
    extra: Dict[str, str] = {}
    if config is not None:
        path = tmp_path / "config.toml"
        if config == "<directory>":
            path.mkdir()
        elif config != "<missing>":
            path.write_bytes(config if isinstance(config, bytes) else config.encode())
        extra["NSDF_HPC_CONFIG"] = str(path)
    work = tmp_path / "work"
    work.mkdir()
    env = _env(tmp_path, **extra)
    before = {d: _snapshot(tmp_path / d) for d in ("cache", "jobs", "home")}
    res = _nsdf(args, env, str(work))
    line = _one_line(res.stderr)
    assert res.returncode == code, (res.returncode, res.stderr)
    assert message in line, line
    # nothing half-done: no cache entry, no temp dir, no job directory, nothing in the cwd
    for d, snap in before.items():
        after = [p for p in _snapshot(tmp_path / d) if not p.startswith((".cache", ".apptainer"))]
        assert not [p for p in after if p not in snap and "/tmp/" in f"/{p}/"], after
    assert not (tmp_path / "jobs").exists() or not any(
        p.name != "by-id" for p in (tmp_path / "jobs").iterdir())
    assert not list(work.iterdir())
    entries = tmp_path / "cache" / "entries"
    assert not entries.exists() or not any(entries.rglob("entry.json"))


# ----------------------------------------------------------------------------- the API
def _client(tmp_path: Path) -> nsdf_hpc.Client:
    return nsdf_hpc.Client(env=_env(tmp_path))


API_CASES = [
    ("env-name-with-=", dict(env={"A=B": "x"}), "invalid environment variable name 'A=B'"),
    ("env-value-with-NUL", dict(env={"A": "x\0y"}), "NUL"),
    ("env-name-with-NUL", dict(env={"A\0": "x"}), "invalid environment variable name"),
    ("cli-env-with-NUL", dict(env=["A=x\0y"]), "NUL byte"),
    ("command-with-NUL", dict(command=["echo", "a\0b"]), "NUL"),
    ("command-lone-surrogate", dict(command=["echo", "\ud800"]), "lone surrogate"),
    ("env-lone-surrogate", dict(env={"A": "\udfff"}), "lone surrogate"),
    ("bind-lone-surrogate", dict(binds=["/tmp/\ud800:/x"]), "lone surrogate"),
    ("command-empty", dict(command=[]), "the command is empty"),
    ("bind-with-NUL", dict(binds=["/tmp/a\0b:/x"]), "NUL"),
    ("bind-relative-target", dict(binds=["/tmp:x"]), "must be absolute"),
    ("workdir-relative", dict(workdir="x"), "absolute path"),
    ("image-digest", dict(image="busybox@sha256:xyz"), "invalid digest"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_input_through_the_api(case: tuple, tmp_path: Path) -> None:
    _id, kw, message = case
    kw = dict(kw)
    image = kw.pop("image", BUSYBOX)
    command = kw.pop("command", ["true"])
    client = _client(tmp_path)
    with pytest.raises(SpecError) as err:
        client.spec(image, command, **kw)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(SpecError):      # the same input on the submit path
        client.submit(image, command, dry_run=True, **kw)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "jobs").exists()


@pytest.mark.parametrize("kw,message", [
    (dict(array="0-99999999999"), "more than 4000001 tasks"),
    (dict(array="0-3%0"), "throttle"),
    (dict(time="-1"), "invalid time"),
    (dict(nodes=-2), "nodes"),
    (dict(dependencies="afterok:abc"), "invalid job id 'abc'"),
    (dict(extra_directives=("--export=ALL",)), "cannot be overridden"),
    (dict(bogus=1), "unknown job option(s): bogus"),
], ids=["array", "throttle", "time", "nodes", "dependency", "export", "unknown-option"])
def test_bad_job_options_through_the_api(kw: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        _client(tmp_path).submit(BUSYBOX, ["true"], dry_run=True, **kw)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (tmp_path / "jobs").exists()


# ----------------------------------------------------------------------------- damaged cache
@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One apptainer entry of the testbed's busybox, pulled once for the module."""
    tmp = tmp_path_factory.mktemp("warm")
    res = _nsdf(["pull", "--runtime", "apptainer", BUSYBOX], _env(tmp), "/tmp")
    assert res.returncode == 0, res.stderr
    return tmp


def _copy_cache(warm: Path, tmp_path: Path) -> Path:
    shutil.copytree(warm / "cache", tmp_path / "cache", symlinks=True)
    return next((tmp_path / "cache" / "entries" / "apptainer").iterdir())


ENTRY_DAMAGE = {"garbage": "garbage\n", "list": "[1, 2]\n",
                "wrong-types": json.dumps({"digest": 5, "size": "x", "format": 1, "files": []}),
                "truncated": '{"format": 1, "runt'}


@pytest.mark.registry
@pytest.mark.apptainer
@pytest.mark.parametrize("damage", list(ENTRY_DAMAGE), ids=list(ENTRY_DAMAGE))
def test_damaged_entry_json_is_rebuilt(damage: str, warm: Path, tmp_path: Path) -> None:
    entry = _copy_cache(warm, tmp_path)
    (entry / "entry.json").write_text(ENTRY_DAMAGE[damage])
    env = _env(tmp_path)
    for args in (["images"], ["images", "--json"], ["prune", "--max-size", "0", "--dry-run"]):
        res = _nsdf(args, env, "/tmp")
        assert res.returncode == 0 and "Traceback" not in res.stderr, (args, res.stderr)
    res = _nsdf(["run", "--runtime", "apptainer", "--no-bind-cwd", BUSYBOX, "--", "echo", "ok"], env, "/tmp")
    assert res.returncode == 0 and res.stdout == "ok\n", res.stderr
    assert "Traceback" not in res.stderr and "unreadable cache entry" in res.stderr, res.stderr
    data = json.loads((entry / "entry.json").read_text())     # rebuilt, well formed
    assert data["digest"].startswith("sha256:") and isinstance(data["size"], int)
    assert not list((tmp_path / "cache" / "tmp").iterdir())


REF_DAMAGE = {"garbage": "garbage", "bad-digest": '{"digest": "sha256:zz", "resolved": 1e300}',
              "bad-time": '{"digest": "sha256:' + HEX + '", "resolved": "soon"}',
              "digest-list": '{"digest": ["x"], "resolved": 1e300}'}


@pytest.mark.registry
@pytest.mark.apptainer
@pytest.mark.parametrize("damage", list(REF_DAMAGE), ids=list(REF_DAMAGE))
def test_damaged_tag_record_is_resolved_again(damage: str, warm: Path, tmp_path: Path) -> None:
    _copy_cache(warm, tmp_path)
    ref = next((tmp_path / "cache" / "refs").glob("*busybox*.json"))
    good = json.loads(ref.read_text())["digest"]
    ref.write_text(REF_DAMAGE[damage])
    res = _nsdf(["run", "--runtime", "apptainer", "--no-bind-cwd", BUSYBOX, "--", "echo", "ok"],
                _env(tmp_path), "/tmp")
    assert res.returncode == 0 and res.stdout == "ok\n", res.stderr
    assert "Traceback" not in res.stderr
    assert json.loads(ref.read_text())["digest"] == good       # resolved again, recorded again


# ----------------------------------------------------------------------------- another user
@pytest.mark.registry
@pytest.mark.unprivileged
def test_cache_owned_by_another_user(as_user: object) -> None:
    cache = Path(tempfile.mkdtemp(prefix="wt-bad-input-rootcache-", dir="/var/tmp"))
    os.chmod(cache, 0o755)                  # root's, readable, not writable by the user
    try:
        pull = nsdf_user(as_user, ["pull", "--runtime", "apptainer", BUSYBOX], cache)
        assert pull.returncode == 1, pull.stderr
        line = _one_line(pull.stderr)
        assert f"cannot create the image cache at {cache}" in line and "NSDF_HPC_CACHE" in line
        run = nsdf_user(as_user, ["run", "--runtime", "apptainer", BUSYBOX, "--", "true"], cache)
        assert run.returncode == 125 and "NSDF_HPC_CACHE" in _one_line(run.stderr)
        assert not list(cache.iterdir())
    finally:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.unprivileged
def test_unreadable_config(as_user: object) -> None:
    fd, name = tempfile.mkstemp(prefix="wt-bad-input-", suffix=".toml", dir="/var/tmp")
    os.write(fd, b'runtime = "apptainer"\n')
    os.close(fd)
    os.chmod(name, 0o600)                   # root's, not readable by the user
    try:
        res = nsdf_user(as_user, ["images"], Path("/var/tmp/nonexistent-cache"), NSDF_HPC_CONFIG=name)
        assert res.returncode == 2
        assert f"cannot read config file {name}: Permission denied" in _one_line(res.stderr)
    finally:
        os.unlink(name)


# ----------------------------------------------------------------------------- a full HOME
@pytest.fixture
def full_home() -> Iterator[Path]:
    """A 256 KiB tmpfs, filled: the user's HOME on a full filesystem."""
    if os.getuid() != 0:
        pytest.fail("a full HOME is made with a tmpfs mount, which needs root (CI runs as root)")
    d = Path(tempfile.mkdtemp(prefix="nsdf-full-home-", dir="/var/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(d)], check=True)
    try:
        # dd stops with "No space left on device": the filesystem is full
        subprocess.run(["dd", "if=/dev/zero", f"of={d / 'fill'}", "bs=4k"], capture_output=True)
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.registry
@pytest.mark.apptainer
def test_full_home(full_home: Path, warm: Path, tmp_path: Path) -> None:
    base = _env(tmp_path, HOME=str(full_home))
    # the default cache is in HOME: the preflight names NSDF_HPC_CACHE
    env = {k: v for k, v in base.items() if k not in ("NSDF_HPC_CACHE", "XDG_CONFIG_HOME")}
    res = _nsdf(["pull", "--runtime", "apptainer", BUSYBOX], env, "/tmp")
    assert res.returncode == 1 and "set NSDF_HPC_CACHE" in _one_line(res.stderr), res.stderr
    # a cache elsewhere: a run works although HOME is full (the detection cache is optional)
    _copy_cache(warm, tmp_path)
    env = {k: v for k, v in base.items() if k != "NSDF_HPC_SLURM_DIR"}
    res = _nsdf(["run", "--runtime", "apptainer", "--no-bind-cwd", BUSYBOX, "--", "echo", "ok"], env, "/tmp")
    assert res.returncode == 0 and res.stdout == "ok\n", res.stderr
    # the default Slurm work directory is in HOME: one line, no half-written job directory
    res = _nsdf(["submit", "--runtime", "apptainer", "--no-bind-cwd", BUSYBOX, "--", "true"], env, "/tmp")
    assert res.returncode == 2 and "cannot write the job directory" in _one_line(res.stderr), res.stderr
    jobs = full_home / ".nsdf-hpc" / "jobs"
    assert not jobs.exists() or [p.name for p in jobs.iterdir()] in ([], ["by-id"])
    # (an empty lock file is the cache's design: locks are kept and reused, never half-written)
    leftovers = [p for p in full_home.rglob("*") if p.is_file() and p.name != "fill"
                 and not (p.parent.name == "locks" and p.stat().st_size == 0)]
    assert not leftovers, leftovers
