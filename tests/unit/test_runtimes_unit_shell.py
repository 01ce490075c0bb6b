"""The in-container /bin/sh start that makes 127/126 the same on every runtime (pure parts)."""
from __future__ import annotations

import pytest

from nsdf_hpc.runtimes import runtime_class
from nsdf_hpc.runtimes.base import RuntimeContext

CTX = RuntimeContext(1000, 1000, "alice", which=lambda name: None)


@pytest.mark.parametrize("name", ["apptainer", "charliecloud", "podman", "shifter"])
def test_wrap_command_execs_the_command_unchanged(name: str) -> None:
    rt = runtime_class(name)(None, None, "1.0", CTX)
    argv = rt.wrap_command(["printf", "%s\n", "a b", ""], {})
    assert argv[:2] == ("/bin/sh", "-c") and argv[3] == "sh"
    assert argv[4:] == ("printf", "%s\n", "a b", "")
    assert 'exec "$@"' in argv[2] and "unset SHLVL PWD" in argv[2]


def test_udocker_starts_the_command_under_its_own_shell_instead() -> None:
    rt = runtime_class("udocker")(None, None, "1.3.17", CTX)
    assert rt.wrap_command(["true"], {}) == ("true",)


def test_an_explicit_shlvl_or_pwd_is_kept() -> None:
    rt = runtime_class("podman")(None, None, "4.3.1", CTX)
    assert "unset SHLVL;" in rt.wrap_command(["true"], {"PWD": "/x"})[2]
    assert rt.wrap_command(["true"], {"PWD": "/x", "SHLVL": "3"})[2].startswith(":;")


def test_charliecloud_squash_listing_and_the_moved_cwd_bind(tmp_path) -> None:
    from nsdf_hpc.errors import RunError
    from nsdf_hpc.models import Bind, NativeImage, RunSpec
    rt = runtime_class("charliecloud")("/usr/bin/ch-run", None, "0.31", CTX)
    sqfs = tmp_path / "i.sqfs"
    sqfs.write_bytes(b"x")
    native = NativeImage(runtime="charliecloud", source=str(sqfs), location=str(sqfs))
    assert rt.listing_argv(native, ["/var/tmp/a/b"])[:4] == ["unsquashfs", "-ll", "-max-depth", "4"]
    listing = ("drwxr-xr-x root/root 173 2026-12-01 03:15 squashfs-root\n"
               "drwxr-xr-x root/root 26 2026-12-01 00:18 squashfs-root/var\n"
               "drwxrwxrwt root/root 3 2026-12-01 00:18 squashfs-root/var/tmp\n"
               "lrwxrwxrwx root/root 3 2026-12-01 00:18 squashfs-root/var/run -> /run\n")
    present = rt.parse_listing(listing)
    assert present == {"/": "d", "/var": "d", "/var/tmp": "d", "/var/run": "f"}
    native = native.model_copy(update={"present": present})
    spec = RunSpec(image=str(sqfs), command=("pwd",), cwd="/var/tmp/a/b")
    inv = rt.run_invocation(spec, native, {}, {})
    assert "--bind=/var/tmp:/var/tmp" in inv.argv and "--cd=/var/tmp/a/b" in inv.argv
    data = tmp_path / "d"
    data.mkdir()
    with pytest.raises(RunError, match="has no /data"):
        rt.run_invocation(spec.model_copy(update={"binds": (Bind(source=str(data), target="/data"),)}),
                          native, {}, {})
    with pytest.raises(RunError, match="has no /srv/x"):
        rt.run_invocation(spec.model_copy(update={"cwd": "/srv/x"}), native, {}, {})
