"""Properties every runtime's pure builders share, and a few details the contracts do not show."""
from __future__ import annotations

import os

import pytest

from _fakes import FakeRunner
from nsdf_hpc._exec import CompletedCommand, run_guarded, run_scratch
from nsdf_hpc.client import Client
from nsdf_hpc.config import load_settings
from nsdf_hpc.errors import SpecError, UnexpectedOutputError
from nsdf_hpc.models import Bind, NativeImage, RunSpec
from nsdf_hpc.reference import parse_source
from nsdf_hpc.runtimes import runtime_class, runtime_names
from nsdf_hpc.runtimes.base import effective_binds, process_env, version_tuple

CMD = ("sh", "-c", 'echo "$1"; exit 7', "arg with space", "$(id)", "`x`", "a;b", "ünï", "")
NAMES = runtime_names()


def _rt(name):
    cls = runtime_class(name)
    return cls("/opt/bin/" + cls.executables[0], None, {"singularity": "4.1.1"}.get(name, "1.4.5"))


@pytest.mark.parametrize("name", NAMES)
def test_every_runtime_passes_the_command_through_verbatim(name):
    rt = _rt(name)
    spec = RunSpec(image="ubuntu", command=CMD, bind_cwd=False,
                   binds=(Bind(source="/scratch/d", target="/data"),), env={"A": "1"})
    native = NativeImage(runtime=name, source="ubuntu", location="/cache/x.sif" if rt.storage == "file"
                         else "docker:ubuntu:22.04")
    inv = rt.run_invocation(spec, native, {"A": "1", "SLURM_JOB_ID": "7"}, {"PATH": "/usr/bin",
                                                                             "PYTHONPATH": "/leak"})
    # udocker runs behind nsdf_hpc's signal relay (runtimes/_udocker_relay.py)
    assert inv.argv[0] == rt.path or (name == "udocker" and rt.path in inv.head)
    if name == "udocker":
        # udocker 1.3.17 drops empty arguments: such an argv travels in NSDF_HPC_ARGV instead
        assert "NSDF_HPC_ARGV" in " ".join(inv.argv)
    else:
        assert tuple(inv.argv[-len(CMD):]) == CMD
    assert any(native.location in a for a in inv.argv)
    assert "PYTHONPATH" not in inv.env


@pytest.mark.parametrize("name", NAMES)
def test_probe_is_path_plus_a_version_query(name):
    rt = _rt(name)
    argv = rt.version_argv("/opt/bin/tool")
    assert argv[0] == "/opt/bin/tool" and argv[-1] in ("--version", "version", "infohpc")
    env = rt.probe_env({"PATH": "/usr/bin", "LD_PRELOAD": "/evil.so", "HOME": "/h"})
    assert "LD_PRELOAD" not in env and env["PATH"].split(":")[0] == "/usr/bin"


def test_effective_binds_default_binds_the_current_directory():
    spec = RunSpec(image="x", command=("pwd",), cwd="/home/alice/proj")
    binds, workdir = effective_binds(spec)
    assert binds == [Bind(source="/home/alice/proj", target="/home/alice/proj")]
    assert workdir == "/home/alice/proj"
    spec = RunSpec(image="x", command=("pwd",), workdir="/data", binds=(Bind(source="/h", target="/home/alice/proj"),),
                   cwd="/home/alice/proj")
    binds, workdir = effective_binds(spec)
    assert len(binds) == 1 and workdir == "/data"          # an explicit bind at the cwd is kept, not doubled
    binds, workdir = effective_binds(RunSpec(image="x", command=("pwd",), bind_cwd=False))
    assert binds == [] and workdir is None


def test_charliecloud_creates_missing_mount_points_in_directory_images(tmp_path):
    rt = _rt("charliecloud")
    image = tmp_path / "rootfs"
    image.mkdir()
    spec = RunSpec(image="x", command=("ls",), bind_cwd=False, binds=(Bind(source="/scratch/d", target="/data/in"),))
    inv = rt.run_invocation(spec, NativeImage(runtime="charliecloud", source="x", location=str(image)), {}, {})
    assert inv.mkdirs == (str(image / "data/in"),)


