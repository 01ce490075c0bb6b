"""CLI error paths through click's CliRunner: bad input exits 2 with one clear line."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from nsdf_hpc import __version__
from nsdf_hpc._entry import main as entry_main
from nsdf_hpc.cli import cli
from nsdf_hpc.cli._common import AGE, SIZE


@pytest.fixture
def invoke(tmp_path, monkeypatch):
    empty = tmp_path / "emptybin"
    empty.mkdir()
    env = {"HOME": str(tmp_path / "home"), "PATH": str(empty), "NSDF_HPC_CACHE": str(tmp_path / "cache"),
           "NSDF_HPC_SITE_CONFIG": str(tmp_path / "no-site.toml"), "NSDF_HPC_RUNTIME": None,
           "NSDF_HPC_CONFIG": None, "XDG_CONFIG_HOME": None, "SLURM_JOB_ID": None}
    monkeypatch.chdir(tmp_path)

    def run(*args: str):
        return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return run


def test_version(invoke, capsys):
    res = invoke("--version")
    assert res.exit_code == 0 and res.output == f"nsdf-run, version {__version__}\n"
    entry_main(["--version"])                    # the fast path of the console script
    assert capsys.readouterr().out == f"nsdf-run, version {__version__}\n"


@pytest.mark.parametrize("bind,message", [
    ("/a:/b:rx", "option must be 'ro' or 'rw'"),
    ("/a:relative", "must be absolute"),
    (":/x", "empty source"),
    ("/a:/b:ro:extra", "expected SRC[:DST[:ro|rw]]"),
])
def test_malformed_bind_exits_2(invoke, bind, message):
    res = invoke("run", "--bind", bind, "ubuntu", "--", "true")
    assert res.exit_code == 2, res.output
    assert "nsdf-run: error: invalid --bind" in res.output and message in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("env,message", [
    ("NOVALUE", "expected NAME=VALUE"),
    ("1BAD=x", "invalid environment variable name '1BAD'"),
    ("A B=x", "invalid environment variable name 'A B'"),
])
def test_malformed_env_exits_2(invoke, env, message):
    res = invoke("run", "-e", env, "ubuntu", "--", "true")
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_hostile_env_value_is_not_an_error(invoke):
    # accepted by the parser; fails later only because nothing can run here (no runtime)
    res = invoke("run", "--runtime", "dockr", "-e", "A=$(rm -rf /);`x`,y=z", "ubuntu", "--", "true")
    assert res.exit_code == 2 and "unknown runtime 'dockr'" in res.output


@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_unknown_runtime_exits_2(invoke, dry):
    res = invoke("run", "--runtime", "dockr", *dry, "ubuntu", "--", "true")
    assert res.exit_code == 2, res.output
    assert "unknown runtime 'dockr'" in res.output and "known: apptainer" in res.output


def test_unknown_runtime_from_the_environment_exits_2(invoke, tmp_path):
    res = CliRunner().invoke(cli, ["runtimes"], env={
        "HOME": str(tmp_path), "PATH": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "c"),
        "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none.toml"), "NSDF_HPC_RUNTIME": "dockr"})
    # `runtimes` reports the problem instead of failing: it is a diagnosis command
    assert res.exit_code == 0 and "unknown runtime 'dockr'" in res.output


def test_malformed_image_reference_exits_2(invoke):
    res = invoke("run", "--dry-run", "Ubuntu:22.04", "--", "true")
    assert res.exit_code == 2 and "repository names are lowercase" in res.output


def test_missing_command_is_a_usage_error(invoke):
    res = CliRunner().invoke(cli, ["run", "ubuntu"])
    assert res.exit_code == 2 and "Missing argument" in res.output


def test_prune_needs_a_criterion(invoke):
    res = invoke("prune")
    assert res.exit_code == 2 and "--older-than" in res.output
    res = invoke("prune", "--older-than", "soon")
    assert res.exit_code == 2 and "invalid age 'soon'" in res.output


@pytest.mark.parametrize("option,value", [
    ("--max-size", "-5G"), ("--max-size", "-1"), ("--max-size", "10Q"), ("--max-size", ""),
    ("--max-size", "nan"), ("--max-size", "nanG"), ("--max-size", "inf"), ("--max-size", "1e400G"),
    ("--max-size", "9e18"), ("--older-than", "-1d"), ("--older-than", "-5"), ("--older-than", ""),
    ("--older-than", "nan"), ("--older-than", "infd"), ("--older-than", "1e400w"),
])
def test_absurd_prune_values_are_usage_errors(invoke, option, value):
    """Issue 14: `prune --max-size -5G` emptied the cache. Now click refuses it (exit 2)."""
    res = invoke("prune", option, value)
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.output and "Traceback" not in res.output
    assert "removed" not in res.output


@pytest.mark.parametrize("text,size", [("0", 0), ("500M", 500 << 20), ("10G", 10 << 30), ("10GiB", 10 << 30),
                                       ("1.5k", 1536), ("4096", 4096), ("2tb", 2 << 40)])
def test_sizes(text, size):
    assert SIZE.convert(text, None, None) == size


@pytest.mark.parametrize("text,age", [("0", 0), ("30d", 30 * 86400), ("12h", 43200), ("90m", 5400),
                                      ("2w", 1209600), ("45s", 45), ("1.5", 1.5)])
def test_ages(text, age):
    assert AGE.convert(text, None, None) == age


@pytest.mark.parametrize("swallow", ["wrapped", "exit"])
def test_signal_turned_into_another_error_still_exits_128_plus_n(monkeypatch, capsys, swallow):
    """A SIGTERM while a library turns every exception into its own (pydantic building a
    schema lazily wraps it in SchemaError; seen in CI with an early TERM) ends nsdf-run with
    143, not a traceback and 1."""
    import os
    import signal

    import nsdf_hpc.cli as cli_pkg

    def fake_main(**kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as err:
            if swallow == "exit":
                raise SystemExit(125) from err
            raise RuntimeError("SchemaError: Interrupted: 15") from err

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(cli_pkg.cli, "main", fake_main)
    try:
        with pytest.raises(SystemExit) as stop:
            cli_pkg.main(["run", "busybox"])
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert stop.value.code == 143
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    # a later run in the same process does not inherit the signal
    monkeypatch.setattr(cli_pkg.cli, "main", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("bug")))
    try:
        with pytest.raises(RuntimeError):
            cli_pkg.main(["run", "busybox"])
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_a_sigint_noted_before_the_cli_ends_it_before_any_command(monkeypatch, capsys):
    """``_entry.interrupted``: a SIGINT whose KeyboardInterrupt Python passed over (raised in
    a finalizer while click and pydantic were imported) ends the command before it starts."""
    import signal

    import nsdf_hpc.cli as cli_pkg

    def must_not_run(**kwargs):
        raise AssertionError("the command ran after the SIGINT")

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    monkeypatch.setattr(cli_pkg.cli, "main", must_not_run)
    try:
        with pytest.raises(SystemExit) as stop:
            cli_pkg.main(["run", "busybox", "--", "true"], [signal.SIGINT])
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert stop.value.code == 130
    assert "interrupted by SIGINT" in capsys.readouterr().err


def test_nsdf_run_loads_no_pydantic_plugins_but_a_library_user_does(tmp_path):
    """nsdf-run's own process answers pydantic's plugin lookup with "none", without
    ``importlib.metadata`` (1.0 MB of a cold run's peak memory); any other name asked of
    that module gets the real one; a process that imports the library keeps its plugins."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "cache"),
           "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none.toml"), "NSDF_HPC_NO_FAST_PATH": "1"}
    cli_code = (
        "import sys\nfrom nsdf_hpc._entry import main\n"
        "try:\n    main(['images'])\nexcept SystemExit as e:\n    code = e.code\n"
        "loader = sys.modules['pydantic.plugin._loader']\n"
        "print(code, 'nsdf_hpc.config' in sys.modules, 'importlib.metadata' in sys.modules, "
        "list(loader.get_plugins()), loader.PYDANTIC_ENTRY_POINT_GROUP, "
        "'importlib.metadata' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", cli_code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split("\n")[-2]
    assert out == "0 True False [] pydantic True"   # the settings were validated; the real module on demand
    lib_code = ("import sys, nsdf_hpc\nfrom nsdf_hpc.config import load_settings\n"
                "load_settings(env={}, files=[])\n"
                "print(getattr(sys.modules['pydantic.plugin._loader'], '__file__', None) is not None, "
                "'importlib.metadata' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", lib_code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["True", "True"]   # pydantic's own loader, which looked for plugins
