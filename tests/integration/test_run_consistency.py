"""Issue 14: the run path must behave the same on every real runtime (regression tests).

Each test names the item of issue 14 it covers; tests/integration/RUN_DEFECTS.md records which
fail today, on which runtime, and why. None is marked xfail: they fail until the fix lands.
"""
from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from .helpers import BUSYBOX, RUNTIME_PARAMS, nsdf_user, root_env, user_cache

pytestmark = [pytest.mark.integration, pytest.mark.registry]

REG = "127.0.0.1:5443"
NSDF = [sys.executable, "-m", "nsdf_hpc"]


#: issue 14 defects not fixed yet: these run for real and are expected to fail until their fix
#: lands (non-strict: a timing-dependent case may pass). The rest of this file must pass.
KNOWN_DEFECTS: Dict[str, str] = {}


#: timing-dependent cases seen failing under load (two test runs at once on 2 cores): podman
#: exits 127 ("no such exit code ... container in state running") when SIGTERM reaches it
#: while the container starts. (The start-up window itself is fixed, see
#: test_signal_while_podman_starts_*; podman's own 127 under load was not reproduced on the
#: idle testbed, so its prefix stays until it is.)
#: Apptainer is strict again: its hangs in CI (apptainer-INT at 0.05 s and at 0.4 s: nsdf-run
#: never exited) were Apptainer's starter dropping a signal while it starts, now held until
#: the command runs (test_apptainer_signal_while_it_starts_is_not_lost). The 0.05 s moment of
#: the others stays non-strict until as many trials show it clean.
FLAKY_PREFIXES = ("test_signal_to_nsdf_run_ends_the_container[podman-TERM-",
                  "test_signal_to_nsdf_run_ends_the_container[podman-INT-",
                  *(f"test_signal_to_nsdf_run_ends_the_container[{r}-{s}-early-0.05s]"
                    for r in ("charliecloud", "podman-hpc", "udocker") for s in ("TERM", "INT")))


@pytest.fixture(autouse=True)
def _known_defect(request: pytest.FixtureRequest) -> None:
    why = KNOWN_DEFECTS.get(request.node.name)
    if why is None and request.node.name.startswith(FLAKY_PREFIXES):
        why = "item 5: timing-dependent signal case (see FLAKY_PREFIXES for why)"
    if why:
        request.applymarker(pytest.mark.xfail(reason=f"issue 14 {why}", strict=False))


@pytest.fixture(scope="module")
def cache() -> Path:
    d = Path(tempfile.mkdtemp(prefix="nsdf-runfix-cache-", dir="/var/tmp"))
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def vtmp() -> Path:
    """A directory under /var/tmp (not /tmp: apptainer binds /tmp by itself)."""
    d = Path(tempfile.mkdtemp(prefix="nsdf-runfix-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def nsdf(args: List[str], cache: Path, cwd: str = "/", input: Optional[bytes] = None,
         timeout: float = 300, **extra: str) -> "subprocess.CompletedProcess[bytes]":
    return subprocess.run([*NSDF, *args], env=root_env(cache, **extra), cwd=cwd, input=input,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)


def out(r: "subprocess.CompletedProcess[bytes]") -> str:
    return r.stdout.decode(errors="replace")


def err(r: "subprocess.CompletedProcess[bytes]") -> str:
    return r.stderr.decode(errors="replace")


def warm(runtime: str, cache: Path, image: str = BUSYBOX) -> None:
    r = nsdf(["pull", "-r", runtime, image], cache)
    assert r.returncode == 0, err(r)


# ------------------------------------------------------------------ item 1: consistency probe
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_stdin_reaches_the_command(runtime: str, cache: Path) -> None:
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "cat"], cache, input=b"hello\n")
    assert (r.returncode, r.stdout) == (0, b"hello\n"), err(r)
    big = os.urandom(5 << 20)
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "cat"], cache, input=big)
    assert r.returncode == 0, err(r)
    assert (len(r.stdout), hashlib.sha256(r.stdout).hexdigest()) == (len(big), hashlib.sha256(big).hexdigest())


def _run_in_pty(argv: List[str], env: Dict[str, str], timeout: float = 120) -> Tuple[int, str]:
    master, slave = os.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd="/",
                            start_new_session=True)
    os.close(slave)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
        elif proc.poll() is not None:
            break
    rc = proc.wait(timeout=10)
    os.close(master)
    return rc, buf.decode(errors="replace")


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_terminal_is_a_terminal_only_under_a_tty(runtime: str, cache: Path) -> None:
    warm(runtime, cache)
    cmd = ["run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "sh", "-c",
           "test -t 0 && test -t 1 && echo is-tty || echo no-tty"]
    rc, text = _run_in_pty([*NSDF, *cmd], root_env(cache, TERM="xterm"))
    assert rc == 0 and "is-tty" in text, text
    r = nsdf(cmd, cache, input=b"")
    assert (r.returncode, out(r)) == (0, "no-tty\n"), err(r)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_command_killed_by_a_signal_exits_128_plus_n(runtime: str, sig: int, cache: Path) -> None:
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "sh", "-c",
              f"kill -{signal.Signals(sig).name[3:]} $$"], cache)
    assert r.returncode == 128 + sig, err(r)


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_not_found_127_and_not_executable_126(runtime: str, cache: Path, vtmp: Path) -> None:
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "nsdf-no-such-cmd"], cache)
    assert r.returncode == 127, err(r)
    assert "nsdf-no-such-cmd" in err(r)
    (vtmp / "data.txt").write_text("not a program\n")
    os.chmod(vtmp / "data.txt", 0o644)
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", "-B", f"{vtmp}:/mnt/x", BUSYBOX, "--",
              "/mnt/x/data.txt"], cache)
    assert r.returncode == 126, err(r)
    assert "data.txt" in err(r)