def test_process_env_keeps_only_what_the_runtime_needs():
    env = process_env({"PATH": "/p", "HOME": "/h", "CONDA_PREFIX": "/c", "SECRET": "s", "http_proxy": "x"})
    assert env == {"PATH": "/p", "HOME": "/h", "http_proxy": "x"}
    assert process_env({})["PATH"].startswith("/usr/local/sbin")


@pytest.mark.parametrize("text,expected", [
    ("1.4.5", (1, 4, 5)), ("4.1.1+ds2", (4, 1, 1)), ("3.10.0-rc.1", (3, 10, 0)), ("2.5.2-dist", (2, 5, 2)),
    ("0.31", (0, 31)), ("unknown", ()), ("", ()), (None, ()),
])
def test_version_tuple(text, expected):
    assert version_tuple(text) == expected


def test_no_eval_and_no_mount_by_flavour_and_version():
    app = runtime_class("apptainer")
    assert app._has_no_eval("apptainer", "1.1.0") and not app._has_no_eval("apptainer", "1.0.3")
    assert app._has_no_eval("singularityce", "3.10.0") and not app._has_no_eval("singularityce", "3.9.9")
    assert not app._has_no_eval("singularity", "3.11.0")
    assert app._has_no_mount("singularity", "3.7.0") and not app._has_no_mount("singularity", "3.5.3")
    assert app._has_no_mount("singularity", "3.7.0") and not app._has_no_mount("singularity", "2.6.1-dist")


def test_shifter_refuses_paths_its_filter_would_mangle():
    rt = _rt("shifter")
    native = NativeImage(runtime="shifter", source="x", location="docker:ubuntu:22.04")
    for src in ("/data/my dir", "/data/ü", "/data/a,b", "/data/a;b", "/data/a:b", "/data/trailing\n"):
        spec = RunSpec(image="x", command=("true",), bind_cwd=False, binds=(Bind(source=src, target="/mnt"),))
        with pytest.raises(SpecError, match="Shifter cannot bind|path containing"):
            rt.run_invocation(spec, native, {}, {})
    ok = RunSpec(image="x", command=("true",), bind_cwd=False,
                 binds=(Bind(source="/scratch/a_b-c.d+e", target="/mnt"),))
    assert "--volume=/scratch/a_b-c.d+e:/mnt" in rt.run_invocation(ok, native, {}, {}).argv


def test_podman_hpc_refuses_its_own_usage_error_as_a_version():
    rt = runtime_class("podman-hpc")("podman-hpc")
    with pytest.raises(UnexpectedOutputError):
        rt.parse_version("", "Usage: podman-hpc [options] COMMAND [ARGS]...\nError: no such option: --version\n")
    assert rt.parse_version("podman version 4.3.1\n") == ("podman-hpc", "4.3.1")


def test_podman_hpc_offline_import_reads_the_image_id_and_migrates_it_by_id(tmp_path):
    """`podman-hpc pull` prints the image id, then "INFO: Migrating image to <dir>" on stdout
    (NERSC/podman-hpc podman_hpc.py, pull). Its own migrate looks the image up by the source's
    name ("docker-archive:...") and makes no squash (1.2.2, checked on the testbed): the plan
    migrates the imported id and checks that the squash store lists it."""
    archive = tmp_path / "img.tar"
    archive.write_bytes(b"")
    image_id = "f" * 64
    # (the fake answers every call alike: the squash listing shows the id too)
    runner = FakeRunner({"podman-hpc": (0, f"{image_id}\nINFO: Migrating image to /pscratch/alice/storage\n", "")})
    env = {"HOME": str(tmp_path), "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none.toml"), "PATH": "/usr/bin"}
    client = Client(settings=load_settings(env=env), runner=runner, env=env)
    rt = runtime_class("podman-hpc")("podman-hpc")
    source = parse_source(f"docker-archive:{archive}")
    plan = rt.image_plan(source, None, "k" * 64)
    work = tmp_path / "work"
    work.mkdir()
    assert client.images._execute_plan(rt, plan, source, str(work)) == image_id
    assert runner.calls == [("podman-hpc", "pull", "-q", f"docker-archive:{archive}"),
                            ("podman-hpc", "migrate", image_id),
                            ("podman-hpc", "images", "--filter", "readonly=true", "--no-trunc", "--format", "{{.ID}}")]


