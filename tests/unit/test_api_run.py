"""``nsdf_hpc.run()`` from a launch record (``_launch.try_api_run``) and its pydantic-free
``RunResult``; the record's captured spawn on real processes of the host (its KeyboardInterrupt:
``test_captured_runs.py``)."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest

from nsdf_hpc import _launch
from nsdf_hpc._result import RunResult

IMAGE_DATA = {"runtime": "charliecloud", "source": "busybox", "digest": "sha256:" + "a" * 64,
              "location": "/cache/x.sqfs", "size": 5, "cached": True, "shell": True, "platform": "linux/amd64",
              "present": {"/mnt": "d"}}


def test_run_result_is_frozen_compared_by_value_and_pickles() -> None:
    a = RunResult(returncode=3, stdout="o", stderr="e", argv=["ch-run", "x"], runtime="charliecloud")
    b = RunResult(returncode=3, stdout="o", stderr="e", argv=("ch-run", "x"), runtime="charliecloud")
    assert a == b and hash(a) == hash(b) and a.argv == ("ch-run", "x") and not a.ok
    assert a != RunResult(returncode=0, stdout="o", stderr="e", argv=("ch-run", "x"), runtime="charliecloud")
    with pytest.raises(AttributeError, match="frozen"):
        a.returncode = 0   # type: ignore[misc]
    with pytest.raises(AttributeError, match="frozen"):
        del a.stdout
    with pytest.raises(TypeError):
        RunResult(3)   # type: ignore[misc]   # keywords only, as the models
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a).startswith("RunResult(returncode=3, stdout='o', stderr='e', argv=('ch-run', 'x')")


def test_run_result_builds_its_image_from_a_records_copy_on_first_use() -> None:
    from nsdf_hpc.models import NativeImage
    lazy = RunResult(returncode=0, runtime="charliecloud", image_data=dict(IMAGE_DATA))
    given = RunResult(returncode=0, runtime="charliecloud", image=NativeImage(**IMAGE_DATA))
    assert lazy.image == given.image and isinstance(lazy.image, NativeImage) and lazy.image is lazy.image
    assert lazy == given and lazy.ok
    assert lazy.model_dump()["image"] == given.image.model_dump() and lazy.model_dump()["argv"] == ()
    assert pickle.loads(pickle.dumps(lazy)) == given
    assert RunResult(returncode=1).image is None and RunResult(returncode=1).model_dump()["image"] is None


def test_run_and_its_result_import_no_pydantic_until_the_image_is_read() -> None:
    code = textwrap.dedent("""
        import sys
        import nsdf_hpc
        nsdf_hpc.run, nsdf_hpc.RunResult
        before = "pydantic" in sys.modules
        r = nsdf_hpc.RunResult(returncode=0, image_data={"runtime": "x", "source": "s", "location": "/l"})
        middle = "pydantic" in sys.modules
        r.image
        print(before, middle, "pydantic" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False", "True"]


def test_api_args_key_a_call_apart_from_any_command_line() -> None:
    args = _launch.api_args("img:1", ["sh", "-c", "x"], "apptainer", "/w", {"A": "1", "B": "x=y"}, ["/d:/mnt:ro"])
    assert args == ["run", "--runtime", "apptainer", "-e", "A=1", "-e", "B=x=y", "-B", "/d:/mnt:ro", "img:1",
                    _launch.API_MARK, os.getcwd(), "/w", "--", "sh", "-c", "x"]
    assert "\x00" in _launch.API_MARK, "no nsdf-run command line has it"
    # read as the CLI's options are: the record serves any command, value and bind directory
    assert [(n, v) for _, n, _, v in _launch.env_options(args) or []] == [("A", "1"), ("B", "x=y")]
    assert [v for _, _, v in _launch.bind_options(args)] == ["/d:/mnt:ro"]
    assert _launch._record_args(args, 0)[-1] == _launch.COMMAND_SLOT
    assert _launch.api_args("img:1", ["true"], None, None, ["A=1"]) == \
        ["run", "-e", "A=1", "img:1", _launch.API_MARK, os.getcwd(), "", "--", "true"]
    for bad in ({"image": "img\x00"}, {"command": ["a\x00b"]}, {"command": ["sleep", 5]}, {"command": [b"true"]},
                {"cwd": "relative"}, {"env": {"A": 1}}, {"env": "A=1"}, {"binds": "/d:/mnt"},
                {"binds": [object()]}):
        call = {"image": "img", "command": ["true"], "runtime": None, "cwd": None, "env": None, "binds": None, **bad}
        assert _launch.api_args(**call) is None, bad


def test_no_record_or_no_fast_path_leaves_the_call_to_the_planner(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NSDF_HPC_CACHE", str(tmp_path))
    assert _launch.try_api_run(_launch.api_args("img:1", ["true"], "charliecloud")) is None
    monkeypatch.setenv("NSDF_HPC_NO_FAST_PATH", "1")
    assert _launch.try_api_run(_launch.api_args("img:1", ["true"], "charliecloud")) is None


def test_spawn_capture_gives_status_output_and_a_fresh_start() -> None:
    code, out, err = _launch._spawn_capture(  # type: ignore[misc]
        ["/bin/sh", "-c", 'printf "o\\377"; printf e >&2; read x; echo "[$x]" >&2; exit 7'], dict(os.environ))
    assert (code, out, err) == (7, "o\udcff", "e[]\n"), "stdin is /dev/null; bytes kept as surrogates"
    # grep changes no signal disposition or mask: what it shows is what the runtime starts with
    code, out, _ = _launch._spawn_capture(  # type: ignore[misc]
        ["/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"], dict(os.environ), ["SIGUSR1"])
    status = dict(line.split() for line in out.splitlines())
    assert code == 0
    assert not int(status["SigIgn:"], 16) & (1 << (signal.SIGPIPE - 1)), "SIGPIPE at its default"
    assert int(status["SigBlk:"], 16) == 1 << (signal.SIGUSR1 - 1), "the record's blocked signals blocked"
    code, out, _ = _launch._spawn_capture(  # type: ignore[misc]
        [sys.executable, "-I", "-S", "-c", "import os; print(os.getsid(0) == os.getpid())"], dict(os.environ))
    assert (code, out) == (0, "True\n"), "its own session: an exception here ends its whole tree"
    assert _launch._spawn_capture(["/bin/sh", "-c", "kill -TERM $$"], dict(os.environ))[0] == 128 + signal.SIGTERM  # type: ignore[index]
    assert _launch._spawn_capture(["/no/such/runtime"], dict(os.environ)) is None


def test_none_for_binds_and_env_means_none(tmp_path) -> None:
    """``run(IMG, cmd, binds=None)`` was a TypeError ('NoneType' object is not iterable)."""
    from nsdf_hpc.client import Client
    spec = Client(env={"HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path)}).spec(
        "busybox", ["true"], binds=None, env=None, cwd="/")
    assert (spec.binds, dict(spec.env)) == ((), {})
