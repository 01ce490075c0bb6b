"""The runtime layer against the four real runtimes, as root and as the unprivileged user.

The same run spec must give the same observable result everywhere: stdout, exit code, the
visible environment (explicit values, the host allowlist, never the denylist), mounted files,
the working directory; and hostile strings must arrive byte for byte.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

from .helpers import BUSYBOX, RUNTIME_PARAMS, RUNTIMES, nsdf_root, nsdf_user, root_env, user_cache

pytestmark = [pytest.mark.integration, pytest.mark.registry]

HOSTILE = [
    "plain", "with space", "sq'uote", 'dq"uote', "$(touch /tmp/nsdf-pwned)", "`touch /tmp/nsdf-pwned`",
    "semi;colon", "a=b=c", "com,ma", "new\nline", "tab\there", "ünïcødé ✓", "$HOME", "back\\slash",
    "'wrapped'", "", "-e", "--", "*",
]
HOSTILE_DIR_NAME = "sp ace 'q' \"dq\" $(x) `bt` ;=,ü\nnl"

PROBE = (
    'echo "cwd=$(pwd)"; echo "FOO=$FOO"; echo "ALLOWED=${SLURM_NSDF_PROBE-unset}"; '
    'echo "PYTHONPATH=${PYTHONPATH-unset}"; echo "VIRTUAL_ENV=${VIRTUAL_ENV-unset}"; '
    'echo "CONDA_PREFIX=${CONDA_PREFIX-unset}"; echo "NOTALLOWED=${NSDF_NOT_ALLOWED-unset}"; '
    'case "${LD_LIBRARY_PATH-}" in *leak-marker*) echo LDLP=leaked;; *) echo LDLP=clean;; esac; '
    'echo "ro=$(cat /mnt/ro/file)"; echo written > /mnt/rw/out && echo "rw=ok"; '
    'echo "home-file=$(cat ./here.txt)"; exit 7'
)
HOST_LEAKS = {
    "PYTHONPATH": "/leak/py", "VIRTUAL_ENV": "/leak/venv", "CONDA_PREFIX": "/leak/conda",
    "LD_LIBRARY_PATH": "/leak-marker/lib", "SLURM_NSDF_PROBE": "from-host", "NSDF_NOT_ALLOWED": "x",
}
EXPECTED_PROBE = None  # filled from the first runtime; all must agree


def _setup_dirs(base: Path, uid: int, gid: int) -> Dict[str, Path]:
    ro = base / "ro"
    rw = base / "rw"
    work = base / "work"
    for d in (ro, rw, work):
        d.mkdir(parents=True, exist_ok=True)
    (ro / "file").write_text("read-only data\n")
    (work / "here.txt").write_text("in the current directory\n")
    for p in (base, ro, rw, work, ro / "file", work / "here.txt"):
        os.chown(p, uid, gid)
    return {"ro": ro, "rw": rw, "work": work}


def _probe_args(runtime: str, dirs: Dict[str, Path]) -> List[str]:
    return ["run", "--runtime", runtime, "--env", "FOO=bar baz", "--bind", f"{dirs['ro']}:/mnt/ro:ro",
            "--bind", f"{dirs['rw']}:/mnt/rw", BUSYBOX, "--", "sh", "-c", PROBE]


def _expected(cwd: Path) -> List[str]:
    return [f"cwd={cwd}", "FOO=bar baz", "ALLOWED=from-host", "PYTHONPATH=unset", "VIRTUAL_ENV=unset",
            "CONDA_PREFIX=unset", "NOTALLOWED=unset", "LDLP=clean", "ro=read-only data", "rw=ok",
            "home-file=in the current directory"]


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_same_result_as_root(runtime: str, shared_cache: Path, tmp_path: Path) -> None:
    base = Path(tmp_path)
    os.chmod(base, 0o755)
    dirs = _setup_dirs(base, 0, 0)
    r = nsdf_root(_probe_args(runtime, dirs), shared_cache, cwd=str(dirs["work"]), **HOST_LEAKS)
    assert r.returncode == 7, r.stderr
    assert r.stdout.splitlines() == _expected(dirs["work"]), r.stderr
    assert (dirs["rw"] / "out").read_text() == "written\n"


@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_same_result_as_unprivileged_user(runtime: str, as_user, user_dir: Path) -> None:
    dirs = _setup_dirs(user_dir, as_user.pw.pw_uid, as_user.pw.pw_gid)
    r = nsdf_user(as_user, _probe_args(runtime, dirs), user_cache(as_user), cwd=str(dirs["work"]),
                  **HOST_LEAKS)
    assert r.returncode == 7, r.stderr
    assert r.stdout.splitlines() == _expected(dirs["work"]), r.stderr
    out = dirs["rw"] / "out"
    assert out.read_text() == "written\n"
    assert out.stat().st_uid == as_user.pw.pw_uid, "files written to binds belong to the caller"


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_hostile_argv_env_and_bind_paths_arrive_byte_for_byte(runtime: str, shared_cache: Path,
                                                              tmp_path: Path) -> None:
    marker = Path("/tmp/nsdf-pwned")
    marker.unlink(missing_ok=True)
    hostile_dir = tmp_path / HOSTILE_DIR_NAME
    hostile_dir.mkdir()
    (hostile_dir / "f").write_text("inside the hostile dir\n")
    os.chmod(tmp_path, 0o755)
    envs: List[str] = []
    for i, value in enumerate(HOSTILE):
        envs += ["--env", f"H{i}={value}"]
    # argv: printf receives every hostile string as its own argument
    r = nsdf_root(["run", "--runtime", runtime, *envs, BUSYBOX, "--", "printf", "[%s]", *HOSTILE],
                  shared_cache, cwd=str(hostile_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"[{h}]" for h in HOSTILE)
    # env values: read back in the container
    script = "printf '[%s]' " + " ".join(f'"$H{i}"' for i in range(len(HOSTILE))) + "; pwd; cat f"
    r = nsdf_root(["run", "--runtime", runtime, *envs, BUSYBOX, "--", "sh", "-c", script],
                  shared_cache, cwd=str(hostile_dir))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"[{h}]" for h in HOSTILE) + f"{hostile_dir}\ninside the hostile dir\n"
    # an explicit bind of the hostile path to another target
    r = nsdf_root(["run", "--runtime", runtime, "--no-bind-cwd", "--bind", f"{hostile_dir}:/mnt/h",
                   BUSYBOX, "--", "cat", "/mnt/h/f"], shared_cache)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "inside the hostile dir\n"
    assert not marker.exists(), "a hostile string was executed"


@pytest.mark.parametrize("runtime", [p for p in RUNTIME_PARAMS if p.values[0] in ("apptainer", "podman", "podman-hpc")])
def test_read_only_binds_are_enforced(runtime: str, shared_cache: Path, tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    r = nsdf_root(["run", "--runtime", runtime, "--bind", f"{tmp_path}:/mnt/ro:ro", BUSYBOX, "--",
                   "sh", "-c", "touch /mnt/ro/x"], shared_cache)
    assert r.returncode != 0
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_workdir_and_no_bind_cwd(runtime: str, shared_cache: Path) -> None:
    import tempfile
    # outside /tmp, /var/tmp and $HOME, which Apptainer binds by default
    tmp_path = Path(tempfile.mkdtemp(prefix="nsdf-cwd-", dir="/srv"))
    os.chmod(tmp_path, 0o755)
    r = nsdf_root(["run", "--runtime", runtime, "--no-bind-cwd", "--workdir", "/etc", BUSYBOX, "--",
                   "sh", "-c", f"pwd; test -e {tmp_path} && echo bound || echo not-bound"],
                  shared_cache, cwd=str(tmp_path))
    shutil.rmtree(tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["/etc", "not-bound"]


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_python_api_returns_exit_code_and_output(runtime: str, shared_cache: Path) -> None:
    import nsdf_hpc
    client = nsdf_hpc.Client(env={**os.environ, "NSDF_HPC_CACHE": str(shared_cache)})
    result = client.run(BUSYBOX, ["sh", "-c", "echo out; echo err >&2; exit 3"], runtime=runtime)
    assert (result.returncode, result.stdout, result.runtime) == (3, "out\n", runtime)
    assert "err" in result.stderr
    assert result.image is not None and result.image.digest and result.image.digest.startswith("sha256:")


def test_failures_before_the_command_runs_exit_125(shared_cache: Path) -> None:
    r = nsdf_root(["run", "--runtime", "udocker", "127.0.0.1:5443/hpc/does-not-exist:1", "--", "true"], shared_cache)
    assert r.returncode == 125
    assert "hpc/does-not-exist:1 not found" in r.stderr
    r = nsdf_root(["run", "--runtime", "udocker", "127.0.0.1:5999/hpc/busybox:1", "--", "true"], shared_cache)
    assert r.returncode == 125
    assert "cannot reach registry 127.0.0.1:5999" in r.stderr
    r = nsdf_root(["run", "--runtime", "shifter", BUSYBOX, "--", "true"], shared_cache)
    assert r.returncode == 125
    assert "runtime 'shifter' was requested (argument) but cannot be used" in r.stderr
    assert "apptainer 1.4" in r.stderr   # lists what was found
    r = nsdf_root(["run", "--bind", "relative:dst", BUSYBOX, "--", "true"], shared_cache)
    assert r.returncode == 2 and "must be absolute" in r.stderr
    r = nsdf_root(["run", "--env", "1BAD=x", BUSYBOX, "--", "true"], shared_cache)
    assert r.returncode == 2 and "invalid environment variable name" in r.stderr


def test_runtimes_command_explains_the_choice(shared_cache: Path) -> None:
    r = nsdf_root(["runtimes", "--json", "--refresh"], shared_cache)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    found = {i["name"]: i for i in data["runtimes"] if i["found"]}
    assert set(RUNTIMES) <= set(found)
    assert found["apptainer"]["flavour"] == "apptainer" and found["apptainer"]["version"].startswith("1.4")
    assert data["chosen"] == "apptainer" and data["source"] == "auto"
    assert data["rejected"]["udocker"].startswith("usable, but apptainer comes first")
    assert "not found" in data["rejected"]["shifter"]
    r = nsdf_root(["runtimes"], shared_cache, NSDF_HPC_RUNTIME="podman")
    assert "chosen: podman (set by env:NSDF_HPC_RUNTIME)" in r.stdout


def test_runtimes_kept_answer_is_what_the_click_command_prints(shared_cache: Path, tmp_path: Path) -> None:
    """`nsdf-run runtimes` keeps its answer (``_runtimes_answer.py``): the next call prints it
    without importing pydantic, the same as the click command on the real runtimes; a real
    change (a runtime that appears on PATH, then is gone) is seen at once."""
    extra = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}

    def rt(*args: str, full: bool = False, **more: str) -> "tuple[str, bool]":
        env = root_env(shared_cache, **extra, **more, **({"NSDF_HPC_NO_FAST_PATH": "1"} if full else {}))
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nsdf_hpc", "runtimes", *args], env=env,
                           cwd="/tmp", capture_output=True, text=True, timeout=120)
        errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
        assert r.returncode == 0 and not errors, r
        return r.stdout, any(line.startswith("import time:") and line.split("|")[-1].strip() == "pydantic"
                             for line in r.stderr.splitlines())

    for args in ([], ["--json"]):
        first = rt(*args)
        assert first[1]                                  # nothing kept yet: the click command
        kept, full = rt(*args), rt(*args, full=True)
        assert not kept[1] and kept[0] == full[0] == first[0]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    path = f"{bindir}:{os.environ['PATH']}"
    (bindir / "singularity").symlink_to(shutil.which("apptainer") or "apptainer")
    appeared = rt(PATH=path)
    assert appeared[1] and "is Apptainer" in appeared[0]
    assert rt(PATH=path) == (appeared[0], False)
    (bindir / "singularity").unlink()
    gone = rt(PATH=path)
    assert gone[1] and "is Apptainer" not in gone[0] and gone[0] == rt(PATH=path, full=True)[0]


@pytest.mark.unprivileged
def test_runtimes_kept_answer_as_a_user(as_user) -> None:  # type: ignore[no-untyped-def]
    """The unprivileged user's own kept answer (its host facts differ from root's)."""
    first = as_user.run(["nsdf-run", "runtimes", "--refresh"])
    again = [as_user.run(["nsdf-run", "runtimes"]) for _ in range(2)]
    full = as_user.run(["nsdf-run", "runtimes"], NSDF_HPC_NO_FAST_PATH="1")
    assert first.returncode == 0 and all(r.returncode == 0 for r in again), (first, again)
    assert again[0].stdout == again[1].stdout == full.stdout == first.stdout


@pytest.mark.udocker
def test_a_venvs_nsdf_run_uses_the_udocker_installed_beside_it(user_venv: Path, shared_cache: Path,
                                                                tmp_path: Path) -> None:
    """Issue 9 part 3: a venv's nsdf-run, not activated, with another udocker earlier on PATH."""
    other = shutil.which("udocker")
    assert other and Path(other).parent != user_venv / "bin"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env.update(NSDF_HPC_CACHE=str(shared_cache), PATH=f"{Path(other).parent}:/usr/bin:/bin",
               XDG_CACHE_HOME=str(tmp_path))
    r = subprocess.run([str(user_venv / "bin" / "nsdf-run"), "runtimes", "--json", "--refresh"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ud = {i["name"]: i for i in json.loads(r.stdout)["runtimes"]}["udocker"]
    assert ud["found"] and ud["path"] == str(user_venv / "bin" / "udocker"), ud
    assert any("installed with this Python" in n and other in n for n in ud["notes"]), ud["notes"]


def test_singularity_symlink_is_reported_as_apptainer(shared_cache: Path, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "singularity").symlink_to(shutil.which("apptainer"))
    env_path = f"{bindir}:/usr/bin:/bin"
    r = nsdf_root(["runtimes", "--json", "--refresh"], shared_cache, PATH=env_path)
    data = json.loads(r.stdout)
    by = {i["name"]: i for i in data["runtimes"]}
    assert by["apptainer"]["found"] and by["apptainer"]["path"] == str(bindir / "singularity")
    assert not by["singularity"]["found"]
    assert any("is Apptainer" in n for n in by["singularity"]["notes"])


@pytest.mark.unprivileged
def test_doctor_runs_and_reports(as_user) -> None:
    r = as_user.run(["nsdf-run", "doctor"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "runtime: apptainer" in r.stdout
    assert "unprivileged user namespaces are available" in r.stdout


def _pinned(ref: str) -> str:
    """``ref`` by its digest. A record of a tag expires with the tag's resolution (tag_ttl, 5
    minutes), which may fall between two calls of a test and make the later one plan again,
    rightly: a test that counts replays names the image by digest."""
    digest = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                             f"docker://{ref}"], capture_output=True, text=True, check=True).stdout.strip()
    return f"{ref.rsplit(':', 1)[0]}@{digest}"


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_launch_record_fast_path_matches_the_planned_path(runtime: str, shared_cache: Path,
                                                         tmp_path: Path) -> None:
    """The second identical `nsdf-run run` execs from a launch record: same output, exit code
    and env contract, with the per-call allowlisted variables (SLURM_PROCID) rebuilt."""
    os.chmod(tmp_path, 0o755)
    xdg = tmp_path / "xdg"
    args = ["run", "--runtime", runtime, "--env", f"H={HOSTILE[4]}{HOSTILE[9]}", _pinned(BUSYBOX), "--", "sh", "-c",
            'printf "[%s][%s][%s][%s]" "$H" "$SLURM_PROCID" "${PYTHONPATH-unset}" "$(pwd)"; exit 5']
    outs = []
    stamps = []
    # NSDF_HPC_CACHE is set: the records live in the cache, beside other tests' records
    launch = shared_cache / "launch"
    before = set(launch.glob("*.rec"))
    for procid, fast in (("0", "1"), ("0", ""), ("1", ""), ("2", "")):
        extra = {"XDG_CACHE_HOME": str(xdg), "SLURM_PROCID": procid, "PYTHONPATH": "/leak"}
        if fast:
            extra["NSDF_HPC_NO_FAST_PATH"] = "1"
        r = nsdf_root(args, shared_cache, cwd=str(tmp_path), **extra)
        outs.append((r.returncode, r.stdout))
        stamps.append([p.stat().st_mtime_ns for p in set(launch.glob("*.rec")) - before])
    records = set(launch.glob("*.rec")) - before
    assert len(records) == 1, "the planned run without NSDF_HPC_NO_FAST_PATH wrote one record"
    assert not (xdg / "nsdf-hpc" / "launch").exists(), "records follow NSDF_HPC_CACHE (issue 14.17)"
    assert stamps[0] == [] and stamps[1] == stamps[2] == stamps[3], "later runs used the record as is"
    want = [(5, f"[{HOSTILE[4]}{HOSTILE[9]}][{p}][unset][{tmp_path}]") for p in ("0", "0", "1", "2")]
    assert outs == want
    # another command after the same arguments reuses the record (issue 11 goal 1): no planning,
    # no new record, the new command's own output and exit code, hostile words intact
    other = [*args[:args.index("--") + 1], "sh", "-c", 'printf "<%s><%s>" "$H" "$1"; exit 6', "sh", HOSTILE[3]]
    r = nsdf_root(other, shared_cache, cwd=str(tmp_path), XDG_CACHE_HOME=str(xdg), SLURM_PROCID="3",
                  PYTHONPATH="/leak")
    assert (r.returncode, r.stdout) == (6, f"<{HOSTILE[4]}{HOSTILE[9]}><{HOSTILE[3]}>"), r.stderr
    assert set(launch.glob("*.rec")) - before == records
    assert [p.stat().st_mtime_ns for p in records] == stamps[3], "the record was reused, not rewritten"
    # and any --env values of the same variables (issue 11 goal 1). The value above has a
    # newline, so its record serves that value only; a plain value plans once and records a
    # plan that takes any value but one with a control character (or a quote, where a runtime
    # word carries it), which plans again; the output is always the value given
    def with_h(value: str) -> subprocess.CompletedProcess:
        r = nsdf_root([*args[:3], "--env", f"H={value}", *args[5:]], shared_cache, cwd=str(tmp_path),
                      XDG_CACHE_HOME=str(xdg), SLURM_PROCID="4", PYTHONPATH="/leak")
        assert (r.returncode, r.stdout) == (5, f"[{value}][4][unset][{tmp_path}]"), r.stderr
        return r
    with_h("second value")
    any_value = set(launch.glob("*.rec")) - before - records
    assert len(any_value) == 1
    stamp = [p.stat().st_mtime_ns for p in any_value]
    for value in ("third ü", "", "a=b,c:d/e", HOSTILE[2] + HOSTILE[9]):
        with_h(value)
    assert [p.stat().st_mtime_ns for p in any_value] == stamp, "the record of any value was reused"


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_a_closed_pipe_ends_the_writer_quietly_planned_and_from_the_record(runtime: str, shared_cache: Path,
                                                                           tmp_path: Path) -> None:
    """`yes | head -n 1` in the container: yes ends by SIGPIPE, quietly, as in a shell. Python
    ignores SIGPIPE and SIGXFSZ, and the launch record's exec (and spawn) passed that on: from
    the record, Charliecloud ran every command with SIGPIPE ignored ("yes: Broken pipe")."""
    os.chmod(tmp_path, 0o755)
    args = ["run", "--runtime", runtime, _pinned(BUSYBOX), "--", "sh", "-c",
            "yes | head -n 1; grep SigIgn /proc/self/status"]
    launch = shared_cache / "launch"
    before = set(launch.glob("*.rec"))
    for fast in ("1", "", ""):   # planned; planned, writing the record; from the record
        extra = {"NSDF_HPC_NO_FAST_PATH": "1"} if fast else {}
        r = nsdf_root(args, shared_cache, cwd=str(tmp_path), **extra)
        assert r.returncode == 0 and r.stdout.split()[:2] == ["y", "SigIgn:"], (r.stdout, r.stderr)
        assert "Broken pipe" not in r.stderr, r.stderr
        ignored = int(r.stdout.split()[2], 16)
        assert not ignored & (1 << 12) and not ignored & (1 << 24), hex(ignored)   # SIGPIPE, SIGXFSZ
    assert len(set(launch.glob("*.rec")) - before) == 1, "the last run used the record"


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_a_launch_record_serves_other_bind_directories(runtime: str, shared_cache: Path, tmp_path: Path) -> None:
    """`-B DIR:DST` with another directory or destination each call (a task's own input)
    replays the launch record (issue 11 goal 1) with the same results as planning, the
    command's writes landing in the directory given, and a read-only bind staying read-only
    where the runtime enforces it. Another mode (`:ro`) is another record. Charliecloud keeps
    the destination in its record (only other sources are served there)."""
    os.chmod(tmp_path, 0o755)
    dirs = []
    for i, name in enumerate(("d1", "d2", "d 3", "d4")):
        d = tmp_path / name
        d.mkdir()
        (d / "f").write_text(f"input {i}\n")
        dirs.append(d)
    launch = shared_cache / "launch"
    image = _pinned(BUSYBOX)

    def run(bind: str, target: str, planned: bool = False) -> subprocess.CompletedProcess:
        args = ["run", "--runtime", runtime, "-B", bind, image, "--", "sh", "-c",
                'cat "$1/f"; touch "$1/w" 2>/dev/null && echo wrote; exit 3', "sh", target]
        extra = {"NSDF_HPC_NO_FAST_PATH": "1"} if planned else {}
        return nsdf_root(args, shared_cache, cwd=str(tmp_path), **extra)

    def written() -> List[str]:
        found = sorted(d.name for d in dirs if (d / "w").exists())
        for d in dirs:
            (d / "w").unlink(missing_ok=True)
        return found

    for mode in ("", ":ro"):
        before = set(launch.glob("*.rec"))
        stamps = None
        # charliecloud plans the mount point of a destination its image lacks (a private copy):
        # its record keeps one the image has (busybox's /mnt) and serves other sources there
        targets = ("/mnt",) * 4 if runtime == "charliecloud" else ("/data", "/data", "/elsewhere/x", str(dirs[3]))
        for d, target in zip(dirs, targets):
            planned = run(f"{d}:{target}{mode}", target, planned=True)
            wrote_planned = written()
            r = run(f"{d}:{target}{mode}", target)
            assert (r.returncode, r.stdout) == (planned.returncode, planned.stdout) == (
                3, f"input {dirs.index(d)}\n" + ("wrote\n" if wrote_planned else "")), r.stderr
            assert written() == wrote_planned
            assert wrote_planned == ([] if mode and runtime in ("apptainer", "podman", "podman-hpc") else [d.name])
            new = set(launch.glob("*.rec")) - before
            assert len(new) == 1, f"{runtime}: one record for every directory ({mode or 'rw'}): {new}"
            now = [p.stat().st_mtime_ns for p in new]
            assert stamps is None or now == stamps, "the record was replayed, not planned again"
            stamps = now