def test_podman_hpc_asks_the_squash_store_whether_it_holds_an_entry():
    """`podman-hpc image exists` sees only the node's writable store (node-local at NERSC);
    the squash store is listed only by `images` (podman-hpc 1.2.2 siteconfig)."""
    rt = _rt("podman-hpc")
    assert rt.holds_argv(D) == [rt.path, "images", "--no-trunc", "--format", "{{.ID}} {{.ReadOnly}}", D]
    assert rt.holds_argv("f" * 64)[2:4] == ["--filter", "id=" + "f" * 64]
    assert rt.holds_argv("sha256:" + "f" * 64)[3] == "id=" + "f" * 64
    assert rt.parse_holds(0, "sha256:" + "f" * 64 + " false\nsha256:" + "f" * 64 + " true\n") is True
    assert rt.parse_holds(0, "sha256:" + "f" * 64 + " false\n") is False   # writable copy only
    assert rt.parse_holds(0, "") is False
    assert rt.parse_holds(125, "") is None


# ---------------------------------------------------------------- issue 14 item 2: a shared store
D = "127.0.0.1:5443/hpc/busybox@sha256:" + "ab" * 32


def test_podman_claims_a_private_name_and_drops_the_shared_pull_name():
    rt = _rt("podman")
    plan = rt.claim_plan(D, "0123456789abcdef")
    assert plan is not None and plan.location == "localhost/nsdf-hpc/abababababababab:0123456789abcdef"
    assert [s.argv for s in plan.steps] == [
        ("/opt/bin/podman", "tag", D, plan.location),
        ("/opt/bin/podman", "untag", plan.location, D)]
    assert plan.steps[1].check is False          # already gone: nothing to drop
    # an import's image id: only a name is added (the archive's own names are left alone)
    assert [s.argv[1] for s in rt.claim_plan("f" * 64, "o").steps] == ["tag"]


def test_podman_removes_only_names_an_entry_owns():
    rt = _rt("podman")
    assert rt.remove_argv("localhost/nsdf-hpc/abababababababab:0123") == [
        "/opt/bin/podman", "rmi", "--ignore", "localhost/nsdf-hpc/abababababababab:0123"]
    assert "--force" not in rt.remove_argv("localhost/nsdf-hpc/x:y") and "-f" not in rt.remove_argv("localhost/nsdf-hpc/x:y")
    assert rt.remove_argv(D) is None             # an older entry's name, shared by every cache
    assert rt.remove_argv("f" * 64) is None
    assert _rt("podman-hpc").claim_plan(D, "o") is None


@pytest.mark.parametrize("name", NAMES)
def test_only_store_runtimes_ask_their_store(name):
    rt = _rt(name)
    if name in ("podman", "podman-hpc"):
        assert rt.holds_argv("x")[-1] == "x"
        assert rt.parse_holds(125, "") is None
        assert rt.store_size_argv("x")[-1] == "x"
        assert rt.parse_store_size("2134391\n") == 2134391
        guard = rt.orphan_guard("nsdf-run-1", "/tmp/x/run")
        assert guard is not None and guard.options == ("--name", "nsdf-run-1", "--cidfile", "/tmp/x/run",
                                                       "--pidfile", "/tmp/x/run.pid")
        assert guard.remove[1:4] == ("rm", "-f", "--ignore") and guard.remove[-1] == "nsdf-run-1"
        assert (guard.created, guard.started) == ("/tmp/x/run", "/tmp/x/run.pid")
        assert "runc:[2:INIT]" in rt.startup_names
    else:
        assert rt.holds_argv("x") is None and rt.store_size_argv("x") is None
        assert rt.claim_plan("x", "o") is None and rt.orphan_guard("n", "/p") is None
    with pytest.raises(UnexpectedOutputError):
        rt.parse_store_size("Error: image not known\n")


def _client(tmp_path, answers):
    env = {"HOME": str(tmp_path), "NSDF_HPC_SITE_CONFIG": str(tmp_path / "none.toml"),
           "PATH": "/usr/bin", "NSDF_HPC_CACHE": str(tmp_path / "cache")}
    runner = FakeRunner(answers)
    return Client(settings=load_settings(env=env), runner=runner, env=env), runner


