"""The container environment contract and the settings precedence (pure functions)."""
from __future__ import annotations

import pytest

from nsdf_hpc.config import (DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, default_cache_dir, load_settings)
from nsdf_hpc.environment import container_env
from nsdf_hpc.errors import ConfigError

HOST = {
    "SLURM_JOB_ID": "42", "SLURM_NTASKS": "4", "PMI_RANK": "0", "PMIX_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
    "CUDA_VISIBLE_DEVICES": "0,1", "ROCR_VISIBLE_DEVICES": "1", "TERM": "xterm", "LANG": "C.UTF-8",
    "LC_ALL": "C", "HOME": "/home/alice", "USER": "alice",
    # never in the container
    "PYTHONPATH": "/home/alice/lib", "PYTHONHOME": "/opt/py", "LD_LIBRARY_PATH": "/opt/lib",
    "LD_PRELOAD": "/evil.so", "CONDA_PREFIX": "/opt/conda", "CONDA_DEFAULT_ENV": "base",
    "VIRTUAL_ENV": "/home/alice/venv", "APPTAINERENV_X": "1", "SINGULARITY_BIND": "/x",
    "NSDF_HPC_RUNTIME": "podman", "BASH_FUNC_module%%": "() { :; }",
    # neither allowed nor denied: not in the container either
    "PATH": "/usr/bin", "SECRET_TOKEN": "s3cr3t", "EDITOR": "vim",
}


def env(**kw):
    return container_env(HOST, kw.pop("explicit", {}), kw.pop("allow", DEFAULT_ENV_ALLOW),
                         kw.pop("deny", DEFAULT_ENV_DENY))


def test_allowlist_reaches_the_container():
    got = env()
    for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
              "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "TERM", "LANG", "LC_ALL"):
        assert got[k] == HOST[k]


@pytest.mark.parametrize("name", ["PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD",
                                  "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "VIRTUAL_ENV", "APPTAINERENV_X",
                                  "SINGULARITY_BIND", "NSDF_HPC_RUNTIME", "BASH_FUNC_module%%",
                                  "PATH", "SECRET_TOKEN", "EDITOR"])
def test_never_leaks(name):
    assert name not in env()


def test_deny_wins_over_allow():
    got = env(allow=(*DEFAULT_ENV_ALLOW, "PYTHON*", "CONDA_*", "*"))
    assert "PYTHONPATH" not in got and "CONDA_PREFIX" not in got and "VIRTUAL_ENV" not in got
    assert got["EDITOR"] == "vim"                     # allowed by "*", not denied


def test_explicit_values_win_over_everything():
    got = env(explicit={"PYTHONPATH": "/in/container", "SLURM_JOB_ID": "override", "NEW": "a\nb"})
    assert got["PYTHONPATH"] == "/in/container"       # the user asked for it
    assert got["SLURM_JOB_ID"] == "override"
    assert got["NEW"] == "a\nb"


def test_configurable_lists():
    got = env(allow=("MY_SITE_*",), deny=("MY_SITE_SECRET",))
    host = {**HOST, "MY_SITE_A": "1", "MY_SITE_SECRET": "x"}
    got = container_env(host, {}, ("MY_SITE_*",), ("MY_SITE_SECRET",))
    assert got == {"MY_SITE_A": "1"}


# ------------------------------------------------------------------ config precedence
def _env(tmp_path, **extra):
    base = {"HOME": str(tmp_path / "home"), "NSDF_HPC_SITE_CONFIG": str(tmp_path / "site.toml")}
    base.update(extra)
    return base


def _user_file(tmp_path):
    p = tmp_path / "home" / ".config" / "nsdf-hpc" / "config.toml"
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def test_defaults(tmp_path):
    s = load_settings(env=_env(tmp_path))
    assert s.runtime is None and s.files == () and s.sources == {}
    assert s.env_allow == DEFAULT_ENV_ALLOW and s.env_deny == DEFAULT_ENV_DENY
    assert s.nsdf_registry == "docker.io"


def test_precedence_site_user_env_explicit(tmp_path):
    (tmp_path / "site.toml").write_text(
        'runtime = "podman"\ncache_dir = "/site/cache"\nnsdf_registry = "site.reg"\n'
        '[mirrors]\n"docker.io" = "mirror.site"\n[env]\nallow = ["SITE_*"]\n')
    _user_file(tmp_path).write_text(
        'runtime = "charliecloud"\n[mirrors]\n"ghcr.io" = "ghcr-mirror.site"\n[env]\nallow = ["USER_*"]\n')
    s = load_settings(env=_env(tmp_path))
    assert s.runtime == "charliecloud"
    assert s.sources["runtime"].startswith("config:") and s.sources["runtime"].endswith("config.toml")
    assert s.cache_dir == "/site/cache" and s.nsdf_registry == "site.reg"          # site only
    assert s.mirrors == {"docker.io": "mirror.site", "ghcr.io": "ghcr-mirror.site"}  # merged
    assert s.env_allow[-2:] == ("SITE_*", "USER_*")                                # appended
    assert s.files == (str(tmp_path / "site.toml"), str(_user_file(tmp_path)))

    s = load_settings(env=_env(tmp_path, NSDF_HPC_RUNTIME="udocker", NSDF_HPC_CACHE="/env/cache"))
    assert (s.runtime, s.sources["runtime"]) == ("udocker", "env:NSDF_HPC_RUNTIME")
    assert (s.cache_dir, s.sources["cache_dir"]) == ("/env/cache", "env:NSDF_HPC_CACHE")

    s = load_settings(env=_env(tmp_path, NSDF_HPC_RUNTIME="udocker"), runtime="apptainer")
    assert (s.runtime, s.sources["runtime"]) == ("apptainer", "argument")
    # None means "not given": it never erases a lower layer
    s = load_settings(env=_env(tmp_path, NSDF_HPC_RUNTIME="udocker"), runtime=None)
    assert s.runtime == "udocker"


