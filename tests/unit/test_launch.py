"""Launch records (the fast path of `nsdf-run run`): what invalidates them, and how the
container environment is rebuilt per call."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsdf_hpc import _launch
from nsdf_hpc.environment import DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, EnvEncoding
from nsdf_hpc.runtimes.base import Invocation

ARGS = ["run", "--runtime", "podman", "img", "--", "printf", "%s", "a b"]


@pytest.fixture
def env(tmp_path: Path) -> dict:
    return {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PATH": "/usr/bin:/bin",
            "NSDF_HPC_SITE_CONFIG": str(tmp_path / "site.toml"), "NSDF_HPC_CONFIG": str(tmp_path / "user.toml"),
            "SLURM_PROCID": "0", "PYTHONPATH": "/leak"}


def _inv(binary: Path) -> Invocation:
    # argv: binary run --rm -e SLURM_PROCID=0 -e X=1 img printf %s "a b"
    return Invocation((str(binary), "run", "--rm"), ("img",), ("printf", "%s", "a b"),
                      {"PATH": "/usr/bin:/bin", "HOME": "/h"}, EnvEncoding("argv", flag="-e"),
                      {"SLURM_PROCID": "0", "X": "1"}, {"X": "1"})


def _save(env: dict, tmp_path: Path, expires: float = 2e9) -> Path:
    binary = tmp_path / "podman"
    binary.write_text("#!/bin/sh\n")
    (tmp_path / "user.toml").write_text("")
    _launch.save(ARGS, env, "/work", _inv(binary), DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY,
                 [str(binary)], expires)
    return binary


def test_round_trip_rebuilds_the_container_env_per_call(env: dict, tmp_path: Path) -> None:
    binary = _save(env, tmp_path)
    argv, penv, mkdirs = _launch.load(ARGS, {**env, "SLURM_PROCID": "7"}, "/work")
    assert argv[:3] == [str(binary), "run", "--rm"] and argv[-4:] == ["img", "printf", "%s", "a b"]
    pairs = argv[3:-4]
    assert pairs[0::2] == ["-e"] * (len(pairs) // 2)
    assert pairs[1::2] == [f"HOME={env['HOME']}", "SLURM_PROCID=7", "X=1"]   # host order, explicit last
    assert penv == {"PATH": "/usr/bin:/bin", "HOME": "/h"} and mkdirs == []


def test_volatile_and_allowlisted_variables_do_not_change_the_key(env: dict) -> None:
    k = _launch.launch_key(ARGS, env, "/work")
    assert _launch.launch_key(ARGS, {**env, "_": "/x", "OLDPWD": "/y", "SLURM_PROCID": "3", "OMPI_X": "1"}, "/work") == k


@pytest.mark.parametrize("change", [
    {"PATH": "/other"}, {"PYTHONPATH": "/other"}, {"NSDF_HPC_CACHE": "/c"}, {"HOME": "/h2"},
    {"SLURM_JOB_ID": "12"},
])
def test_planning_inputs_change_the_key(env: dict, change: dict) -> None:
    assert _launch.launch_key(ARGS, {**env, **change}, "/work") != _launch.launch_key(ARGS, env, "/work")


def test_other_args_or_directory_change_the_key(env: dict) -> None:
    k = _launch.launch_key(ARGS, env, "/work")
    assert _launch.launch_key(ARGS + ["x"], env, "/work") != k
    assert _launch.launch_key(ARGS, env, "/elsewhere") != k


def test_the_key_tells_word_boundaries_apart(env: dict) -> None:
    """Each word is keyed with its length: ["a b"] is not ["a", "b"], nor an empty word
    before "command" the slot of any command (which starts with a NUL)."""
    keys = {_launch.launch_key(args, env, "/work") for args in
            (["run", "a b"], ["run", "a", "b"], ["run", "ab"], ["run", "", "command"], ["run", _launch.COMMAND_SLOT])}
    assert len(keys) == 5


@pytest.mark.parametrize("content", [b"", b"not marshal", b"\xff" * 64, b"{\xda\x01a", "marshal of a list"])
def test_a_damaged_record_file_goes_to_planning(env: dict, tmp_path: Path, content) -> None:
    """A truncated or foreign file where a record should be: planned, never an error."""
    import marshal
    _save(env, tmp_path)
    (record,) = Path(_launch.record_dir(env)).glob(f"*{_launch.SUFFIX}")
    record.write_bytes(marshal.dumps(["format", 9]) if content == "marshal of a list" else content)
    assert _launch.load(ARGS, env, "/work") is None


def test_invalidated_by_a_changed_file_config_or_expiry(env: dict, tmp_path: Path) -> None:
    binary = _save(env, tmp_path)
    assert _launch.load(ARGS, env, "/work") is not None
    os.utime(binary, ns=(1, 1))
    assert _launch.load(ARGS, env, "/work") is None
    _save(env, tmp_path)
    (tmp_path / "user.toml").write_text("runtime = 'udocker'\n")   # the config changed
    assert _launch.load(ARGS, env, "/work") is None
    _save(env, tmp_path, expires=1.0)
    assert _launch.load(ARGS, env, "/work") is None


def test_denylisted_host_variables_never_enter(env: dict, tmp_path: Path) -> None:
    _save(env, tmp_path)
    argv, _, _ = _launch.load(ARGS, {**env, "VIRTUAL_ENV": "/v"}, "/work") or ([], {}, [])
    assert not any("PYTHONPATH" in a or "VIRTUAL_ENV" in a for a in argv)


def test_prefix_mode_escapes_only_without_no_eval(env: dict, tmp_path: Path) -> None:
    binary = tmp_path / "apptainer"
    binary.write_text("")
    inv = Invocation((str(binary), "exec"), ("x.sif",), ("true",), {"PATH": "/bin"},
                     EnvEncoding("prefix", prefix="APPTAINERENV_", escape=True), {"V": "$x"}, {"V": "$x"})
    assert inv.env["APPTAINERENV_V"] == "\\$x"
    _launch.save(ARGS, env, "/w", inv, DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, [str(binary)], 2e9)
    _, penv, _ = _launch.load(ARGS, env, "/w")
    assert penv["APPTAINERENV_V"] == "\\$x" and penv["APPTAINERENV_SLURM_PROCID"] == "0"


def test_fast_path_never_runs_for_dry_run_or_help(monkeypatch: pytest.MonkeyPatch) -> None:
    called = []
    monkeypatch.setattr(_launch, "load", lambda *a: called.append(a))
    _launch.try_fast_run(["run", "--dry-run", "img", "--", "true"])
    _launch.try_fast_run(["pull", "img"])
    assert called == []


@pytest.mark.parametrize("creates, expected", [(False, None), (True, 125)])
def test_a_guarded_record_whose_runtime_failed_before_a_container_existed_is_dropped(
        env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, creates: bool, expected) -> None:
    """podman 125 with an empty --cidfile: nothing ran (the image left its store), so the
    planned path takes over (None); 125 after the container existed is the command's own."""
    from nsdf_hpc.runtimes.base import OrphanGuard
    binary = tmp_path / "podman"
    # the fake podman writes its --cidfile (the word after it) only when `creates`
    binary.write_text("#!/bin/sh\nwhile [ $# -gt 0 ]; do\n"
                      + ('  if [ "$1" = --cidfile ]; then echo abc > "$2"; fi\n' if creates else "")
                      + "  shift\ndone\nexit 125\n")
    binary.chmod(0o755)
    (tmp_path / "user.toml").write_text("")
    guard = OrphanGuard(("--name", _launch.GUARD_NAME, "--cidfile", _launch.GUARD_PATH),
                        (str(binary), "rm", _launch.GUARD_NAME), _launch.GUARD_PATH)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "environ", dict(env))
    key = _launch.launch_key(ARGS, env, str(tmp_path))
    _launch.save(ARGS, env, str(tmp_path), _inv(binary), DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY,
                 [str(binary)], 2e9, guard=guard)
    record = Path(_launch.record_dir(env)) / f"{key}{_launch.SUFFIX}"
    assert record.is_file()
    assert _launch.try_fast_run(ARGS) == expected
    assert record.exists() is creates