@pytest.mark.parametrize("rc, held", [(0, True), (1, False), (125, True)])
def test_a_store_entry_is_usable_only_while_the_store_holds_it(tmp_path, rc, held):
    """exit 1 of `podman image exists` drops the entry (lookup re-pulls, --verify flags it);
    an error that says nothing about the image keeps it."""
    client, runner = _client(tmp_path, {"podman": (rc, "", "")})
    rt = _rt("podman")
    work = client.cache.workdir("podman", "sha256:" + "ab" * 32)
    entry = client.cache.publish(work, "podman", "sha256:" + "ab" * 32,
                                 {"source": "x", "location": "localhost/nsdf-hpc/ab:o"})
    assert client.images.verify(entry, lambda name: rt, full=True) is held
    assert runner.calls[-1] == ("/opt/bin/podman", "image", "exists", "localhost/nsdf-hpc/ab:o")
    assert (client.cache.lookup("podman", entry.digest, verify=client.images.verifier(rt)) is not None) is held


# ---------------------------------------------------------------- issue 14 item 5: podman's early signal
class _Runs:
    """A runner whose first run "was signalled" and whose removal prints ``removed``."""

    def __init__(self, rc, forwarded, removed):
        self.rc, self.forwarded, self.removed, self.calls = rc, forwarded, removed, []

    def run(self, argv, **kwargs):
        self.calls.append(tuple(argv))
        if len(self.calls) == 1:
            return CompletedCommand(tuple(argv), self.rc, forwarded=self.forwarded)
        return CompletedCommand(tuple(argv), 0, self.removed)


@pytest.mark.parametrize("rc, forwarded, created, removed, expected, removals", [
    (0, None, "id", "", 0, 0),             # no signal: nothing more to do
    (7, 15, "id", "", 7, 1),               # the container trapped TERM and exited 7
    (0, 15, "id", "nsdf-1\n", 143, 1),     # podman's shutdown handler exit 0; container left
    (1, 2, "", "", 130, 1),                # INT before the container existed (podman exit 1)
    (130, 2, "id", "", 130, 1),
])
def test_run_guarded_reaps_what_an_early_signal_left(tmp_path, rc, forwarded, created, removed,
                                                      expected, removals):
    cid = tmp_path / "run"
    if created:
        cid.write_text(created)
    runner = _Runs(rc, forwarded, removed)
    res = run_guarded(runner, ["podman", "run"], env=None, capture=False,
                      remove=("podman", "rm", "-f", "x"), created=str(cid))
    assert res.returncode == expected
    assert len(runner.calls) == 1 + removals


def test_run_scratch_is_private_and_removed():
    with run_scratch() as (name, path):
        d = os.path.dirname(path)
        assert os.path.isdir(d) and not os.path.exists(path) and (os.stat(d).st_mode & 0o077) == 0
        assert name.startswith("nsdf-") and name.replace("-", "").isalnum()
    assert not os.path.exists(d)


def test_run_scratch_takes_the_first_temporary_directory_that_works(tmp_path, monkeypatch) -> None:
    """tempfile's order without tempfile (the launch fast path makes one): TMPDIR first, a
    missing one is passed over, and a current directory that was removed is no error."""
    from nsdf_hpc.paths import make_run_scratch
    mine = tmp_path / "tmp"
    mine.mkdir()
    _, d = make_run_scratch({"TMPDIR": str(mine)})
    assert os.path.dirname(d) == str(mine) and (os.stat(d).st_mode & 0o777) == 0o700
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    _, d2 = make_run_scratch({"TMPDIR": str(tmp_path / "missing")})
    assert os.path.dirname(d2) == "/tmp"
    os.rmdir(d2)


