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
    # no registry and no conversion; only the store is asked whether it still holds the image
    assert again.cached and again.location == "a" * 64
    assert [tuple(c[1:3]) for c in runner.calls] == [("image", "exists")]
    with pytest.raises(ImageError, match="built here for podman, not for apptainer"):
        client.images.pull(source, Apptainer("/usr/bin/apptainer", "apptainer", "1.4.5", USER))


def test_push_hands_credentials_over_in_a_file_and_maps_a_refusal(tmp_path, fakebin) -> None:  # type: ignore[no-untyped-def]
    import json

    from _fakes import make_host
    from nsdf_hpc._exec import CompletedCommand
    from nsdf_hpc.client import Client
    from nsdf_hpc.config import load_settings
    from nsdf_hpc.errors import CommandError, ImageError, RegistryError
    from nsdf_hpc.runtimes.podman import Podman

    bindir = fakebin("podman")
    env = {"PATH": str(bindir), "HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "cache"),
           "NSDF_HPC_REGISTRY_USER": "me", "NSDF_HPC_REGISTRY_PASSWORD": "s3cret-pw"}
    seen = {}

    class Runner(FakeRunner):
        def run(self, argv, **kwargs):  # type: ignore[no-untyped-def,override]
            if "push" in argv:
                auth = argv[argv.index("--authfile") + 1]
                with open(auth) as fh:
                    seen["auth"] = json.load(fh)
                seen["mode"] = oct(__import__("os").stat(auth).st_mode & 0o777)
            res = super().run(argv, **kwargs)
            if kwargs.get("check", True) and res.returncode:   # as SubprocessRunner does
                raise CommandError(res.argv, res.returncode, res.stdout, res.stderr)
            return res

        def _answer(self, argv, timeout):  # type: ignore[no-untyped-def,override]
            if "--version" in argv:
                return CompletedCommand(tuple(argv), 0, "podman version 4.3.1\n", "")
            return super()._answer(argv, timeout)

    runner = Runner({"podman": (0, "", "")})
    client = Client(settings=load_settings(env=env, files=[]), runner=runner, env=env)
    client._host = make_host(uid=0, user="root")
    with pytest.raises(ImageError, match="was not built here"):
        client.push("nsdf/hello:v0.1.0")
    rt = Podman(str(bindir / "podman"), "podman", "4.3.1", USER)
    client.cache.ensure_dirs()
    work = client.cache.workdir("podman", "sha256:" + "0" * 64)
    client.images.adopt_built(rt, work, "sha256:" + "b" * 64, "nsdf/hello:v0.1.0", location="b" * 64,
                              relative=False, builder="podman")
    runner.answers["podman"] = (125, "", "Error: writing blob: unauthorized: authentication required\n")
    with pytest.raises(RegistryError) as err:
        client.push("nsdf/hello:v0.1.0", to="127.0.0.1:5444")
    assert "refused the credentials from NSDF_HPC_REGISTRY_USER" in str(err.value)
    assert "s3cret-pw" not in str(err.value)
    push = [c for c in runner.calls if "push" in c][0]
    assert not any("s3cret" in a for a in push) and push[-1] == "docker://127.0.0.1:5444/nsdf/hello:v0.1.0"
    assert seen["mode"] == "0o600"
    assert seen["auth"] == {"auths": {"127.0.0.1:5444": {"auth": "bWU6czNjcmV0LXB3"}}}   # me:s3cret-pw
    assert not list((tmp_path / "cache" / "tmp").glob("push-*"))


