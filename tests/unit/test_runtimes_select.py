"""Detection (with a fake runner and fake executables), assessment and the choice."""
from __future__ import annotations

import os

import pytest

from nsdf_hpc.config import load_settings
from nsdf_hpc.errors import ConfigError, RuntimeNotFoundError
from nsdf_hpc.models import RuntimeInfo
from nsdf_hpc.runtimes import choose, detect_all, runtime_class, runtime_names

from _fakes import FakeRunner, make_host

NSDF_ORDER = ["apptainer", "singularity", "charliecloud", "shifter", "podman-hpc", "podman", "udocker"]

PODMAN_VERSION = "Client:       Podman Engine\nVersion:      4.3.1\nAPI Version:  4.3.1\n"
SHIFTER_USAGE = "\nUsage:\nshifter [-h|--help] [-v|--verbose] [--image=<imageType>:<imageTag>]\n"
ANSWERS = {
    "apptainer": (0, "apptainer version 1.4.5\n", ""),
    "singularity": (0, "singularity-ce version 4.1.1\n", ""),
    "ch-run": (0, "", "0.31\n"),
    "shifter": (1, SHIFTER_USAGE, "shifter: unrecognized option '--version'\nMissing an argument!\n"),
    "podman-hpc": (0, PODMAN_VERSION, ""),
    "podman": (0, "podman version 4.3.1\n", ""),
    "udocker": (0, "version: 1.3.17\ntarball: /opt/udocker/x.tar.gz\n", ""),
}


def info(name, usable=True, found=True, version="1", notes=()):
    return RuntimeInfo(name=name, found=found, usable=usable and found, version=version if found else None,
                       path=f"/usr/bin/{name}" if found else None, notes=tuple(notes),
                       priority=runtime_class(name).priority)


ALL = [info(n) for n in NSDF_ORDER]


def test_nsdf_order():
    assert runtime_names() == NSDF_ORDER


# ------------------------------------------------------------------ choose()
def test_auto_walks_nsdf_order_and_explains_the_rest():
    c = choose(ALL)
    assert (c.name, c.source) == ("apptainer", "auto")
    assert set(c.rejected) == set(NSDF_ORDER) - {"apptainer"}
    assert all("apptainer comes first" in why for why in c.rejected.values())
    infos = [info(n, usable=n in ("podman", "udocker")) for n in NSDF_ORDER]
    infos[2] = info("charliecloud", usable=False, notes=["ch-run needs unprivileged user namespaces"])
    c = choose(infos)
    assert c.name == "podman"
    assert c.rejected["charliecloud"].startswith("unusable: ch-run needs")
    assert "podman comes first" in c.rejected["udocker"]


def test_udocker_is_the_last_resort():
    infos = [info(n, found=n == "udocker") for n in NSDF_ORDER]
    assert choose(infos).name == "udocker"


def test_explicit_beats_configured_beats_auto():
    assert choose(ALL, explicit="podman", configured="udocker").source == "argument"
    assert choose(ALL, explicit="podman", configured="udocker").name == "podman"
    c = choose(ALL, configured="udocker", configured_source="env:NSDF_HPC_RUNTIME")
    assert (c.name, c.source) == ("udocker", "env:NSDF_HPC_RUNTIME")
    assert "udocker was requested (env:NSDF_HPC_RUNTIME)" in c.rejected["apptainer"]
    assert c.explain() == "udocker (set by env:NSDF_HPC_RUNTIME)"