@pytest.fixture(scope="module")
def shell_less_image() -> str:
    """An image without /bin/sh: one static busybox at /busybox (FROM scratch), and the
    /etc/passwd and /etc/group that ch-run and udocker need to find in an image."""
    u = uuid.uuid4().hex[:10]
    ref, local = f"{REG}/test/noshell:{u}", f"localhost/nsdf-runfix-noshell:{u}"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        (Path(d) / "Containerfile").write_text(f"FROM {BUSYBOX} AS bb\nFROM scratch\n"
                                               "COPY --from=bb /bin/busybox /busybox\n"
                                               # ch-run and udocker bind these onto the image's
                                               "COPY --from=bb /etc/passwd /etc/group /etc/\n")
        r = subprocess.run(["podman", "build", "-q", "--tls-verify=false", "-t", local, d],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    _push(local, ref)
    subprocess.run(["podman", "rmi", local], capture_output=True)
    return ref


@pytest.mark.podman
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_an_image_without_a_shell_runs_its_command_as_given(runtime: str, shell_less_image: str,
                                                            cache: Path) -> None:
    """The 127/126 start needs /bin/sh in the image: without one, the command runs directly."""
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", shell_less_image, "--", "/busybox", "echo", "ok"], cache)
    assert (r.returncode, out(r)) == (0, "ok\n"), err(r)
    entries = json.loads(nsdf(["images", "--json"], cache).stdout)
    mine = [e for e in entries if e["runtime"] == runtime and "noshell" in e["source"]]
    assert mine, entries
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", shell_less_image, "--", "nsdf-no-such-cmd"], cache)
    assert r.returncode not in (0, 125), err(r)   # the runtime's own code: nothing to start sh with


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_explicit_home_and_user_win_as_root(runtime: str, cache: Path) -> None:
    r = nsdf(["run", "-r", runtime, "--no-bind-cwd", "--env", "HOME=/tmp/h", "--env", "USER=bob",
              BUSYBOX, "--", "sh", "-c", 'echo "$HOME $USER"'], cache)
    assert (r.returncode, out(r)) == (0, "/tmp/h bob\n"), err(r)


@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_explicit_home_and_user_win_as_unprivileged_user(runtime: str, as_user) -> None:
    r = nsdf_user(as_user, ["run", "-r", runtime, "--no-bind-cwd", "--env", "HOME=/tmp/h", "--env",
                            "USER=bob", BUSYBOX, "--", "sh", "-c", 'echo "$HOME $USER"'],
                  user_cache(as_user), cwd="/")
    assert (r.returncode, r.stdout) == (0, "/tmp/h bob\n"), r.stderr


@pytest.mark.parametrize("where", ["var-tmp", "srv"])
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_no_bind_cwd_means_the_image_workdir_everywhere(runtime: str, where: str, cache: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="nsdf-nbc-", dir="/var/tmp" if where == "var-tmp" else "/srv"))
    try:
        os.chmod(d, 0o755)
        (d / "marker").write_text("host\n")
        r = nsdf(["run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "sh", "-c",
                  f"pwd; test -e {d}/marker && echo visible || echo hidden"], cache, cwd=str(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert (r.returncode, out(r).splitlines()) == (0, ["/", "hidden"]), err(r)


# ------------------------------------------------------------------ item 5: signals to nsdf-run
def _procs_with(arg: str) -> List[str]:
    """``PID ARGS`` of the processes whose command line holds ARG (``sleep N``), as whole words.

    Only the command line is matched, never the PID column: a bare number matched there once
    SIGKILLed munged (its PID held the digits) and took the whole Slurm cluster down in CI."""
    assert " " in arg.strip(), f"match a command ('sleep N'), not a bare word: {arg!r}"
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    want = arg.split()
    found = []
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        words = args.split()
        if "ps -eo" not in args and any(
                words[i].rsplit("/", 1)[-1] == want[0] and words[i + 1:i + len(want)] == want[1:]
                for i in range(len(words))):
            found.append(f"{pid} {args.strip()}")
    return found


def _podman_leftovers(arg: str, tool: str = "podman") -> List[str]:
    """Containers left in podman's store (podman-hpc: its own per-uid store)."""
    r = subprocess.run([tool, "ps", "-a", "--format", "{{.ID}} {{.Command}}"],
                       capture_output=True, text=True, env={**os.environ, "USER": "root"})
    return [line for line in r.stdout.splitlines() if arg in line]


def _cleanup(arg: str) -> None:
    for line in _procs_with(arg):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for tool in ("podman", "podman-hpc"):
        for line in _podman_leftovers(arg, tool):
            subprocess.run([tool, "rm", "-f", line.split()[0]], capture_output=True,
                           env={**os.environ, "USER": "root"})


MOMENTS = ["early-0.05s", "early-0.4s", "started", "started+0.5s", "started+1.5s"]


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_signal_to_nsdf_run_ends_the_container(runtime: str, sig: int, moment: str, cache: Path) -> None:
    warm(runtime, cache)
    arg = str(3000 + uuid.uuid4().int % 6000)    # a unique `sleep N` to find the container by
    # output to a file, not a pipe: a container left behind would hold a pipe open
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([*NSDF, "run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "sleep", arg],
                            env=root_env(cache), cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        if moment.startswith("early"):
            time.sleep(float(moment.split("-")[1].rstrip("s")))
        else:
            deadline = time.monotonic() + 60
            while not _procs_with(f"sleep {arg}") and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _procs_with(f"sleep {arg}"), "the container never started"
            if "+" in moment:
                time.sleep(float(moment.split("+")[1].rstrip("s")))
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.seek(0)
            pytest.fail(f"nsdf-run did not exit within 30 s of {signal.Signals(sig).name}; "
                        f"its output: {log.read()[-2000:]!r}; processes: {_procs_with('sleep ' + arg)}")
        log.seek(0)
        stderr = log.read()
        # a runtime orphaned while starting may start the command after nsdf-run is gone
        time.sleep(2)
        alive = _procs_with(f"sleep {arg}")
        left = _podman_leftovers(f"sleep {arg}", runtime) if runtime.startswith("podman") else []
        startup = sig == signal.SIGINT and _cpython_startup(rc, stderr)
        assert rc in (128 + sig, -sig) or startup, f"exit {rc}: {stderr.decode(errors='replace')}"
        assert not alive, f"container processes outlive nsdf-run: {alive}"
        assert not left, f"podman containers left behind: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cleanup(f"sleep {arg}")


@pytest.mark.parametrize("path", ["recorded", "planned"])
def test_apptainer_signal_while_it_starts_is_not_lost(path: str, cache: Path) -> None:
    """Apptainer's CLI and starter drop a signal that reaches them while they set the container
    up (measured on Apptainer 1.4.5: 6 SIGINTs in 60 sent in the first 0.12 s, and the
    container ran on). nsdf-run holds such a signal until the command runs
    (``Runtime.startup_names``). Before the fix, 5 of 120 of these trials hung; the CI run of
    2026-12-01 failed on one. Many trials, spread over the window, on both paths: the launch
    record (nsdf-run starts apptainer ~30 ms in) and planning (~250 ms in). A SIGINT that
    CPython itself lost while it started, before nsdf-run's code ran (``_lost_by_cpython``),
    is not held against nsdf-run: the user's second Ctrl-C must end it, with nothing left."""
    warm("apptainer", cache)
    arg = str(3000 + uuid.uuid4().int % 6000)
    argv = [*NSDF, "run", "-r", "apptainer", "--no-bind-cwd", BUSYBOX, "--", "sleep", arg]
    extra = {"NSDF_HPC_NO_FAST_PATH": "1"} if path == "planned" else {}
    env = root_env(cache, **extra)
    if path == "recorded":   # a planned run writes the launch record (before it starts) the trials replay
        first = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not _procs_with(f"sleep {arg}") and time.monotonic() < deadline:
            time.sleep(0.05)
        first.terminate()
        assert first.wait(timeout=30) in (143, -15)
        _cleanup(f"sleep {arg}")
    lo, hi = (0.02, 0.25) if path == "recorded" else (0.15, 0.55)
    trials, hung, codes, again = 40 if path == "recorded" else 25, [], [], []
    try:
        for i in range(trials):
            delay = lo + (hi - lo) * i / (trials - 1)
            sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
            proc = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(delay)
            proc.send_signal(sig)
            try:
                _, stderr = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                # nsdf-run hung, or exited while the orphaned container holds its stderr pipe,
                # or CPython lost the signal before nsdf-run's code ran: the user's second
                # Ctrl-C must then end it (and the first is shown as lost by CPython)
                left = _procs_with(f"sleep {arg}")
                stderr, _ = _signal_and_collect(proc, sig)
                if _lost_by_cpython(stderr) and proc.returncode in (128 + sig, -sig) \
                        and not _procs_with(f"sleep {arg}"):
                    again.append(f"{sig.name} at {delay:.3f} s")
                    continue
                hung.append(f"{sig.name} at {delay:.3f} s: exit {proc.poll()}, left {left}, "
                            f"stderr {stderr[-400:]!r}")
                _cleanup(f"sleep {arg}")
                continue
            startup = _cpython_startup(proc.returncode, stderr)
            codes.append(proc.returncode)
            assert proc.returncode in (128 + sig, -sig) or startup, \
                f"{sig.name} at {delay:.3f} s: exit {proc.returncode}: {stderr.decode(errors='replace')}"
            assert not _procs_with(f"sleep {arg}"), f"{sig.name} at {delay:.3f} s: the container ran on"
    finally:
        _cleanup(f"sleep {arg}")
    assert not hung, f"nsdf-run did not end within 20 s of a signal in {len(hung)} of {trials} trials: {hung}"
    # measured: 1 SIGINT in 300 sent 8-30 ms after the start (_lost_by_cpython)
    assert len(again) <= 2, f"the first signal was lost by CPython's start-up in {len(again)} trials: {again}"


def _signal_and_collect(proc: "subprocess.Popen[bytes]", sig: int) -> Tuple[bytes, bool]:
    """Send ``sig``; the stderr, and whether it ended within 20 s (else it was killed)."""
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=20)[1], True
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate(timeout=30)[1], False


def _lost_by_cpython(stderr: bytes) -> bool:
    """A SIGINT that CPython's own handler took while the interpreter started, inside a
    weakref callback of the import system (the module locks' ``cb``), before nsdf-run's code
    installed its own handler (``_entry._take_sigint``): CPython prints "Exception ignored"
    with the KeyboardInterrupt and goes on (cpython#95959), and nothing of nsdf-run's saw the
    signal. Measured on the recorded apptainer path: 1 SIGINT in 300 sent 8-30 ms after the
    start (2026-12-03; the CI run of 2026-12-03 met it once). With nsdf-run's handler in place
    such a KeyboardInterrupt is noted (``_entry.interrupted``) and its frame is in the
    traceback."""
    return (b"Exception ignored" in stderr and b"KeyboardInterrupt" in stderr
            and b"_bootstrap" in stderr and b"_note_sigint" not in stderr)


def _cpython_startup(rc: Optional[int], stderr: bytes) -> bool:
    """A SIGINT while the interpreter itself starts, before any nsdf-hpc code: CPython ends
    with status 1 and "Fatal Python error: init_import_site", or, for ``python -m``, "Could
    not import runpy module" (the CI run of 2026-12-02, at 0.055 s). Nothing ran; the tests
    still check that no container is left."""
    return rc == 1 and (b"Fatal Python error" in stderr or b"Could not import runpy module" in stderr)


def _relay_below(pid: int) -> bool:
    """Whether ``pid`` or a process below it runs udocker's signal relay (its interpreter has
    started: the script's path is in its command line from the exec on)."""
    todo = [str(pid)]
    while todo:
        p = todo.pop()
        try:
            if b"_udocker_relay" in Path(f"/proc/{p}/cmdline").read_bytes():
                return True
        except OSError:
            pass
        todo += _children(int(p))
    return False


@pytest.mark.udocker
@pytest.mark.parametrize("path", ["recorded", "planned"])
def test_signal_while_the_udocker_relay_starts_is_not_lost(path: str, cache: Path) -> None:
    """UDocker's signal relay (``runtimes/_udocker_relay.py``) is a Python script. A SIGINT
    while its interpreter started raised KeyboardInterrupt there, which CPython prints and goes
    on from when it checks the script's directory ("Failed checking if argv[0] is an import
    path entry"): the relay then started udocker, and the container ran on (CI, 2026-12-02,
    udocker-INT-early-0.4s: nsdf-run did not end within 30 s). The relay now starts with its
    signals blocked and takes them itself. The window is the relay's own start (about 15-25
    ms), so each trial waits for the relay's exec and signals 0-30 ms after it: on the launch
    record nsdf-run has become the relay; planned, nsdf-run passes the signal on to it."""
    warm("udocker", cache)
    arg = str(3000 + uuid.uuid4().int % 6000)
    argv = [*NSDF, "run", "-r", "udocker", "--no-bind-cwd", BUSYBOX, "--", "sleep", arg]
    env = root_env(cache, **({"NSDF_HPC_NO_FAST_PATH": "1"} if path == "planned" else {}))
    if path == "recorded":   # the planned run that writes the record the trials replay
        r = subprocess.run([*NSDF, "run", "-r", "udocker", "--no-bind-cwd", BUSYBOX, "--", "true"], env=env,
                           cwd="/", stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr
    trials, failed = 30, []
    try:
        for i in range(trials):
            delay = 0.03 * i / (trials - 1)
            sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
            proc = subprocess.Popen(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            while not _relay_below(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            time.sleep(delay)
            stderr, ended = _signal_and_collect(proc, sig)
            if not ended:
                failed.append(f"{sig.name} {delay * 1000:.0f} ms after the relay: nsdf-run hung "
                              f"({stderr[-300:]!r}), left {_procs_with(f'sleep {arg}')}")
                _cleanup(f"sleep {arg}")
                continue
            left = _procs_with(f"sleep {arg}")
            if proc.returncode not in (128 + sig, -sig) or left or b"Traceback" in stderr:
                failed.append(f"{sig.name} {delay * 1000:.0f} ms after the relay: exit {proc.returncode}, "
                              f"left {left}, {stderr[-300:]!r}")
                _cleanup(f"sleep {arg}")
    finally:
        _cleanup(f"sleep {arg}")
    assert not failed, f"{len(failed)} of {trials} trials: {failed}"


def _children(pid: int) -> List[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


@pytest.mark.apptainer
@pytest.mark.unprivileged
def test_unprivileged_apptainer_signal_while_it_mounts_the_image_is_not_lost(as_user) -> None:
    """Unprivileged, Apptainer's starter mounts the SIF with squashfuse_ll, a child that
    appears before the command's exec and lives on. A signal passed on when it appeared
    was lost: nsdf-run (planned) hung in 2 of 40 trials before squashfuse_ll and the other FUSE
    helpers joined ``startup_names`` (hpcuser, 2026-12-02). Many trials over the window."""
    cache = user_cache(as_user)
    r = nsdf_user(as_user, ["pull", "-r", "apptainer", BUSYBOX], cache, cwd="/")
    assert r.returncode == 0, r.stderr
    arg = str(3000 + uuid.uuid4().int % 6000)
    env = as_user.env(NSDF_HPC_CACHE=str(cache), NSDF_HPC_NO_FAST_PATH="1")
    argv = ["runuser", "-u", as_user.user, "--", "env", "-i", *[f"{k}={v}" for k, v in env.items()],
            "nsdf-run", "run", "-r", "apptainer", "--no-bind-cwd", BUSYBOX, "--", "sleep", arg]
    trials, hung = 30, []
    try:
        for i in range(trials):
            delay = 0.1 + 0.6 * i / (trials - 1)
            sig = signal.SIGINT if i % 2 == 0 else signal.SIGTERM
            proc = subprocess.Popen(argv, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            nsdf_pid = _descendant(proc.pid, "nsdf-run", timeout=10)   # runuser is only the wrapper
            assert nsdf_pid is not None, "nsdf-run never started"
            time.sleep(delay)
            os.kill(nsdf_pid, sig)
            try:
                _, stderr = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                hung.append(f"{sig.name} at {delay:.3f} s: left {_procs_with(f'sleep {arg}')}")
                proc.kill()
                _cleanup(f"sleep {arg}")
                proc.communicate(timeout=30)
                continue
            assert proc.returncode == 128 + sig, f"{sig.name} at {delay:.3f} s: {stderr.decode(errors='replace')}"
            assert not _procs_with(f"sleep {arg}"), f"{sig.name} at {delay:.3f} s: the container ran on"
    finally:
        _cleanup(f"sleep {arg}")
    assert not hung, f"nsdf-run did not end within 20 s of a signal in {len(hung)} of {trials} trials: {hung}"


@pytest.mark.podman
@pytest.mark.parametrize("delay", [0.06, 0.09, 0.12, 0.15])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_while_podman_starts_the_container_ends_it(sig: int, delay: float, cache: Path) -> None:
    """The window MOMENTS above hits only by luck: the signal arrives DELAY after nsdf-run
    started the podman client, while podman creates and starts the container and before its
    --sig-proxy is set up (podman 4.3.1 here: about 0.06-0.18 s in). Before the fix this left
    a `Created`/`Initialized` container (or a running `sleep`) and exited 1 (INT) or 0 (TERM)."""
    warm("podman", cache)
    arg = str(3000 + uuid.uuid4().int % 6000)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([*NSDF, "run", "-r", "podman", "--no-bind-cwd", BUSYBOX, "--", "sleep", arg],
                            env=root_env(cache), cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while not _children(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        assert _children(proc.pid), "nsdf-run never started podman"
        time.sleep(delay)
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        time.sleep(2)
        log.seek(0)
        alive = _procs_with(f"sleep {arg}")
        left = _podman_leftovers(f"sleep {arg}")
        assert (rc, alive, left) == (128 + sig, [], []), \
            f"exit {rc}, alive {alive}, left {left}: {log.read().decode(errors='replace')}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cleanup(f"sleep {arg}")


def _descendant(pid: int, name: str, timeout: float = 60) -> Optional[int]:
    """The first process below ``pid`` whose command name is ``name`` (polled)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo = [str(pid)]
        while todo:
            p = todo.pop()
            try:
                if Path(f"/proc/{p}/comm").read_text().strip() == name:
                    return int(p)
            except OSError:
                pass
            todo += _children(int(p))
        time.sleep(0.002)
    return None


@pytest.mark.podman
@pytest.mark.unprivileged
@pytest.mark.parametrize("delay", [0.06, 0.12])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_while_rootless_podman_starts_the_container_ends_it(sig: int, delay: float, as_user) -> None:
    """The same window with rootless podman (the user's own store and conmon)."""
    cache = user_cache(as_user)
    r = nsdf_user(as_user, ["pull", "-r", "podman", BUSYBOX], cache, cwd="/")
    assert r.returncode == 0, r.stderr
    arg = str(3000 + uuid.uuid4().int % 6000)
    env = as_user.env(NSDF_HPC_CACHE=str(cache))
    proc = subprocess.Popen(["runuser", "-u", as_user.user, "--", "env", "-i",
                             *[f"{k}={v}" for k, v in env.items()], "nsdf-run", "run", "-r", "podman",
                             "--no-bind-cwd", BUSYBOX, "--", "sleep", arg],
                            cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    podman_ps = ["runuser", "-u", as_user.user, "--", "env", "-i",
                 *[f"{k}={v}" for k, v in env.items()], "podman", "ps", "-a", "--format", "{{.ID}} {{.Command}}"]
    try:
        pod = _descendant(proc.pid, "podman")
        assert pod is not None, "nsdf-run never started podman"
        nsdf_pid = int(Path(f"/proc/{pod}/stat").read_text().rsplit(")", 1)[1].split()[1])
        time.sleep(delay)
        os.kill(nsdf_pid, sig)                 # to nsdf-run itself (runuser is only the wrapper)
        _, stderr = proc.communicate(timeout=30)
        time.sleep(2)
        alive = _procs_with(f"sleep {arg}")
        left = [ln for ln in subprocess.run(podman_ps, capture_output=True, text=True).stdout.splitlines()
                if f"sleep {arg}" in ln]
        assert (proc.returncode, alive, left) == (128 + sig, [], []), stderr.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for line in _procs_with(f"sleep {arg}"):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        for line in subprocess.run(podman_ps, capture_output=True, text=True).stdout.splitlines():
            if f"sleep {arg}" in line:
                subprocess.run([*podman_ps[:podman_ps.index("podman") + 1], "rm", "-f", line.split()[0]],
                               capture_output=True)


@pytest.mark.podman
@pytest.mark.parametrize("delay", [0.03, 0.08, 0.13])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_while_podman_starts_on_the_launch_record_path(sig: int, delay: float, cache: Path) -> None:
    """The second identical run takes the launch record (``_launch.try_fast_run``), which used to
    os.execve podman: a signal in podman's start-up window then reached the podman client
    directly, and nobody was left to remove the container."""
    warm("podman", cache)
    arg = str(3000 + uuid.uuid4().int % 6000)
    cmd = [*NSDF, "run", "-r", "podman", "--no-bind-cwd", BUSYBOX, "--", "sleep", arg]
    records = cache / "launch"
    before = set(records.iterdir()) if records.is_dir() else set()
    started_procs: List["subprocess.Popen[bytes]"] = []
    try:
        first = subprocess.Popen(cmd, env=root_env(cache), cwd="/", stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started_procs.append(first)
        deadline = time.monotonic() + 60
        while not _procs_with(f"sleep {arg}") and time.monotonic() < deadline:
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 128 + signal.SIGTERM
        assert set(records.iterdir()) - before, "the planned run wrote no launch record"
        log = tempfile.TemporaryFile()
        started = time.monotonic()
        proc = subprocess.Popen(cmd, env=root_env(cache), cwd="/", stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
        started_procs.append(proc)
        child: List[bytes] = []
        while proc.poll() is None and time.monotonic() < deadline:
            try:   # the first child once it is podman (not the forked Python before its exec)
                child = Path(f"/proc/{_children(proc.pid)[0]}/cmdline").read_bytes().split(b"\0")
            except (IndexError, OSError):
                child = []
            if child and child[0].endswith(b"podman"):
                break
            time.sleep(0.002)
        # the planned path asks the store first (`podman image exists`); the record runs podman
        assert child[1:2] == [b"run"], f"not the launch-record path: {child} ({time.monotonic() - started:.2f} s)"
        time.sleep(delay)
        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
        time.sleep(2)
        log.seek(0)
        alive = _procs_with(f"sleep {arg}")
        left = _podman_leftovers(f"sleep {arg}")
        assert (rc, alive, left) == (128 + sig, [], []), \
            f"exit {rc}, alive {alive}, left {left}: {log.read().decode(errors='replace')}"
    finally:
        for p in started_procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        _cleanup(f"sleep {arg}")


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_sigterm_to_nsdf_run_reaches_a_trapping_command(runtime: str, cache: Path) -> None:
    warm(runtime, cache)
    arg = str(3000 + uuid.uuid4().int % 6000)
    proc = subprocess.Popen([*NSDF, "run", "-r", runtime, "--no-bind-cwd", BUSYBOX, "--", "sh", "-c",
                             f'trap "exit 7" TERM; sleep {arg} & wait'],
                            env=root_env(cache), cwd="/", stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _procs_with(f"sleep {arg}") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("nsdf-run did not exit within 30 s of SIGTERM")
        alive = _procs_with(f"sleep {arg}")
        assert proc.returncode == 7, f"exit {proc.returncode}: the trap did not run; still running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _cleanup(f"sleep {arg}")


# ------------------------------------------------------------------ item 3: charliecloud cache
def _tree(root: Path) -> Dict[str, Tuple]:
    snap: Dict[str, Tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                snap[rel] = ("l", os.readlink(p))
            elif p.is_dir():
                snap[rel] = ("d", st.st_mode)
            else:
                h = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
                snap[rel] = ("f", st.st_mode, st.st_size, h)
    return snap


def _ch_entry(cache: Path) -> Path:
    r = nsdf(["pull", "--json", "-r", "charliecloud", BUSYBOX], cache)
    assert r.returncode == 0, err(r)
    return Path(json.loads(r.stdout)["location"])


@pytest.mark.charliecloud
def test_charliecloud_runs_never_write_into_the_cached_image(cache: Path, vtmp: Path) -> None:
    rootfs = _ch_entry(cache)
    before = _tree(rootfs)
    (vtmp / "file.txt").write_text("x\n")
    src = vtmp / "src"
    src.mkdir()
    runs = [
        ["--no-bind-cwd", "-B", f"{src}:/newdir/deep", BUSYBOX, "--", "true"],
        ["--no-bind-cwd", "-B", f"{src}:/mnt/com,ma", BUSYBOX, "--", "true"],
        ["--no-bind-cwd", "-B", f"{vtmp}/file.txt:/etc/file.txt", BUSYBOX, "--", "true"],
        [BUSYBOX, "--", "true"],   # the default bind of a cwd missing from the image
    ]
    results = [nsdf(["run", "-r", "charliecloud", *a], cache, cwd=str(src)) for a in runs]
    after = _tree(rootfs)
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    assert not added and not changed, (f"runs modified the cached image: added {added}, changed {changed}; "
                                       f"exits {[r.returncode for r in results]}")


@pytest.mark.charliecloud
def test_images_verify_flags_a_hand_modified_charliecloud_entry(tmp_path: Path) -> None:
    c = Path(tempfile.mkdtemp(prefix="nsdf-runfix-verify-", dir="/var/tmp"))
    try:
        rootfs = _ch_entry(c)
        (rootfs / "etc" / "injected-by-hand").write_text("tampered\n")
        r = nsdf(["images", "--verify", "--json"], c)
        assert r.returncode == 0, err(r)
        rows = [row for row in json.loads(r.stdout) if row["runtime"] == "charliecloud"]
        assert rows and not rows[0]["ok"], f"a modified rootfs is reported as ok: {rows}"
    finally:
        shutil.rmtree(c, ignore_errors=True)


# ------------------------------------------------------------------ item 2: podman prune
def _own_podman_image(tag: str) -> Tuple[str, str]:
    """Push an image of its own (busybox + /etc/id = ``tag``) to ``test/prune:<tag>``; returns
    (reference, id text). busybox itself has other names in the podman store (other tests),
    and `podman rmi NAME` then only untags, so a test of removal needs an image nobody else names."""
    ref = f"{REG}/test/prune:{tag}"
    local = f"localhost/nsdf-runfix-prune:{tag}"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        (Path(d) / "Containerfile").write_text(f"FROM {BUSYBOX}\nRUN echo {tag} > /etc/id\n")
        r0 = subprocess.run(["podman", "build", "-q", "--tls-verify=false", "-t", local, d],
                            capture_output=True, text=True)
        assert r0.returncode == 0, r0.stderr
    _push(local, ref)
    subprocess.run(["podman", "rmi", local], capture_output=True)
    return ref, f"{tag}\n"


@pytest.mark.podman
def test_podman_prune_in_one_cache_does_not_break_another() -> None:
    ref, ident = _own_podman_image(uuid.uuid4().hex[:10])
    a = Path(tempfile.mkdtemp(prefix="nsdf-runfix-A-", dir="/var/tmp"))
    b = Path(tempfile.mkdtemp(prefix="nsdf-runfix-B-", dir="/var/tmp"))
    try:
        warm("podman", a, ref)
        warm("podman", b, ref)
        r = nsdf(["prune", "--max-size", "0"], b)
        assert r.returncode == 0 and "removed 1 entry" in out(r), out(r) + err(r)
        r = nsdf(["run", "-r", "podman", "--no-bind-cwd", ref, "--", "cat", "/etc/id"], a)
        if r.returncode != 0:
            v = nsdf(["images", "--verify", "--json"], a)
            rows = json.loads(v.stdout or b"[]")
            assert rows and not rows[0]["ok"], (
                f"run in cache A fails after prune in B (exit {r.returncode}: {err(r).strip()}) "
                f"and `images --verify` in A does not flag it: {rows}")
            p = nsdf(["pull", "-r", "podman", ref], a)
            assert p.returncode == 0, err(p)
            r = nsdf(["run", "-r", "podman", "--no-bind-cwd", ref, "--", "cat", "/etc/id"], a)
        assert (r.returncode, out(r)) == (0, ident), err(r)
        # the last cache's prune frees the store: no name (ours or the shared pull name) is left
        r = nsdf(["prune", "--max-size", "0"], a)
        assert r.returncode == 0 and "removed 1 entry" in out(r), out(r) + err(r)
        e = subprocess.run(["podman", "image", "exists", ref.rsplit(":", 1)[0] + "@" + _digest(ref)])
        assert e.returncode == 1, "the image outlived the prune of the last cache that named it"
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.rmtree(b, ignore_errors=True)


def _digest(ref: str) -> str:
    r = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                        f"docker://{ref}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _verify_notices(run_nsdf, podman: List[str], ref: str, ident: str) -> None:
    """Pull ``ref``, remove its image from the store behind the cache's back, then check that
    `images --verify` flags the entry, `pull` pulls again (not "cached:"), and `run` works."""
    p = run_nsdf(["pull", "--json", "-r", "podman", ref])
    assert p[0] == 0, p[2]
    location = json.loads(p[1])["location"]
    r = subprocess.run([*podman, "rmi", location], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    v = run_nsdf(["images", "--verify", "--json"])
    rows = [row for row in json.loads(v[1] or "[]") if row["runtime"] == "podman"]
    assert rows and not any(row["ok"] for row in rows), f"a store image removed by hand is ok: {rows}"
    p = run_nsdf(["pull", "-r", "podman", ref])
    assert p[0] == 0 and p[1].startswith("pulled:"), p
    r2 = run_nsdf(["run", "-r", "podman", "--no-bind-cwd", ref, "--", "cat", "/etc/id"])
    assert (r2[0], r2[1]) == (0, ident), r2[2]
    v = run_nsdf(["images", "--verify", "--json"])
    rows = [row for row in json.loads(v[1] or "[]") if row["runtime"] == "podman"]
    assert rows and all(row["ok"] for row in rows), rows
    run_nsdf(["prune", "--max-size", "0"])


@pytest.mark.podman
def test_podman_verify_notices_a_store_image_removed_by_hand() -> None:
    ref, ident = _own_podman_image(uuid.uuid4().hex[:10])
    c = Path(tempfile.mkdtemp(prefix="nsdf-runfix-V-", dir="/var/tmp"))
    try:
        def run_nsdf(args: List[str]) -> Tuple[int, str, str]:
            r = nsdf(args, c)
            return r.returncode, out(r), err(r)
        _verify_notices(run_nsdf, ["podman"], ref, ident)
    finally:
        shutil.rmtree(c, ignore_errors=True)


@pytest.mark.podman
def test_podman_launch_record_recovers_when_the_store_image_is_gone() -> None:
    """A launch record checks files by stat; a store image removed behind the cache's back
    (another tool's `podman rmi`, `podman system reset`) used to give 125 "image not known" on
    every later identical run until the record expired (30 days for a digest)."""
    ref, ident = _own_podman_image(uuid.uuid4().hex[:10])
    c = Path(tempfile.mkdtemp(prefix="nsdf-runfix-L-", dir="/var/tmp"))
    cmd = ["run", "-r", "podman", "--no-bind-cwd", ref, "--", "cat", "/etc/id"]
    try:
        location = json.loads(nsdf(["pull", "--json", "-r", "podman", ref], c).stdout)["location"]
        for _ in range(2):                                  # planned, then the launch record
            r = nsdf(cmd, c)
            assert (r.returncode, out(r)) == (0, ident), err(r)
        assert list((c / "launch").iterdir()), "no launch record was written"
        assert subprocess.run(["podman", "rmi", location], capture_output=True).returncode == 0
        for _ in range(2):
            r = nsdf(cmd, c)
            assert (r.returncode, out(r)) == (0, ident), f"exit {r.returncode}: {err(r)}"
        nsdf(["prune", "--max-size", "0"], c)
    finally:
        shutil.rmtree(c, ignore_errors=True)


@pytest.mark.podman
def test_a_planned_podman_run_reads_the_store_and_asks_podman_only_when_the_image_is_gone() -> None:
    """A planned run whose entry podman's store lists (its own images.json, as storage.conf
    places it) starts no `podman image exists` (about 50 ms); once the image is gone behind
    the cache's back, podman is asked, says no, and the run pulls it again."""
    ref, ident = _own_podman_image(uuid.uuid4().hex[:10])
    c = Path(tempfile.mkdtemp(prefix="nsdf-runfix-S-", dir="/var/tmp"))
    cmd = ["-vv", "run", "-r", "podman", "--no-bind-cwd", ref, "--", "cat", "/etc/id"]
    try:
        location = json.loads(nsdf(["pull", "--json", "-r", "podman", ref], c).stdout)["location"]
        for _ in range(3):
            r = nsdf(cmd, c, NSDF_HPC_NO_FAST_PATH="1")        # planned each time
            assert (r.returncode, out(r)) == (0, ident), err(r)
            assert " image exists " not in err(r) and " pull " not in err(r), err(r)
        assert subprocess.run(["podman", "rmi", location], capture_output=True).returncode == 0
        r = nsdf(cmd, c, NSDF_HPC_NO_FAST_PATH="1")
        assert (r.returncode, out(r)) == (0, ident), err(r)
        assert f"image exists {location}" in err(r) and " pull " in err(r), err(r)
        nsdf(["prune", "--max-size", "0"], c)
    finally:
        shutil.rmtree(c, ignore_errors=True)


@pytest.mark.podman
@pytest.mark.unprivileged
def test_podman_prune_and_verify_as_unprivileged_user(as_user) -> None:
    """Rootless podman keeps one store per user ($HOME/.local/share/containers): the same
    rules hold there, with the user's own caches."""
    ref, ident = _own_podman_image(uuid.uuid4().hex[:10])
    pw = as_user.pw
    caches = []
    for _ in range(3):
        d = Path(tempfile.mkdtemp(prefix="nsdf-runfix-U-", dir="/var/tmp"))
        os.chown(d, pw.pw_uid, pw.pw_gid)
        caches.append(d)
    a, b, c = caches

    def in_cache(cache: Path):
        def run_nsdf(args: List[str]) -> Tuple[int, str, str]:
            r = nsdf_user(as_user, args, cache, cwd="/")
            return r.returncode, r.stdout, r.stderr
        return run_nsdf
    try:
        for cache in (a, b):
            r = in_cache(cache)(["pull", "-r", "podman", ref])
            assert r[0] == 0, r[2]
        r = in_cache(b)(["prune", "--max-size", "0"])
        assert r[0] == 0 and "removed 1 entry" in r[1], r
        r = in_cache(a)(["run", "-r", "podman", "--no-bind-cwd", ref, "--", "cat", "/etc/id"])
        assert (r[0], r[1]) == (0, ident), f"prune in the user's cache B broke cache A: {r[2]}"
        # the user's own store is read from its files (no `podman image exists`)
        r2 = nsdf_user(as_user, ["-vv", "run", "-r", "podman", "--no-bind-cwd", ref, "--", "cat", "/etc/id"], a,
                       cwd="/", NSDF_HPC_NO_FAST_PATH="1")
        assert (r2.returncode, r2.stdout) == (0, ident) and " image exists " not in r2.stderr, r2.stderr
        in_cache(a)(["prune", "--max-size", "0"])
        _verify_notices(in_cache(c), ["runuser", "-u", as_user.user, "--", "env", "-i",
                                      *[f"{k}={v}" for k, v in as_user.env().items()], "podman"],
                        ref, ident)
    finally:
        for d in caches:
            shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ item 7: a moved tag
@pytest.fixture(scope="module")
def moving_images() -> Dict[str, str]:
    """Two tiny images (busybox + /etc/hello.txt = v1 / v2) pushed to the TLS registry."""
    if shutil.which("podman") is None:
        pytest.skip("podman builds the two images")
    tags = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        for v in ("v1", "v2"):
            (Path(d) / "Containerfile").write_text(f"FROM {BUSYBOX}\nRUN echo {v} > /etc/hello.txt\n")
            local = f"localhost/nsdf-runfix-moving:{v}"
            r = subprocess.run(["podman", "build", "-q", "--tls-verify=false", "-t", local, d],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            tags[v] = local
    yield tags
    for local in tags.values():
        subprocess.run(["podman", "rmi", local], capture_output=True)


def _push(local: str, dest: str) -> None:
    r = subprocess.run(["podman", "push", "-q", "--tls-verify=false", local, f"docker://{dest}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.podman
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_a_moved_tag_runs_the_new_image_after_pull(runtime: str, moving_images: Dict[str, str],
                                                   cache: Path) -> None:
    ref = f"{REG}/test/moving:{runtime}-{uuid.uuid4().hex[:8]}"
    cmd = ["run", "-r", runtime, "--no-bind-cwd", ref, "--", "cat", "/etc/hello.txt"]
    _push(moving_images["v1"], ref)
    r = nsdf(cmd, cache)
    assert (r.returncode, out(r)) == (0, "v1\n"), err(r)
    r = nsdf(cmd, cache)   # the second identical run writes/uses the launch record
    assert (r.returncode, out(r)) == (0, "v1\n"), err(r)
    _push(moving_images["v2"], ref)
    p = nsdf(["pull", "-r", runtime, ref], cache)
    assert p.returncode == 0, err(p)
    r = nsdf(cmd, cache)
    assert (r.returncode, out(r)) == (0, "v2\n"), f"ran the old image after `pull` of the moved tag: {err(r)}"


# ------------------------------------------------------------------ items 8, 12, 13: nothing ran -> 125
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_cwd_with_a_colon_works_or_exits_125_naming_no_bind_cwd(runtime: str, cache: Path) -> None:
    d = Path(tempfile.mkdtemp(prefix="nsdf-co:lon-", dir="/var/tmp"))
    try:
        os.chmod(d, 0o755)
        r = nsdf(["run", "-r", runtime, BUSYBOX, "--", "pwd"], cache, cwd=str(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    ok = r.returncode == 0 and out(r) == f"{d}\n"
    refused = r.returncode == 125 and "--no-bind-cwd" in err(r)
    assert ok or refused, f"exit {r.returncode}, stdout {out(r)!r}, stderr {err(r)!r}"


@pytest.mark.charliecloud
def test_charliecloud_native_sqfs_from_a_cwd_missing_in_the_image(cache: Path, vtmp: Path) -> None:
    rootfs = _ch_entry(cache)
    sqfs = rootfs.parent / "image.sqfs"
    assert sqfs.is_file(), list(rootfs.parent.iterdir())
    r = nsdf(["run", "-r", "charliecloud", str(sqfs), "--", "pwd"], cache, cwd=str(vtmp))
    assert (r.returncode, out(r)) == (0, f"{vtmp}\n"), err(r)


# ------------------------------------------------------------------ item 11: udocker OCI archives
def _udocker_repos(cache: Path) -> List[str]:
    env = root_env(cache, UDOCKER_DIR=str(cache / "udocker"))
    r = subprocess.run(["udocker", "--allow-root", "-q", "images"], env=env, capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip() and not line.startswith("REPOSITORY")]


@pytest.mark.udocker
@pytest.mark.parametrize("tag", ["untagged", "v1"])
def test_udocker_runs_oci_archives_untagged_or_tagged(tag: str, vtmp: Path) -> None:
    c = Path(tempfile.mkdtemp(prefix="nsdf-runfix-ud-", dir="/var/tmp"))
    try:
        archive = vtmp / f"busybox-{tag}.oci.tar"
        dest = f"oci-archive:{archive}" + (f":{tag}" if tag != "untagged" else "")
        r = subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{BUSYBOX}", dest],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        run = nsdf(["run", "-r", "udocker", "--no-bind-cwd", f"oci-archive:{archive}", "--", "echo", "ok"], c)
        repos = _udocker_repos(c)
        entries = json.loads(nsdf(["images", "--json"], c).stdout or b"[]")
        assert (run.returncode, out(run)) == (0, "ok\n"), f"{err(run)}; udocker repos now: {repos}"
        assert len(repos) <= len(entries), f"orphan udocker repositories: {repos} for entries {entries}"
    finally:
        shutil.rmtree(c, ignore_errors=True)


# ------------------------------------------------------------------ item 15: messages
def test_a_bare_image_id_is_a_bad_reference(cache: Path) -> None:
    r = nsdf(["run", "-r", "udocker", "a" * 64, "--", "true"], cache)
    assert r.returncode == 2, err(r)


def test_invalid_tag_ttl_is_one_line_without_a_pydantic_url(cache: Path, vtmp: Path) -> None:
    conf = vtmp / "config.toml"
    conf.write_text('tag_ttl = "x"\n')
    r = nsdf(["images"], cache, NSDF_HPC_CONFIG=str(conf))
    text = err(r).strip()
    assert r.returncode == 2, text
    assert "tag_ttl" in text and "pydantic.dev" not in text and len(text.splitlines()) == 1, text


def test_cache_that_is_a_file_gives_one_clear_error(vtmp: Path) -> None:
    f = vtmp / "not-a-dir"
    f.write_text("x")
    r = nsdf(["run", "-r", "charliecloud", BUSYBOX, "--", "true"], f)
    text = err(r).strip()
    assert r.returncode == 125, text
    assert "unreadable cache entry" not in text and "rebuilding" not in text, text
    assert str(f) in text and len(text.splitlines()) == 1, text


@pytest.mark.podman
def test_podman_entries_show_their_size(cache: Path) -> None:
    warm("podman", cache)
    r = nsdf(["images", "--json"], cache)
    rows = [row for row in json.loads(r.stdout) if row["runtime"] == "podman"]
    assert rows and all(row["size"] > 0 for row in rows), rows
    r = nsdf(["images"], cache)
    assert not [ln for ln in out(r).splitlines() if ln.startswith("podman") and " 0 B " in ln], out(r)


# ------------------------------------------------------------------ item 17: paths
@pytest.mark.charliecloud
def test_launch_records_live_under_nsdf_hpc_cache(cache: Path, vtmp: Path) -> None:
    home = vtmp / "home"
    home.mkdir()
    for _ in range(2):
        r = nsdf(["run", "-r", "charliecloud", "--no-bind-cwd", BUSYBOX, "--", "true"], cache,
                 HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
        assert r.returncode == 0, err(r)
    assert not (home / ".cache" / "nsdf-hpc" / "launch").exists(), \
        "launch records were written under $XDG_CACHE_HOME although NSDF_HPC_CACHE is set"


@pytest.mark.charliecloud
def test_a_relative_directory_is_a_native_image(cache: Path, vtmp: Path) -> None:
    rootfs = _ch_entry(cache)
    (vtmp / "arch").mkdir()
    subprocess.run(["cp", "-a", str(rootfs), str(vtmp / "arch" / "rootdir")], check=True)
    r = nsdf(["run", "-r", "charliecloud", "--no-bind-cwd", "arch/rootdir", "--", "echo", "ok"], cache,
             cwd=str(vtmp))
    assert (r.returncode, out(r)) == (0, "ok\n"), err(r)


# ------------------------------------------------------------------ item 6: [env] allow adds
@pytest.mark.charliecloud
def test_config_env_allow_adds_to_the_builtin_allowlist(cache: Path, vtmp: Path) -> None:
    conf = vtmp / "config.toml"
    conf.write_text('[env]\nallow = ["MY_SITE_*"]\n')
    r = nsdf(["run", "-r", "charliecloud", "--no-bind-cwd", BUSYBOX, "--", "sh", "-c",
              'echo "$MY_SITE_X|$SLURM_NSDF_T|$OMP_NUM_THREADS|$TERM|$HOME"'], cache,
             NSDF_HPC_CONFIG=str(conf), MY_SITE_X="site", SLURM_NSDF_T="slurm", OMP_NUM_THREADS="3",
             TERM="xterm", HOME="/root")
    assert (r.returncode, out(r)) == (0, "site|slurm|3|xterm|/root\n"), err(r)