def test_a_record_serves_any_command_after_the_same_arguments(env: dict, tmp_path: Path) -> None:
    binary = tmp_path / "podman"
    binary.write_text("#!/bin/sh\n")
    (tmp_path / "user.toml").write_text("")
    inv = _inv(binary)
    _launch.save(ARGS, env, "/work", inv, DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, [str(binary)], 2e9,
                 command_at=1)
    other = [*ARGS[:ARGS.index("--") + 1], "echo", "$(x)", "--", "-e"]
    argv, _, _ = _launch.load(other, env, "/work")
    assert argv[-5:] == ["img", "echo", "$(x)", "--", "-e"]
    assert _launch.load(ARGS[:ARGS.index("--") + 1], env, "/work") is None   # no command: plans
    assert _launch.load([*ARGS[:2], "apptainer", *ARGS[3:]], env, "/work") is None


def test_a_command_that_is_not_the_words_after_the_separator_keeps_an_exact_record(
        env: dict, tmp_path: Path) -> None:
    binary = tmp_path / "podman"
    binary.write_text("#!/bin/sh\n")
    (tmp_path / "user.toml").write_text("")
    _launch.save(ARGS, env, "/work", _inv(binary), DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, [str(binary)],
                 2e9, command_at=2)   # would say the command is ("%s", "a b"): not what follows --
    assert _launch.load(ARGS, env, "/work") is not None
    assert _launch.load([*ARGS[:-1], "other"], env, "/work") is None