def test_env_and_config_files_through_settings(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('runtime = "charliecloud"\n')
    env = {"HOME": str(tmp_path), "NSDF_HPC_SITE_CONFIG": str(site)}
    s = load_settings(env=env)
    c = choose(ALL, configured=s.runtime, configured_source=s.sources["runtime"])
    assert (c.name, c.source) == ("charliecloud", f"config:{site}")
    s = load_settings(env={**env, "NSDF_HPC_RUNTIME": "shifter"})
    c = choose(ALL, configured=s.runtime, configured_source=s.sources["runtime"])
    assert (c.name, c.source) == ("shifter", "env:NSDF_HPC_RUNTIME")
    c = choose(ALL, explicit="podman-hpc", configured=s.runtime, configured_source=s.sources["runtime"])
    assert (c.name, c.source) == ("podman-hpc", "argument")


def test_explicit_but_unusable_is_an_error_listing_what_was_found():
    infos = [info("apptainer", version="1.4.5"), info("podman", usable=False, notes=["no userns"]),
             info("charliecloud", found=False, notes=["not found on PATH (looked for ch-run)"]),
             info("udocker", version="1.3.17")]
    with pytest.raises(RuntimeNotFoundError) as exc:
        choose(infos, explicit="charliecloud")
    msg = str(exc.value)
    assert "'charliecloud' was requested (argument)" in msg and "not found on PATH" in msg
    assert "found here: apptainer 1.4.5, podman 1 (unusable), udocker 1.3.17" in msg
    with pytest.raises(RuntimeNotFoundError, match="no userns"):
        choose(infos, configured="podman", configured_source="env:NSDF_HPC_RUNTIME")
    with pytest.raises(RuntimeNotFoundError, match="not found"):
        choose(infos, explicit="shifter")           # known but absent from the list


def test_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown runtime 'dockr'.*known: apptainer"):
        choose(ALL, explicit="dockr")
    with pytest.raises(ConfigError, match="config:/etc/x.toml"):
        choose(ALL, configured="dockr", configured_source="config:/etc/x.toml")


def test_nothing_usable():
    with pytest.raises(RuntimeNotFoundError, match="pip install udocker"):
        choose([info(n, found=False) for n in NSDF_ORDER])


# ------------------------------------------------------------------ detect_all()
def _detect(runner, bindir, tmp_path, host=None, **kw):
    return {i.name: i for i in detect_all(runner, env={"PATH": str(bindir)}, host=host or make_host(),
                                          cache_file=str(tmp_path / "detect.json"), **kw)}


def test_detect_all_probes_everything_at_once(fakebin, tmp_path):
    bindir = fakebin(*ANSWERS)
    runner = FakeRunner(ANSWERS)
    infos = _detect(runner, bindir, tmp_path)
    assert len(runner.batches) == 1, "one concurrent batch of probes"
    assert sorted(set(runner.probed)) == sorted(ANSWERS)
    assert list(infos) == NSDF_ORDER
    got = {n: (i.found, i.usable, i.flavour, i.version) for n, i in infos.items()}
    assert got == {
        "apptainer": (True, True, "apptainer", "1.4.5"),
        "singularity": (True, True, "singularityce", "4.1.1"),
        "charliecloud": (True, True, "charliecloud", "0.31"),
        "shifter": (True, True, "shifter", "unknown"),
        "podman-hpc": (True, True, "podman-hpc", "4.3.1"),
        "podman": (True, True, "podman", "4.3.1"),
        "udocker": (True, True, "udocker", "1.3.17"),
    }
    # the probes are the documented ones; ch-run gets $USER, probes never see the user's env
    argvs = {os.path.basename(a[0]): a[1:] for a in runner.batches[0]}
    assert argvs["podman-hpc"] == ("infohpc",) and argvs["shifter"] == ("--version",)
    assert all(e is not None and "PYTHONPATH" not in e for e in runner.envs)
    assert choose(list(infos.values())).name == "apptainer"


def test_detect_never_raises_on_broken_or_hung_binaries(fakebin, tmp_path):
    bindir = fakebin("apptainer", "podman", "udocker", "ch-run")
    runner = FakeRunner({"apptainer": (139, "", "Segmentation fault\n"), "udocker": ANSWERS["udocker"],
                         "ch-run": (1, "", "ch-run[1]: error: $USER not set (ch-run.c:122)\n")},
                        hung=["podman"])
    infos = _detect(runner, bindir, tmp_path)
    assert not infos["apptainer"].usable
    assert "could not read the output" in " ".join(infos["apptainer"].notes)
    assert not infos["podman"].usable and "did not finish" in " ".join(infos["podman"].notes)
    assert not infos["charliecloud"].usable
    assert infos["udocker"].usable
    assert choose(list(infos.values())).name == "udocker"
    with pytest.raises(RuntimeNotFoundError, match="did not finish"):
        choose(list(infos.values()), explicit="podman")


def test_singularity_symlink_to_apptainer_is_apptainer(fakebin, tmp_path):
    bindir = fakebin("singularity")
    runner = FakeRunner({"singularity": (0, "apptainer version 1.3.4\n", "")})
    infos = _detect(runner, bindir, tmp_path)
    assert (infos["apptainer"].found, infos["apptainer"].path) == (True, str(bindir / "singularity"))
    assert infos["apptainer"].version == "1.3.4"
    assert not infos["singularity"].found
    assert "Apptainer 1.3.4, not singularity" in " ".join(infos["singularity"].notes)


def test_detection_cache(fakebin, tmp_path):
    bindir = fakebin("apptainer", "podman")
    runner = FakeRunner(ANSWERS)
    first = _detect(runner, bindir, tmp_path)
    assert len(runner.batches) == 1
    second = _detect(runner, bindir, tmp_path)
    assert len(runner.batches) == 1, "a warm detection starts no probe"
    assert second == first
    # touching a binary (new mtime) invalidates the cache
    st = os.stat(bindir / "podman")
    os.utime(bindir / "podman", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _detect(runner, bindir, tmp_path)
    assert len(runner.batches) == 2
    # a different PATH is a different key; refresh=True always probes
    _detect(runner, bindir, tmp_path, refresh=True)
    assert len(runner.batches) == 3
    other = fakebin("apptainer")
    _detect(runner, other, tmp_path)
    assert len(runner.batches) == 4


def test_corrupt_cache_is_ignored(fakebin, tmp_path):
    bindir = fakebin("podman")
    (tmp_path / "detect.json").write_text("{not json")
    runner = FakeRunner(ANSWERS)
    assert _detect(runner, bindir, tmp_path)["podman"].usable
    assert len(runner.batches) == 1


def test_configured_runtime_paths(fakebin, tmp_path):
    bindir = fakebin("podman")
    elsewhere = fakebin("apptainer")
    runner = FakeRunner(ANSWERS)
    infos = _detect(runner, bindir, tmp_path, runtime_paths={"apptainer": str(elsewhere / "apptainer"),
                                                             "udocker": str(tmp_path / "nope")})
    assert infos["apptainer"].path == str(elsewhere / "apptainer")
    assert not infos["udocker"].found and "not an executable" in infos["udocker"].notes[0]


# ------------------------------------------------------------------ assess()
def _assess(name, host, version="1.0", flavour=None):
    cls = runtime_class(name)
    return cls("/nonexistent/bin/" + cls.executables[0]).assess(host, version, flavour or name)


@pytest.mark.parametrize("facts", [
    dict(max_user_namespaces=0),
    dict(unprivileged_userns_clone=False),
    dict(apparmor_restricts_userns=True),
], ids=["max_user_namespaces=0", "userns_clone=0", "apparmor"])
def test_without_user_namespaces(facts):
    host = make_host(**facts)
    assert not host.userns
    a = _assess("charliecloud", host)
    assert not a.usable and "user namespaces" in a.notes[0]
    a = _assess("podman", host)
    assert not a.usable and "rootless podman needs user namespaces" in a.notes[0]
    assert not _assess("podman-hpc", host).usable
    a = _assess("apptainer", host, "1.4.5")
    assert not a.usable and "no setuid starter" in a.notes[0]
    assert _assess("udocker", host, "1.3.17").usable            # always
    assert _assess("shifter", host, "unknown").usable           # setuid


def test_root_and_userns_hosts():
    root = make_host(uid=0, user="root", max_user_namespaces=0)
    assert _assess("podman", root).usable and _assess("apptainer", root, "1.4.5").usable
    assert not _assess("charliecloud", root).usable              # ch-run still needs userns
    user = make_host()
    for name in ("apptainer", "singularity", "charliecloud", "podman", "podman-hpc", "udocker", "shifter"):
        assert _assess(name, user, "4.1.1" if name == "singularity" else "1.4.5",
                       "singularityce" if name == "singularity" else None).usable, name


def test_capability_details():
    a = _assess("apptainer", make_host(fuse_access=False), "1.4.5")
    assert a.capabilities["no_eval"] and not a.capabilities["fuse"]
    assert any("extracted to a temporary sandbox" in n for n in a.notes)
    a = _assess("singularity", make_host(), "3.7.1", "singularity")
    assert not a.capabilities["no_eval"] and any("no --no-eval" in n for n in a.notes)
    a = _assess("podman", make_host(subuid=False))
    assert a.usable and "subuid" in a.notes[0]
    a = _assess("charliecloud", make_host(fuse_access=False, nvidia=True))
    assert a.usable and any("/dev/fuse" in n for n in a.notes) and any("ch-fromhost" in n for n in a.notes)
    assert _assess("udocker", make_host(nvidia=True), "1.3.17").capabilities["gpu_nvidia"]


def test_the_udocker_installed_with_this_python_comes_before_path(tmp_path, monkeypatch):
    from nsdf_hpc.runtimes import _candidates
    from nsdf_hpc.runtimes.udocker import UDocker
    mine = tmp_path / "venv" / "bin" / "udocker"
    other = tmp_path / "path" / "udocker"
    for p in (mine, other):
        p.parent.mkdir(parents=True)
        p.write_text("#!/bin/sh\n")
        p.chmod(0o755)
    monkeypatch.setattr(UDocker, "preferred_candidates", classmethod(lambda cls: [str(mine)]))
    found, notes = _candidates(UDocker, {}, str(other.parent))
    assert found == [str(mine)]
    assert notes == [f"{mine} (installed with this Python) is used, not {other} on PATH"]
    found, notes = _candidates(UDocker, {"udocker": str(other)}, str(other.parent))
    assert found == [str(other)] and notes == []   # a configured path still wins


def test_an_explicit_runtime_is_probed_once_per_client(fakebin, tmp_path):
    """A client asked for one runtime again and again (an Executor's every submit) probes
    it once, as it keeps the full detection; ``refresh`` probes again."""
    from nsdf_hpc.client import Client
    bindir = fakebin("apptainer", "podman")
    runner = FakeRunner(ANSWERS)
    env = {"PATH": str(bindir), "HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "cache")}
    client = Client(settings=load_settings(env=env, files=[], detect_cache=False), runner=runner, env=env)
    client._host = make_host()
    assert [client.runtime("apptainer").name for _ in range(3)] == ["apptainer"] * 3
    assert len(runner.batches) == 1 and set(runner.probed) == {"apptainer"}
    assert client.runtime("podman").name == "podman"
    assert len(runner.batches) == 2
    client.detect(refresh=True, only=["apptainer"])
    assert len(runner.batches) == 3
    assert [i.name for i in client.detect()] == NSDF_ORDER and len(runner.batches) == 4
    assert client.runtime("apptainer").name == "apptainer" and len(runner.batches) == 4