def test_pulls_log_in_through_the_environment_never_argv(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import os

    from nsdf_hpc.client import Client
    from nsdf_hpc.config import load_settings
    from nsdf_hpc.runtimes.apptainer import Apptainer
    from nsdf_hpc.runtimes.charliecloud import Charliecloud
    from nsdf_hpc.runtimes.podman import Podman
    from nsdf_hpc.runtimes.udocker import UDocker

    assert Apptainer().login_env("u", "p", "/a") == {"APPTAINER_DOCKER_USERNAME": "u",
                                                     "APPTAINER_DOCKER_PASSWORD": "p"}
    assert Charliecloud().login_env("u", "p", "/a") == {"CH_IMAGE_AUTH": "yes", "CH_IMAGE_USERNAME": "u",
                                                        "CH_IMAGE_PASSWORD": "p"}
    assert Podman().login_env("u", "p", "/a") == {"REGISTRY_AUTH_FILE": "/a"}
    assert UDocker().login_env("u", "p", "/a") == {}
    env = {"PATH": "/usr/bin", "HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "cache"),
           "NSDF_HPC_REGISTRY_USER": "me", "NSDF_HPC_REGISTRY_PASSWORD": "pw"}
    client = Client(settings=load_settings(env=env, files=[]), runner=FakeRunner(), env=env)
    work = tmp_path / "work"
    work.mkdir()
    src = client.parse_image("127.0.0.1:5444/nsdf/x:v1.0.0")
    got = client.images.login_env(Podman("/usr/bin/podman", ctx=USER), src, str(work))
    auth = work / ".nsdf-login.json"
    assert got == {"REGISTRY_AUTH_FILE": str(auth)} and oct(os.stat(auth).st_mode & 0o777) == "0o600"
    assert json.loads(auth.read_text()) == {"auths": {"127.0.0.1:5444": {"auth": "bWU6cHc="}}}
    assert client.images.login_env(Podman("/usr/bin/podman", ctx=USER),
                                   client.parse_image(f"oci-archive:{tmp_path}/x.tar"), str(work)) == {}
    no_creds = Client(settings=load_settings(env={**env, "NSDF_HPC_REGISTRY_USER": ""}, files=[]),
                      runner=FakeRunner(), env={k: v for k, v in env.items() if "REGISTRY" not in k})
    assert no_creds.images.login_env(Apptainer(ctx=USER), src, str(work)) == {}


def test_client_build_follows_the_runtime_and_an_explicit_builder_outranks_the_config(  # type: ignore[no-untyped-def]
        tmp_path, fakebin) -> None:
    from _fakes import make_host
    from nsdf_hpc.client import Client
    from nsdf_hpc.config import load_settings
    from nsdf_hpc.errors import ConfigError

    bindir = fakebin("apptainer", "podman", "buildah", "ch-run", "ch-image", "ch-convert")
    answers = {"apptainer": (0, "apptainer version 1.4.5\n", ""), "podman": (0, "podman version 4.3.1\n", ""),
               "buildah": (0, "buildah version 1.28.2 (image-spec 1.1.0)\n", ""), "ch-run": (0, "0.31\n", ""),
               "ch-image": (0, "0.31\n", "")}
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "Dockerfile").write_text('FROM busybox:1.36\nLABEL org.opencontainers.image.title="nsdf/t" '
                                       'org.opencontainers.image.version="v1.2.3"\nRUN true\n')

    def client(**extra: str) -> Client:
        env = {"PATH": str(bindir), "HOME": str(tmp_path), "USER": "alice",
               "NSDF_HPC_CACHE": str(tmp_path / "cache"), **extra}
        c = Client(settings=load_settings(env=env, files=[]), runner=FakeRunner(answers), env=env)
        c._host = make_host()
        return c

    auto = client().build(str(recipe), dry_run=True)
    assert (auto.builder, auto.runtime, auto.tag, auto.dry_run) == ("apptainer", "apptainer", "nsdf/t:v1.2.3", True)
    assert auto.definition and "From: busybox:1.36" in auto.definition and auto.argv[0][-1].endswith("recipe.def")
    assert auto.choice is not None and auto.choice.source == "auto"
    configured = client(NSDF_HPC_RUNTIME="charliecloud").build(str(recipe), dry_run=True)
    assert (configured.builder, configured.runtime) == ("ch-image", "charliecloud")
    forced = client(NSDF_HPC_RUNTIME="charliecloud").build(str(recipe), builder="buildah", dry_run=True)
    assert (forced.builder, forced.runtime) == ("buildah", "podman")
    with pytest.raises(ConfigError, match="builds for the charliecloud runtime, not podman"):
        client().build(str(recipe), builder="ch-image", runtime="podman", dry_run=True)
    assert not [p for p in (tmp_path / "cache" / "tmp").iterdir()]     # dry runs leave nothing