@pytest.mark.parametrize("args, want", [
    (["run", "-e", "A=1", "--env", "B=x=y", "--env=C=", "-eD=4", "img", "--", "-e", "Z=9"],
     [(2, "A", "", "1"), (4, "B", "", "x=y"), (5, "C", "--env=", ""), (6, "D", "-e", "4")]),
    (["run", "--runtime-arg", "-e", "img", "--", "true"], []),        # a value, not the option
    (["run", "-B", "/a:/b", "-w", "/w", "--platform", "linux/amd64", "-e", "A=1", "img"], [(8, "A", "", "1")]),
    (["run", "-e", "NOEQUALS", "img"], None),
    (["run", "-e"], None),
])
def test_env_options_reads_the_env_values_before_the_image(args, want) -> None:
    assert _launch.env_options(args) == want


ENV_ARGS = ["run", "--runtime", "charliecloud", "-e", "X=1", "img", "--", "printf", "%s", "a b"]


def _save_template(env: dict, tmp_path: Path) -> Path:
    """A record as ``Client.env_template`` makes it: X's value in the container environment
    and in one ``--set-env=X=VALUE`` word (charliecloud), both given by a mark."""
    binary = tmp_path / "ch-run"
    binary.write_text("#!/bin/sh\n")
    (tmp_path / "user.toml").write_text("")
    mark = "NSDFVALUEabcN0"
    real = Invocation((str(binary), "--set-env=X=1"), ("img", "--"), ("printf", "%s", "a b"), {},
                      EnvEncoding("process"), {"X": "1"}, {"X": "1"})
    template = Invocation((str(binary), f"--set-env=X={mark}"), ("img", "--"), ("printf", "%s", "a b"), {},
                          EnvEncoding("process"), {"X": mark}, {"X": mark})
    _launch.save(ENV_ARGS, env, "/work", real, DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, [str(binary)], 2e9,
                 command_at=2, marks={mark: "X"}, template=template)
    return binary


@pytest.mark.parametrize("value", ["2", "with space", "ünï", "a=b", "", "$HOME-in-env-only"])
def test_a_record_with_marks_serves_any_value_of_the_same_variables(env: dict, tmp_path: Path, value) -> None:
    binary = _save_template(env, tmp_path)
    args = [*ENV_ARGS[:4], f"X={value}", *ENV_ARGS[5:7], "echo", "hi"]
    got = _launch.load(args, env, "/work")
    if "$" in value:            # a runtime word takes the value: a quote or `$` needs planning
        assert got is None
        return
    assert got is not None
    argv, penv, _ = got
    assert argv == [str(binary), f"--set-env=X={value}", "img", "--", "echo", "hi"]
    assert penv["X"] == value and not any("NSDFVALUE" in w for w in [*argv, *penv.values()])


@pytest.mark.parametrize("args", [
    [*ENV_ARGS[:3], "-e", "Y=1", *ENV_ARGS[5:]],                         # another name: another plan
    [*ENV_ARGS[:3], "-e", "X=new\nline", *ENV_ARGS[5:]],                 # a control character
    [*ENV_ARGS[:3], "-e", "X=q'uote", *ENV_ARGS[5:]],                    # a quote in a runtime word
    [*ENV_ARGS[:3], "-e", "X=\udcff", *ENV_ARGS[5:]],                    # not valid text
    [*ENV_ARGS[:3], "-e", "X=1", "-e", "Y=2", *ENV_ARGS[5:]],            # one more variable
])
def test_a_value_or_name_the_record_cannot_take_goes_to_planning(env: dict, tmp_path: Path, args) -> None:
    _save_template(env, tmp_path)
    assert _launch.load(ENV_ARGS, env, "/work") is not None
    assert _launch.load(args, env, "/work") is None


