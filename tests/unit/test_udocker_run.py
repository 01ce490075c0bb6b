"""UDocker's run argv: the in-container shell (128+N, explicit USER/LOGNAME) and the signal
relay in front of udocker (issue 14 items 5, 8, 9); the relay's exit status."""
from __future__ import annotations

import runpy
import signal
import subprocess
import sys

import pytest

from nsdf_hpc.models import NativeImage, RunSpec
from nsdf_hpc.runtimes.base import RuntimeContext
from nsdf_hpc.runtimes.udocker import RELAY, RELAY_SIGNALS, UDocker

NATIVE = NativeImage(runtime="udocker", source="busybox", location="nsdf-" + "a" * 24)
HOST = {"PATH": "/usr/bin", "UDOCKER_DIR": "/cache/udocker"}
SH = "/cache/udocker/containers/nsdf-" + "a" * 24 + "/ROOT/bin/sh"


def _rt(python="/py/bin/python3", has_sh=True, uid=1000):
    ctx = RuntimeContext(uid, uid, "alice", which=lambda n: None, python=python,
                         exists=lambda p: has_sh and p == SH)
    return UDocker("/opt/bin/udocker", None, "1.3.17", ctx)


def _inv(rt, **spec):
    spec.setdefault("command", ("sleep", "5"))
    return rt.run_invocation(RunSpec(image="busybox", bind_cwd=False, **spec), NATIVE, {}, HOST)


def test_the_command_runs_under_the_shell_behind_the_relay():
    inv = _inv(_rt())
    assert inv.head[:6] == ("/py/bin/python3", "-I", "-S", RELAY, "--in-shell", "--")
    assert inv.head[6] == "/opt/bin/udocker"
    assert inv.command == ("/bin/sh", "-c", "unset SHLVL PWD; " + UDocker.SHELL_WRAPPER, "sh", "sleep", "5")


def test_explicit_user_and_logname_are_set_again_in_the_container():
    inv = _inv(_rt(), env={"USER": "bob", "LOGNAME": "b o'b", "HOME": "/tmp/h"})
    script = inv.command[2]
    assert script.startswith("export USER=bob; export LOGNAME='b o'\"'\"'b'; unset SHLVL PWD; trap ")
    assert inv.command[-2:] == ("sleep", "5")


def test_without_a_shell_in_the_image_the_command_is_run_as_it_is():
    inv = _inv(_rt(has_sh=False))
    assert inv.command == ("sleep", "5")
    assert inv.head[4] == "--" and "--in-shell" not in inv.head


def test_empty_arguments_still_travel_in_nsdf_hpc_argv_under_the_shell():
    inv = _inv(_rt(has_sh=False), command=("printf", "%s|", "", "x"))
    assert inv.command[:2] == ("/bin/sh", "-c") and inv.command[3:] == ("sh",)
    assert inv.command[2].startswith('eval "set -- $NSDF_HPC_ARGV"; unset NSDF_HPC_ARGV; unset SHLVL PWD; trap ')
    assert inv.container_env["NSDF_HPC_ARGV"] == "printf '%s|' '' x"


def test_no_relay_without_a_python_to_run_it():
    inv = _inv(_rt(python=None))
    assert inv.argv[0] == "/opt/bin/udocker"
    assert inv.blocked_signals == ()


def test_the_relay_starts_with_the_signals_it_passes_on_blocked():
    assert _inv(_rt()).blocked_signals == RELAY_SIGNALS
    relayed = runpy.run_path(RELAY)["RELAYED"]   # the script's own list (it is not imported by nsdf_hpc)
    assert sorted(int(getattr(signal, n)) for n in RELAY_SIGNALS) == sorted(int(s) for s in relayed)