def test_podman_hpc_reads_a_half_written_squash_as_broken():
    """migrate2scratch._mksq (1.2.2) takes any existing <link>.squash as done; the superblock,
    which mksquashfs writes last, tells a whole file from a half-written one."""
    import struct
    from nsdf_hpc.runtimes.podman import squash_record, squashfs_problem
    head = b"hsqs" + bytes(36) + struct.pack("<Q", 1421810) + bytes(48)
    assert squashfs_problem(head, 1425408) is None                 # padded to 4 KiB
    assert squashfs_problem(head, 712704) == "truncated (712704 of 1421810 bytes)"
    assert "no superblock" in squashfs_problem(bytes(96), 712704)
    assert "no superblock" in squashfs_problem(b"", 0)
    rec = {"id": "f" * 64, "digest": "sha256:" + "ab" * 32, "layer": "l1",
           "names": ["127.0.0.1:5443/hpc/busybox@sha256:" + "cd" * 32, "127.0.0.1:5443/hpc/busybox:latest"]}
    images = [{"id": "e" * 64, "names": []}, rec]
    assert squash_record(images, D) is rec                        # by the record's digest
    assert squash_record(images, "x/y@sha256:" + "cd" * 32) is rec   # by a digest name
    assert squash_record(images, "sha256:" + "f" * 64) is rec and squash_record(images, "f" * 64) is rec
    assert squash_record(images, "127.0.0.1:5443/hpc/busybox:latest") is rec
    assert squash_record(images, "x/y@sha256:" + "00" * 32) is None
    assert squash_record({"not": "a list"}, D) is None


def test_podman_hpc_reads_its_squash_store_without_starting_a_process(tmp_path):
    import json
    import struct
    rt = _rt("podman-hpc")
    sq = tmp_path / "squash"
    (sq / "overlay-images").mkdir(parents=True)
    (sq / "overlay" / "L1").mkdir(parents=True)
    (sq / "overlay" / "l").mkdir()
    (sq / "overlay-images" / "images.json").write_text(json.dumps(
        [{"id": "f" * 64, "digest": "sha256:" + "ab" * 32, "layer": "L1", "names": [D]}]))
    (sq / "overlay" / "L1" / "link").write_text("LINK")
    squash = sq / "overlay" / "l" / "LINK.squash"
    squash.write_bytes(b"hsqs" + bytes(36) + struct.pack("<Q", 4000) + bytes(4048))
    env = {"SQUASH_DIR": str(sq)}
    assert rt.store_holds(D, env) is True and rt.store_image_problem(D, env) is None
    assert rt.store_holds("x/y@sha256:" + "00" * 32, env) is None       # not listed: ask the tool
    assert rt.store_holds(D, {"SQUASH_DIR": str(tmp_path / "none")}) is None
    os.truncate(squash, 1000)
    assert rt.store_holds(D, env) is None
    why, repair = rt.store_image_problem(D, env)
    assert "truncated (1000 of 4000 bytes)" in why
    assert [s.argv[1] for s in repair.steps] == ["rmsqi", "migrate", "images"]
    assert repair.steps[0].argv[2] == "f" * 64 and repair.steps[-1].expect == "f" * 64
    squash.unlink()
    assert "missing" in rt.store_image_problem(D, env)[0]


# which runtimes carry a plain --env value so that a launch record serves any value: all of
# them, except where the value also lands somewhere a mark cannot stand for it
TEMPLATE_CASES = [
    ("A", "1", {"apptainer", "singularity", "charliecloud", "podman", "podman-hpc", "shifter", "udocker"}),
    ("HOME", "/h", {"charliecloud", "podman", "podman-hpc", "shifter", "udocker"}),   # apptainer: --home VALUE
    ("USER", "u", {"apptainer", "singularity", "charliecloud", "podman", "podman-hpc", "shifter"}),  # udocker: export
]


@pytest.mark.parametrize("name, value, served", TEMPLATE_CASES)
@pytest.mark.parametrize("runtime", NAMES)
def test_env_template_marks_only_values_it_can_put_back(tmp_path, runtime, name, value, served):
    """Client.env_template plans again with marks for the --env values; a record then serves
    any value (issue 11 goal 1). The marked plan, with the values put back, is the real plan."""
    client, _ = _client(tmp_path, {})
    rt = _rt(runtime)
    args = ["run", "-r", runtime, "-e", f"{name}={value}", "ubuntu", "--", "true"]
    spec = RunSpec(image="ubuntu", command=("true",), bind_cwd=False, env={name: value})
    native = NativeImage(runtime=runtime, source="ubuntu", location="/cache/x.sif" if rt.storage == "file"
                         else "docker:ubuntu:22.04")
    inv = client._assemble(spec, rt, native, client.env)
    got = client.env_template(args, spec, rt, native, inv)
    assert (got is not None) == (runtime in served), got
    if got is not None:
        marks, template = got
        assert list(marks.values()) == [name] and template.explicit_env[name] in marks
    # the command line must say exactly what the spec has
    assert client.env_template(args[:3] + args[5:], spec, rt, native, inv) is None


