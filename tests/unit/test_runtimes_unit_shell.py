"""The in-container /bin/sh start that makes 127/126 the same on every runtime (pure parts)."""
from __future__ import annotations

import pytest

from nsdf_hpc.runtimes import runtime_class
from nsdf_hpc.runtimes.base import RuntimeContext

CTX = RuntimeContext(1000, 1000, "alice", which=lambda name: None)


@pytest.mark.parametrize("name", ["apptainer", "charliecloud", "podman", "udocker", "shifter"])
def test_wrap_command_execs_the_command_unchanged(name: str) -> None:
    rt = runtime_class(name)(None, None, "1.0", CTX)
    argv = rt.wrap_command(["printf", "%s\n", "a b", ""], {})
    assert argv[:2] == ("/bin/sh", "-c") and argv[3] == "sh"
    assert argv[4:] == ("printf", "%s\n", "a b", "")
    assert 'exec "$@"' in argv[2] and "unset SHLVL PWD" in argv[2]


def test_an_explicit_shlvl_or_pwd_is_kept() -> None:
    rt = runtime_class("podman")(None, None, "4.3.1", CTX)
    assert "unset SHLVL;" in rt.wrap_command(["true"], {"PWD": "/x"})[2]
    assert rt.wrap_command(["true"], {"PWD": "/x", "SHLVL": "3"})[2].startswith(":;")