def _exec_relay(command, pending=None):
    """The relay exec'd as the launch record does (``_launch._exec``, its signals blocked),
    with the signal ``pending`` sent to it before the exec (while "its interpreter starts")."""
    code = ("import os, signal\nfrom nsdf_hpc import _launch\n"
            f"signal.pthread_sigmask(signal.SIG_BLOCK, [{int(pending or 0)}] if {bool(pending)} else [])\n"
            f"if {bool(pending)}: os.kill(os.getpid(), {int(pending or 0)})\n"
            f"_launch._exec({[sys.executable, '-I', '-S', RELAY, '--', *command]!r}, dict(os.environ), "
            f"{list(RELAY_SIGNALS)!r})\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_that_came_while_the_relay_started_ends_it_before_anything_runs(sig, tmp_path):
    """CI, 2026-12-02: a SIGINT while the relay's interpreter started was printed as a
    KeyboardInterrupt and lost, and the container ran on. Blocked, it waits for the relay,
    which then starts nothing and ends as the signal would have ended it."""
    marker = tmp_path / "ran"
    r = _exec_relay(["/bin/sh", "-c", f"touch {marker}"], pending=sig)
    assert r.returncode == 128 + sig, r.stderr
    assert not marker.exists() and r.stderr == f"\nnsdf-run: interrupted by {signal.Signals(sig).name}\n"


def test_a_sigint_the_interpreter_passed_over_at_start_ends_the_relay(tmp_path):
    """Started without its signals blocked (a batch script), a SIGINT while the interpreter
    started can be printed and passed over by CPython, which keeps it in ``sys.last_value``."""
    marker = tmp_path / "ran"
    code = ("import runpy, sys\nsys.last_value = KeyboardInterrupt()\n"
            f"raise SystemExit(runpy.run_path({RELAY!r})['main'](['relay', '--', 'touch', {str(marker)!r}]))\n")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], timeout=30)
    assert r.returncode == 130 and not marker.exists()


def test_the_command_behind_the_relay_starts_with_no_signal_blocked(tmp_path):
    out = tmp_path / "sigblk"
    r = _exec_relay([sys.executable, "-I", "-S", "-c",
                     f"open({str(out)!r}, 'w').write([l for l in open('/proc/self/status') if 'SigBlk' in l][0])"])
    assert r.returncode == 0, r.stderr
    assert int(out.read_text().split()[1], 16) == 0


@pytest.mark.parametrize("script, rc", [("exit 3", 3), ("kill -TERM $$", 143), ("kill -KILL $$", 137)])
def test_relay_exits_with_its_childs_status(script, rc):
    r = subprocess.run([sys.executable, "-I", "-S", RELAY, "--", "/bin/sh", "-c", script], timeout=30)
    assert r.returncode == rc


def test_relay_without_a_command_is_a_usage_error():
    r = subprocess.run([sys.executable, "-I", "-S", RELAY], capture_output=True, text=True, timeout=30)
    assert r.returncode == 125 and "usage" in r.stderr


def _store(tmp_path, sh: str = "relative"):
    """A udocker container directory as `udocker create` leaves it (merged /usr)."""
    root = tmp_path / "udocker" / "containers" / NATIVE.location / "ROOT"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    if sh == "relative":
        (root / "usr" / "bin" / "dash").write_text("")
        (root / "usr" / "bin" / "sh").symlink_to("dash")
    elif sh == "absolute":   # resolved inside ROOT, not on the host (which has /bin/dash)
        (root / "usr" / "bin" / "sh").symlink_to("/bin/dash")
    elif sh == "loop":
        (root / "usr" / "bin" / "sh").symlink_to("sh")
    return {"UDOCKER_DIR": str(tmp_path / "udocker")}


@pytest.mark.parametrize("sh, expected", [("relative", True), ("absolute", False), ("none", False),
                                          ("loop", False)])
def test_the_store_says_whether_the_image_has_a_shell(tmp_path, sh, expected):
    """The cold pull reads /bin/sh from the container's ROOT instead of starting udocker, and
    gives the answer the run acts on (the in-container shell or not)."""
    env = _store(tmp_path, sh)
    ctx = RuntimeContext(1000, 1000, "alice", which=lambda n: None, python="/py/bin/python3")
    rt = UDocker("/opt/bin/udocker", None, "1.3.17", ctx)
    assert rt.store_has_shell(NATIVE.location, env) is expected
    inv = rt.run_invocation(RunSpec(image="busybox", bind_cwd=False, command=("true",)), NATIVE, {},
                            {**HOST, **env})
    assert (inv.command[0] == "/bin/sh") is expected


def test_a_container_not_created_yet_is_left_to_the_probe(tmp_path):
    rt = _rt()
    assert rt.store_has_shell(NATIVE.location, {"UDOCKER_DIR": str(tmp_path)}) is None
    assert rt.store_has_shell(NATIVE.location, {}) is None