# which runtimes take other --bind directories from a launch record (issue 11 goal 1): all
# whose bind is argv words and mount points made at its destination (udocker's in the
# container's ROOT; charliecloud's in its private copy of a directory image that lacks them)
BIND_SERVED = {"apptainer", "singularity", "charliecloud", "podman", "podman-hpc", "shifter", "udocker"}


@pytest.mark.parametrize("runtime", NAMES)
def test_binds_template_marks_directories_it_can_put_back(tmp_path, runtime):
    client, _ = _client(tmp_path, {})
    rt = _rt(runtime)
    src = tmp_path / "in"
    src.mkdir()
    (tmp_path / "img").mkdir()     # a directory image without /data
    args = ["run", "-r", runtime, "-B", f"{src}:/data:ro", f"--bind={src}", "ubuntu", "--", "true"]
    spec = RunSpec(image="ubuntu", command=("true",), bind_cwd=False, cwd=str(tmp_path),
                   binds=(Bind(source=str(src), target="/data", read_only=True), Bind(source=str(src), target=str(src))))
    native = NativeImage(runtime=runtime, source="ubuntu", location="/cache/x.sif" if rt.storage == "file"
                         else str(tmp_path / "img") if rt.storage == "directory" else "docker:ubuntu:22.04",
                         digest="sha256:" + "ab" * 32)
    inv = client._assemble(spec, rt, native, client.env)
    got = client.binds_template(args, spec, rt, native, inv)
    assert (got is not None) == (runtime in BIND_SERVED), got
    if got is not None:
        marks, template = got
        assert sorted(marks.values()) == ["-B0:source", "-B0:target", "-B1:source", "-B1:target"]
        words = " ".join([*template.head, *template.tail])
        assert all(m in words for m in marks) and str(src) not in words
    # what the command line says must be exactly the spec's binds, and each source a directory
    assert client.binds_template(args[:3] + args[5:], spec, rt, native, inv) is None
    (tmp_path / "file").write_text("")
    filed = spec.model_copy(update={"binds": (Bind(source=str(tmp_path / "file"), target="/f"),)})
    assert client.binds_template(["run", "-B", f"{tmp_path}/file:/f", "ubuntu"], filed, rt, native,
                                 client._assemble(filed, rt, native, client.env)) is None


def test_charliecloud_serves_other_sources_at_a_destination_its_image_has(tmp_path):
    """A destination the directory image has needs no mount point; a mark in its place would
    (a private copy): the record then keeps the destination and marks the source only."""
    client, _ = _client(tmp_path, {})
    rt = _rt("charliecloud")
    src = tmp_path / "in"
    src.mkdir()
    (tmp_path / "img" / "data").mkdir(parents=True)
    native = NativeImage(runtime="charliecloud", source="ubuntu", location=str(tmp_path / "img"),
                         digest="sha256:" + "ab" * 32)
    spec = RunSpec(image="ubuntu", command=("true",), bind_cwd=False, cwd=str(tmp_path),
                   binds=(Bind(source=str(src), target="/data"),))
    inv = client._assemble(spec, rt, native, client.env)
    args = ["run", "-r", "charliecloud", "-B", f"{src}:/data", "ubuntu", "--", "true"]
    assert inv.tree is None and client.binds_template(args, spec, rt, native, inv) is None
    marks, template = client.binds_template(args, spec, rt, native, inv, targets=False)
    assert list(marks.values()) == ["-B0:source"] and template.tree is None
    assert [w for w in template.head if w.startswith("--bind=")] == [f"--bind={next(iter(marks))}:/data"]
    # a bind that names no destination cannot keep one in the key
    alone = spec.model_copy(update={"binds": (Bind(source=str(src), target=str(src)),)})
    assert client.binds_template(["run", "-B", str(src), "ubuntu"], alone, rt, native,
                                 client._assemble(alone, rt, native, client.env), targets=False) is None