@pytest.mark.parametrize("args, want", [
    (["run", "-B", "/a:/b", "--bind", "/c", "--bind=/d:/e:ro", "-B/f", "-e", "A=1", "img", "--", "-B", "/x"],
     [(2, "", "/a:/b"), (4, "", "/c"), (5, "--bind=", "/d:/e:ro"), (6, "-B", "/f")]),
    (["run", "--runtime-arg", "-B", "img", "--", "true"], []),         # a value, not the option
    (["run", "-e", "-B", "img"], []),
    (["run", "-B"], []),
])
def test_bind_options_reads_the_bind_values_before_the_image(args, want) -> None:
    assert _launch.bind_options(args) == want


def _save_bind_template(env: dict, tmp_path: Path) -> Path:
    """A record as ``Client.binds_template`` makes it for udocker: the bind in one ``-v`` word
    and its destination's mount point in the container's ROOT, both given by marks."""
    binary = tmp_path / "udocker"
    binary.write_text("#!/bin/sh\n")
    (tmp_path / "user.toml").write_text("")
    (tmp_path / "d1").mkdir()
    s, t = "/NSDFBINDabcS0X", "/NSDFBINDabcT0X"
    real = Invocation((str(binary), "-v", f"{tmp_path}/d1:/data"), ("img",), ("cat", "/data/f"), {},
                      EnvEncoding("process"), {}, {}, (f"{tmp_path}/ROOT/data",))
    template = Invocation((str(binary), "-v", f"{s}:{t}"), ("img",), ("cat", "/data/f"), {},
                          EnvEncoding("process"), {}, {}, (f"{tmp_path}/ROOT{t}",))
    _launch.save(["run", "-B", f"{tmp_path}/d1:/data", "img", "--", "cat", "/data/f"], env, "/work", real,
                 DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, [str(binary)], 2e9, command_at=1,
                 marks={s: "-B0:source", t: "-B0:target"}, template=template)
    return binary


def test_a_record_with_bind_marks_serves_any_directory_at_any_destination(env: dict, tmp_path: Path) -> None:
    binary = _save_bind_template(env, tmp_path)
    (tmp_path / "d 2").mkdir()
    for bind, source, target in ((f"{tmp_path}/d1:/data", f"{tmp_path}/d1", "/data"),
                                 (f"{tmp_path}/d 2/:/elsewhere//x", f"{tmp_path}/d 2", "/elsewhere/x"),
                                 (f"{tmp_path}/d 2", f"{tmp_path}/d 2", f"{tmp_path}/d 2")):
        got = _launch.load(["run", "-B", bind, "img", "--", "ls"], env, "/work")
        assert got is not None, bind
        argv, _, points = got
        assert argv == [str(binary), "-v", f"{source}:{target}", "img", "ls"]
        assert points == [(f"{tmp_path}/ROOT{target}", False)]


@pytest.mark.parametrize("bind", [
    "{t}/d1:/data:ro",          # another mode: another record
    "{t}/nope:/data",           # no such directory: planning says so
    "{t}/file:/data",           # a file: its mount point is a file, planned
    "{t}/d1:/work",             # the current directory's own bind is planned
    "{t}/d1:/",
    "{t}/d1:/a,b",              # Apptainer plans a ',' as a --mount
    "{t}/d1:/a=b", "{t}/d1:/q'uote", "{t}/d1:/new\nline", "{t}/d1:/\udcff",
    "{t}/d1:rel",               # not absolute: planning gives the error
])
def test_a_bind_the_record_cannot_take_goes_to_planning(env: dict, tmp_path: Path, bind: str) -> None:
    _save_bind_template(env, tmp_path)
    (tmp_path / "file").write_text("")
    assert _launch.load(["run", "-B", f"{tmp_path}/d1:/x", "img", "--", "true"], env, "/work") is not None
    assert _launch.load(["run", "-B", bind.format(t=tmp_path), "img", "--", "true"], env, "/work") is None
    # one bind more or fewer is another command line
    assert _launch.load(["run", "-B", f"{tmp_path}/d1", "-B", f"{tmp_path}/d1:/y", "img", "--", "true"],
                        env, "/work") is None
    assert _launch.load(["run", "img", "--", "true"], env, "/work") is None


