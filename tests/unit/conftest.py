"""Fixtures for the pure-logic tests: host facts, fake executables, no bundled udocker."""
from __future__ import annotations

import stat
from pathlib import Path
from typing import Callable

import pytest

from _fakes import make_host
from nsdf_hpc.host import HostFacts


@pytest.fixture
def host_factory() -> Callable[..., HostFacts]:
    return make_host


@pytest.fixture
def fakebin(tmp_path: Path) -> Callable[..., Path]:
    """``fakebin("apptainer", "podman")`` creates executables in a fresh directory."""
    counter = [0]

    def make(*names: str) -> Path:
        counter[0] += 1
        d = tmp_path / f"bin{counter[0]}"
        d.mkdir()
        for n in names:
            p = d / n
            p.write_text("#!/bin/sh\nexit 0\n")
            p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return d
    return make


@pytest.fixture(autouse=True)
def _no_bundled_udocker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The udocker installed beside this interpreter must not leak into detection tests."""
    from nsdf_hpc.runtimes.udocker import UDocker
    monkeypatch.setattr(UDocker, "preferred_candidates", classmethod(lambda cls: []))
