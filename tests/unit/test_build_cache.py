"""A built image goes straight into the runtime's cache, keyed by its digest, and its tag then
stands for it with no registry (ImageService.adopt_built / resolve_for)."""
from __future__ import annotations

import pytest

from _fakes import FakeRunner
from nsdf_hpc.runtimes.base import RuntimeContext

USER = RuntimeContext(1000, 1000, "alice", which=lambda name: f"/usr/bin/{name}")


def test_a_built_image_is_adopted_by_digest_and_runs_without_a_registry(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from nsdf_hpc.client import Client
    from nsdf_hpc.config import load_settings
    from nsdf_hpc.errors import ImageError
    from nsdf_hpc.runtimes.apptainer import Apptainer
    from nsdf_hpc.runtimes.podman import Podman

    env = {"PATH": "/usr/bin", "HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "cache")}
    runner = FakeRunner({"podman": (0, "", "")})
    client = Client(settings=load_settings(env=env, files=[]), runner=runner, env=env)
    rt = Podman("/usr/bin/podman", "podman", "4.3.1", USER)
    client.cache.ensure_dirs()
    work = client.cache.workdir("podman", "sha256:" + "0" * 64)
    digest = "sha256:" + "a" * 64
    native = client.images.adopt_built(rt, work, digest, "nsdf/hello:v0.1.0", location="a" * 64,
                                       relative=False, builder="podman")
    assert (native.digest, native.location, native.cached) == (digest, "a" * 64, False)
    source = client.parse_image("nsdf/hello:v0.1.0")
    assert client.images.resolve_for(source, rt) == (digest, None)
    runner.calls.clear()
    again = client.images.pull(source, rt)          # no registry, no conversion: the cache entry
    assert again.cached and again.location == "a" * 64 and runner.calls == []
    with pytest.raises(ImageError, match="built here for podman, not for apptainer"):
        client.images.pull(source, Apptainer("/usr/bin/apptainer", "apptainer", "1.4.5", USER))