def test_podman_finds_its_store_as_containers_storage_does():
    """Where podman's store lists its images, from storage.conf and the defaults (pure); None
    whenever the reading is not certain, and the caller then asks podman."""
    from nsdf_hpc.runtimes.podman import store_images_file

    def files(**tables):
        return lambda path: tables.get(path)
    debian = {"/usr/share/containers/storage.conf": {"driver": "overlay", "graphroot": "/var/lib/containers/storage"}}
    home = {"HOME": "/home/u"}
    both = lambda p: True   # noqa: E731
    assert store_images_file(home, 0, files(**debian), both) == "/var/lib/containers/storage/overlay-images/images.json"
    # /etc overrides /usr/share; CONTAINERS_STORAGE_CONF overrides both
    etc = {**debian, "/etc/containers/storage.conf": {"driver": "vfs", "graphroot": "/srv/store"}}
    assert store_images_file(home, 0, files(**etc), both) == "/srv/store/vfs-images/images.json"
    mine = {**etc, "/x.conf": {"driver": "overlay", "graphroot": "/x"}}
    assert store_images_file({**home, "CONTAINERS_STORAGE_CONF": "/x.conf"}, 0, files(**mine), both) == \
        "/x/overlay-images/images.json"
    # rootless: the user's data directory (the system's graphroot is root's), the system's driver
    assert store_images_file(home, 1000, files(**debian), both) == \
        "/home/u/.local/share/containers/storage/overlay-images/images.json"
    assert store_images_file({**home, "XDG_DATA_HOME": "/d"}, 1000, files(**debian), both) == \
        "/d/containers/storage/overlay-images/images.json"
    rsp = {"/usr/share/containers/storage.conf": {"driver": "overlay", "rootless_storage_path": "/scratch/u/c"}}
    assert store_images_file(home, 1000, files(**rsp), both) == "/scratch/u/c/overlay-images/images.json"
    user = {**debian, "/home/u/.config/containers/storage.conf": {"driver": "vfs", "graphroot": "/u/g"}}
    assert store_images_file(home, 1000, files(**user), both) == "/u/g/vfs-images/images.json"
    # not certain: $VARs in the path, an unreadable file, no driver with both stores present
    dollar = {"/usr/share/containers/storage.conf": {"rootless_storage_path": "$HOME/s", "driver": "overlay"}}
    assert store_images_file(home, 1000, files(**dollar), both) is None
    broken = {"/etc/containers/storage.conf": {"?": "not TOML"}}
    assert store_images_file(home, 0, files(**broken), both) is None
    assert store_images_file(home, 0, files(), both) is None
    assert store_images_file(home, 0, files(), lambda p: p.endswith("/vfs-images")) == \
        "/var/lib/containers/storage/vfs-images/images.json"
    assert store_images_file({}, 1000, files(**debian), both) is None      # no HOME: no data directory


def test_podman_store_holds_only_what_its_images_file_lists(tmp_path):
    import json
    store = tmp_path / "store"
    (store / "overlay-images").mkdir(parents=True)
    (store / "overlay-images" / "images.json").write_text(json.dumps(
        [{"id": "f" * 64, "digest": "sha256:" + "ab" * 32, "names": ["localhost/nsdf-hpc/ab:o"]}]))
    conf = tmp_path / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{store}"\nrootless_storage_path = "{store}"\n')
    rt = _rt("podman")
    env = {"HOME": str(tmp_path), "CONTAINERS_STORAGE_CONF": str(conf)}
    assert rt.store_holds("localhost/nsdf-hpc/ab:o", env) is True
    assert rt.store_holds("localhost/nsdf-hpc/cd:o", env) is None        # not listed: ask podman
    (store / "overlay-images" / "images.json").write_text("{half")
    assert rt.store_holds("localhost/nsdf-hpc/ab:o", env) is None
    conf.write_text("driver = [\n")
    assert rt.store_holds("localhost/nsdf-hpc/ab:o", env) is None