def test_a_record_of_the_sources_serves_other_directories_at_the_same_destination(env: dict, tmp_path: Path) -> None:
    binary = tmp_path / "ch-run"
    binary.write_text("#!/bin/sh\n")
    (tmp_path / "user.toml").write_text("")
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
    s = "/NSDFBINDabcS0X"
    real = Invocation((str(binary), f"--bind={tmp_path}/d1:/data"), ("img", "--"), ("true",), {},
                      EnvEncoding("process"), {}, {})
    template = Invocation((str(binary), f"--bind={s}:/data"), ("img", "--"), ("true",), {},
                          EnvEncoding("process"), {}, {})
    _launch.save(["run", "-B", f"{tmp_path}/d1:/data", "img", "--", "true"], env, "/work", real,
                 DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, [str(binary)], 2e9, command_at=2,
                 marks={s: "-B0:source"}, template=template)
    got = _launch.load(["run", "-B", f"{tmp_path}/d2:/data", "img", "--", "ls"], env, "/work")
    assert got is not None and got[0] == [str(binary), f"--bind={tmp_path}/d2:/data", "img", "--", "ls"]
    assert _launch.load(["run", "-B", f"{tmp_path}/d2:/other", "img", "--", "ls"], env, "/work") is None
    assert _launch.load(["run", "-B", f"{tmp_path}/d2:/data:ro", "img", "--", "ls"], env, "/work") is None
    assert _launch.load(["run", "-B", f"{tmp_path}/file:/data", "img", "--", "ls"], env, "/work") is None


def test_ctrl_c_while_a_record_is_read_ends_with_130_and_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Before the CLI installs its handlers nothing was started: a Ctrl-C then (Python's own
    KeyboardInterrupt) ends nsdf-run as the CLI ends it, not with a traceback and 1."""
    from nsdf_hpc import _entry

    def interrupted(args, noted):
        raise KeyboardInterrupt
    monkeypatch.setattr(_launch, "try_fast_run", interrupted)
    monkeypatch.delenv("NSDF_HPC_NO_FAST_PATH", raising=False)
    assert _entry.main(["run", "img", "--", "true"]) == 130
    assert capsys.readouterr().err == "\nnsdf-run: interrupted by SIGINT\n"


def test_a_sigint_the_interpreter_passed_over_at_start_ends_with_130(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """CPython prints a KeyboardInterrupt raised while it checks the script's path and goes
    on (``sys.last_value`` keeps it): nsdf-run must not start the container then."""
    from nsdf_hpc import _entry

    def must_not_run(args, noted):
        raise AssertionError("a run started after the SIGINT")
    monkeypatch.setattr(_launch, "try_fast_run", must_not_run)
    monkeypatch.setattr(sys, "last_value", KeyboardInterrupt(), raising=False)
    monkeypatch.setattr(sys, "argv", ["nsdf-run", "run", "img", "--", "true"])
    monkeypatch.delenv("NSDF_HPC_NO_FAST_PATH", raising=False)
    assert _entry.main() == 130
    assert capsys.readouterr().err == "nsdf-run: interrupted by SIGINT\n"


def _record_that_touches(env: dict, tmp_path: Path) -> Path:
    """A launch record (no guard, no hold: it execs) whose "runtime" only creates a marker."""
    marker = tmp_path / "ran"
    binary = tmp_path / "podman"
    binary.write_text(f"#!/bin/sh\ntouch {marker}\n")
    binary.chmod(0o755)
    (tmp_path / "user.toml").write_text("")
    _launch.save(ARGS, env, str(tmp_path), _inv(binary), DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, [str(binary)], 2e9)
    return marker


@pytest.mark.parametrize("passed_over", [True, False])
def test_a_sigint_python_passed_over_in_a_finalizer_starts_nothing(env: dict, tmp_path: Path,
                                                                    passed_over: bool) -> None:
    """A KeyboardInterrupt raised while Python runs a finalizer or a weakref callback (the
    import system's module locks, measured: 2 of 500 SIGINTs in nsdf-run's first 30 ms) is
    printed ("Exception ignored in") and the program goes on. The fast path then exec'd the
    runtime as if never interrupted. ``_entry`` notes the SIGINT, and nothing starts."""
    marker = _record_that_touches(env, tmp_path)
    code = f"""
import os, signal, sys
from nsdf_hpc import _entry, _launch   # this checkout's (sys.path has the directory it starts in)
os.environ.clear(); os.environ.update({env!r}); os.chdir({str(tmp_path)!r})
real = _launch._valid_record
class Finalized:
    def __del__(self):
        signal.raise_signal(signal.SIGINT)
def valid_record(*args):
    if {passed_over!r}:
        Finalized()   # the handler's KeyboardInterrupt is raised in __del__: printed, passed over
    return real(*args)
_launch._valid_record = valid_record
sys.exit(_entry.main({ARGS!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    if passed_over:
        assert "Exception ignored in" in r.stderr and "KeyboardInterrupt" in r.stderr, r.stderr
        assert r.returncode == 130 and r.stderr.endswith("nsdf-run: interrupted by SIGINT\n"), r.stderr
        assert not marker.exists()
    else:   # the same record runs when nothing interrupted it
        assert r.returncode == 0 and marker.exists(), r.stderr