def test_explicit_config_file_and_xdg(tmp_path):
    cfg = tmp_path / "mine.toml"
    cfg.write_text('runtime = "shifter"\n')
    assert load_settings(env=_env(tmp_path, NSDF_HPC_CONFIG=str(cfg))).runtime == "shifter"
    xdg = tmp_path / "xdg" / "nsdf-hpc"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text('runtime = "podman"\n')
    assert load_settings(env=_env(tmp_path, XDG_CONFIG_HOME=str(tmp_path / "xdg"))).runtime == "podman"
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env=_env(tmp_path, NSDF_HPC_CONFIG=str(tmp_path / "missing.toml")))


def test_pull_on_compute_from_env(tmp_path):
    assert load_settings(env=_env(tmp_path, NSDF_HPC_PULL_ON_COMPUTE="yes")).pull_on_compute is True
    assert load_settings(env=_env(tmp_path, NSDF_HPC_PULL_ON_COMPUTE="0")).pull_on_compute is False


@pytest.mark.parametrize("text,message", [
    ('runtme = "podman"\n', "unknown setting(s) runtme"),
    ('runtime = \n', "not valid TOML"),
    ('[env]\nallow = ["A"]\nextra = 1\n', "[env] takes 'allow' and 'deny'"),
    ('probe_timeout = "soon"\n', "invalid setting probe_timeout"),
])
def test_bad_config_files(tmp_path, text, message):
    (tmp_path / "site.toml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(env=_env(tmp_path))
    assert message in str(exc.value)
    assert "site.toml" in str(exc.value)


def test_cache_dir_prefers_scratch(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert default_cache_dir({"SCRATCH": str(scratch), "HOME": "/h"}) == scratch / "nsdf-hpc"
    assert str(default_cache_dir({"SCRATCH": "/does/not/exist", "HOME": "/h"})) == "/h/.cache/nsdf-hpc"
    assert str(default_cache_dir({"HOME": "/h", "XDG_CACHE_HOME": "/x"})) == "/x/nsdf-hpc"


# ---------------------------------------------------------------- the MPI launcher's directories
def test_launcher_dirs_are_the_pmix_server_directory_once_and_nothing_odd() -> None:
    from nsdf_hpc.environment import launcher_dirs
    srv = "/var/spool/slurmd/pmix.7.0/"
    env = {"PMIX_SERVER_TMPDIR": srv, "PMIX_DSTORE_21_BASE_PATH": srv + "/pmix_dstor_ds21_1",
           "PMIX_DSTORE_ESH_BASE_PATH": "/other/ds12", "PMIX_SYSTEM_TMPDIR": "/tmp"}
    # the stores inside the server's directory come with it; /tmp is not the launcher's
    assert launcher_dirs(env) == ["/var/spool/slurmd/pmix.7.0", "/other/ds12"]
    for bad in ("relative/dir", "/a:b", "/a,b", "/", "", "/x\0y"):
        assert launcher_dirs({"PMIX_SERVER_TMPDIR": bad}) == []
    assert launcher_dirs({}) == []


def test_with_launcher_binds_adds_existing_directories_not_already_bound(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nsdf_hpc.client import with_launcher_binds
    from nsdf_hpc.models import Bind, RunSpec
    srv = tmp_path / "pmix.7.0"
    srv.mkdir()
    spec = RunSpec(image="busybox", command=("true",))
    got = with_launcher_binds(spec, {"PMIX_SERVER_TMPDIR": str(srv), "PMIX_DSTORE_ESH_BASE_PATH": "/nonexistent"})
    assert got.binds == (Bind(source=str(srv), target=str(srv)),)
    covered = spec.model_copy(update={"binds": (Bind(source=str(tmp_path), target=str(tmp_path)),)})
    assert with_launcher_binds(covered, {"PMIX_SERVER_TMPDIR": str(srv)}) is covered
    assert with_launcher_binds(spec, {}) is spec


def test_a_launch_record_of_one_job_step_is_not_another_steps() -> None:
    from nsdf_hpc import _launch
    args = ["run", "busybox", "--", "true"]
    a = _launch.launch_key(args, {"PMIX_SERVER_TMPDIR": "/s/pmix.7.0", "PMIX_RANK": "0"}, "/w")
    b = _launch.launch_key(args, {"PMIX_SERVER_TMPDIR": "/s/pmix.8.0", "PMIX_RANK": "0"}, "/w")
    c = _launch.launch_key(args, {"PMIX_SERVER_TMPDIR": "/s/pmix.7.0", "PMIX_RANK": "1"}, "/w")
    assert a != b and a == c
