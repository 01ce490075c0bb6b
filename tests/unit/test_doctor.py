"""`nsdf-run doctor`: concrete fixes for the usual problems, from host facts (no testbed)."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Dict

import pytest

from nsdf_hpc.client import Client
from nsdf_hpc.config import load_settings
from nsdf_hpc.doctor import diagnose

from _fakes import FakeRunner, make_host


def _bin(d: Path, name: str) -> None:
    p = d / name
    p.write_text("#!/bin/sh\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)


def _client(tmp_path: Path, host_kw: Dict[str, object], tools: Dict[str, tuple]) -> Client:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for name in tools:
        _bin(bindir, name)
    env = {"PATH": str(bindir), "HOME": str(tmp_path / "home"), "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none")}
    client = Client(settings=load_settings(env=env, files=[]), runner=FakeRunner(tools), env=env)
    client._host = make_host(**host_kw)
    return client


def _text(findings) -> str:
    return "\n".join(f"[{f.level}] {f.message} | {f.fix}" for f in findings)


def test_userns_disabled_points_to_udocker_and_setuid_apptainer(tmp_path: Path) -> None:
    tools = {"ch-run": (0, "0.31\n", ""), "udocker": (0, "version: 1.3.17\ntarball: x\n", "")}
    text = _text(diagnose(_client(tmp_path, {"max_user_namespaces": 0}, tools)))
    assert "user namespaces are disabled" in text and "use UDocker" in text and "setuid Apptainer" in text
    assert "runtime: udocker" in text     # Charliecloud is unusable, so the fallback is chosen


def test_fuse_not_accessible(tmp_path: Path) -> None:
    tools = {"apptainer": (0, "apptainer version 1.4.5\n", "")}
    text = _text(diagnose(_client(tmp_path, {"fuse_access": False}, tools)))
    assert "/dev/fuse is not accessible" in text and "0666" in text


def test_no_runtime_at_all_fails_with_a_fix(tmp_path: Path) -> None:
    findings = diagnose(_client(tmp_path, {}, {}))
    assert any(f.level == "FAIL" and "pip install udocker" in f.fix for f in findings)


def test_cache_in_a_small_home_warns_with_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nsdf_hpc.doctor as doctor
    monkeypatch.setattr(doctor, "free_bytes", lambda p: 2 << 30)   # 2 GiB free in $HOME
    tools = {"apptainer": (0, "apptainer version 1.4.5\n", "")}
    (tmp_path / "home").mkdir()
    text = _text(diagnose(_client(tmp_path, {}, tools)))
    assert "is in $HOME" in text and "NSDF_HPC_CACHE=$SCRATCH" in text


def test_missing_subuid_for_rootless_podman(tmp_path: Path) -> None:
    tools = {"podman": (0, "podman version 4.3.1\n", "")}
    text = _text(diagnose(_client(tmp_path, {"subuid": False, "subgid": False}, tools)))
    assert "no /etc/subuid" in text and "usermod --add-subuids" in text
