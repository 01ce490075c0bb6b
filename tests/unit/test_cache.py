"""ImageCache: cross-process locks, atomic publication, integrity checks, stale-lock recovery."""
from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import socket
import time

import pytest

from nsdf_hpc.cache import ImageCache
from nsdf_hpc.errors import ImageError

D = "sha256:" + "c" * 64
CTX = multiprocessing.get_context("fork")


def _hold(root: str, log: str, tag: str, hold: float) -> None:
    cache = ImageCache(root)
    with cache.locked("apptainer", D, timeout=30):
        with open(log, "a") as fh:
            fh.write(f"{tag} enter {time.monotonic()}\n")
        time.sleep(hold)
        with open(log, "a") as fh:
            fh.write(f"{tag} exit {time.monotonic()}\n")


def test_lock_excludes_other_processes(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    log = str(tmp_path / "log")
    procs = [CTX.Process(target=_hold, args=(cache.root, log, f"p{i}", 0.15)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(20)
        assert p.exitcode == 0
    events = [line.split() for line in open(log)]
    assert len(events) == 6
    # enter/exit strictly alternate, and each exit belongs to the process that entered
    for i in range(0, 6, 2):
        assert events[i][1] == "enter" and events[i + 1][1] == "exit"
        assert events[i][0] == events[i + 1][0]
        if i:
            assert float(events[i][2]) >= float(events[i - 1][2])


def _publish_one(cache: ImageCache, body: bytes = b"x" * 4096):
    work = cache.workdir("apptainer", D)
    with open(os.path.join(work, "image.sif"), "wb") as fh:
        fh.write(body)
    return work, cache.publish(work, "apptainer", D, {"source": "ubuntu", "location": "image.sif",
                                                      "relative": True}, main_file="image.sif")


def test_publish_is_atomic_and_lookup_is_lock_free(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    assert cache.lookup("apptainer", D) is None
    work = cache.workdir("apptainer", D)
    with open(os.path.join(work, "image.sif"), "wb") as fh:
        fh.write(b"half")
    # a conversion in progress is invisible
    assert cache.lookup("apptainer", D) is None
    assert not os.path.exists(cache.entry_dir("apptainer", D))
    entry = cache.publish(work, "apptainer", D, {"source": "ubuntu", "location": "image.sif", "relative": True},
                          main_file="image.sif")
    assert not os.path.exists(work)                                   # renamed, not copied
    assert entry.path == cache.entry_dir("apptainer", D)
    assert sorted(os.listdir(entry.path)) == ["entry.json", "image.sif"]
    found = cache.lookup("apptainer", D)
    assert found is not None and found.location == os.path.join(entry.path, "image.sif")
    assert found.data["files"]["image.sif"]["sha256"].startswith("sha256:")
    assert os.listdir(os.path.dirname(entry.path)) == [os.path.basename(entry.path)]   # no temp names
    assert not [n for n in os.listdir(os.path.join(cache.root, "tmp")) if not n.startswith("trash-")]


def test_truncated_artifact_is_detected_and_discarded(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    _work, entry = _publish_one(cache)
    with open(os.path.join(entry.path, "image.sif"), "r+b") as fh:
        fh.truncate(100)
    assert cache.lookup("apptainer", D) is None
    assert not os.path.exists(entry.path), "a bad entry is moved away so it gets rebuilt"
    # and the next build publishes again
    _publish_one(cache)
    assert cache.lookup("apptainer", D) is not None


def test_tampered_artifact_same_size_is_detected(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    _work, entry = _publish_one(cache)
    p = os.path.join(entry.path, "image.sif")
    with open(p, "r+b") as fh:
        fh.write(b"EVIL")
    os.utime(p, ns=(0, 12345))          # new mtime: the sha256 decides
    assert cache.lookup("apptainer", D) is None


def test_broken_entry_json_and_site_tier(tmp_path):
    site = ImageCache(str(tmp_path / "site"))
    site.ensure_dirs()
    _publish_one(site)
    cache = ImageCache(str(tmp_path / "c"), site_tiers=[site.root])
    found = cache.lookup("apptainer", D)
    assert found is not None and found.tier == "site"
    os.makedirs(cache.entry_dir("podman", D))
    with open(os.path.join(cache.entry_dir("podman", D), "entry.json"), "w") as fh:
        fh.write("{truncated")
    assert cache.lookup("podman", D) is None


def _hold_with_heartbeat(path: str, beat: float, ready) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"owner": "deadnode:1234", "heartbeat": beat}).encode(), 0)
    ready.set()
    time.sleep(30)


def _holder(cache: ImageCache, beat: float):
    os.makedirs(os.path.dirname(cache.lock_path("apptainer", D)), exist_ok=True)
    ready = CTX.Event()
    p = CTX.Process(target=_hold_with_heartbeat, args=(cache.lock_path("apptainer", D), beat, ready))
    p.start()
    assert ready.wait(10)
    return p


def test_stale_lock_is_recovered(tmp_path):
    cache = ImageCache(str(tmp_path / "c"), stale_after=5)
    p = _holder(cache, time.time() - 3600)          # a node died an hour ago holding the lock
    try:
        waits = []
        t0 = time.monotonic()
        with cache.locked("apptainer", D, timeout=10, on_wait=waits.append):
            assert time.monotonic() - t0 < 5
            owner = json.loads(open(cache.lock_path("apptainer", D)).read())
            assert owner["owner"] == f"{socket.gethostname()}:{os.getpid()}"
        assert waits and waits[0]["owner"] == "deadnode:1234"
    finally:
        p.kill()
        p.join()


def test_live_lock_is_waited_for_and_times_out_naming_the_owner(tmp_path):
    cache = ImageCache(str(tmp_path / "c"), stale_after=600)
    p = _holder(cache, time.time())
    try:
        with pytest.raises(ImageError, match="held by deadnode:1234"):
            with cache.locked("apptainer", D, timeout=0.3):
                pass
    finally:
        p.kill()
        p.join()


def test_clean_tmp_removes_dead_pid_work_dirs(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    dead = CTX.Process(target=lambda: None)
    dead.start()
    dead.join()
    host = socket.gethostname()
    tmp = os.path.join(cache.root, "tmp")
    dead_dir = os.path.join(tmp, f"apptainer-sha256-{'c' * 64}.{host}.{dead.pid}.abcd1234")
    live_dir = os.path.join(tmp, f"apptainer-sha256-{'c' * 64}.{host}.{os.getpid()}.abcd1234")
    other_host = os.path.join(tmp, f"apptainer-sha256-{'c' * 64}.othernode.{dead.pid}.abcd1234")
    trash = os.path.join(tmp, "trash-0123456789ab")
    for d in (dead_dir, live_dir, other_host, trash):
        os.makedirs(os.path.join(d, "sub"))
        os.chmod(os.path.join(d, "sub"), 0o500)          # read-only dirs from image layers
    assert cache.clean_tmp() == 2
    assert sorted(os.listdir(tmp)) == sorted(os.path.basename(d) for d in (live_dir, other_host))
    # another node's leftovers go only by age (prune)
    old = time.time() - 7200
    os.utime(other_host, (old, old))
    assert cache.clean_tmp(older_than=3600) == 1
    assert os.listdir(tmp) == [os.path.basename(live_dir)]


def test_workdir_clears_dead_leftovers_of_the_same_key(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    stale = os.path.join(cache.root, "tmp", f"apptainer-sha256-{'c' * 64}.{socket.gethostname()}.999999999.0000")
    os.makedirs(stale)
    w = cache.workdir("apptainer", D)
    assert os.path.isdir(w) and not os.path.exists(stale)


def test_unwritable_cache_names_the_variable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "file").write_text("")
    with pytest.raises(ImageError, match="NSDF_HPC_CACHE"):
        ImageCache(str(ro / "file" / "cache")).ensure_dirs()


def test_a_bad_site_entry_is_reported_once_per_process(tmp_path, caplog):
    site = ImageCache(str(tmp_path / "site"))
    site.ensure_dirs()
    _publish_one(site)
    cache = ImageCache(str(tmp_path / "c"), site_tiers=[site.root])
    with caplog.at_level("WARNING", logger="nsdf_hpc.cache"):
        for _ in range(3):   # a run looks up more than once (pull, then plan)
            assert cache.lookup("apptainer", D, verify=lambda e: False) is None
    assert len([r for r in caplog.records if "site cache entry" in r.getMessage()]) == 1


def test_verify_full_notices_a_changed_directory_image(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    work = cache.workdir("charliecloud", D)
    os.makedirs(os.path.join(work, "rootfs", "etc"))
    with open(os.path.join(work, "rootfs", "etc", "hostname"), "w") as fh:
        fh.write("x\n")
    entry = cache.publish(work, "charliecloud", D, {"source": "s", "location": "rootfs", "relative": True},
                          dirs=["rootfs"])
    assert cache.verify_full(entry)
    os.makedirs(os.path.join(entry.path, "run-1000", "newdir"))   # a private run copy is not the image
    assert cache.verify_full(entry)
    os.makedirs(os.path.join(entry.path, "rootfs", "newdir"))
    assert not cache.verify_full(entry)


def _hold_use(root: str, digest: str, ready, stop) -> None:
    cache = ImageCache(root)
    fd = cache.hold_use("apptainer", digest)
    assert fd is not None
    ready.set()
    stop.wait(30)
    os.close(fd)


def _service(cache: ImageCache):
    from nsdf_hpc.config import load_settings
    from nsdf_hpc.images import ImageService
    return ImageService(load_settings({}), {}, None, cache, lambda: None, lambda e: None)  # type: ignore[arg-type]


def test_prune_keeps_an_entry_another_process_uses_and_meets_the_size_with_the_next(tmp_path):
    """The use lock (ImageCache.use_path) held shared by another process keeps its entry; the
    size target is met with the next least recently used one instead."""
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    digests = ["sha256:" + c * 64 for c in "abc"]
    for i, d in enumerate(digests):
        work = cache.workdir("apptainer", d)
        with open(os.path.join(work, "image.sif"), "wb") as fh:
            fh.write(b"x" * 4096)
        cache.publish(work, "apptainer", d, {"source": f"img{i}", "location": "image.sif", "relative": True},
                      main_file="image.sif")
        os.utime(os.path.join(cache.entry_dir("apptainer", d), "entry.json"), (1000 + i, 1000 + i))
    ctx = multiprocessing.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_use, args=(cache.root, digests[0], ready, stop))
    holder.start()
    try:
        assert ready.wait(10)
        service = _service(cache)
        kept = []
        by_entry = {e.digest: e for e in cache.entries()}
        assert cache.in_use(by_entry[digests[0]]) and not cache.in_use(by_entry[digests[1]])
        # the oldest is in use: max 5000 bytes is met by removing the two others
        removed = service.prune(lambda name: None, max_size=5000, on_kept=lambda e, why: kept.append((e.digest, why)))
        assert [e.digest for e in removed] == digests[1:]
        assert kept == [(digests[0], "in use by a running container or Slurm task")]
        assert [e.digest for e in cache.entries()] == [digests[0]]
    finally:
        stop.set()
        holder.join(10)
    # released: it goes
    assert [e.digest for e in _service(cache).prune(lambda name: None, max_size=0)] == [digests[0]]


def test_prune_asks_about_the_jobs_that_pinned_an_entry(tmp_path):
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    _publish_one(cache)
    (entry,) = cache.entries()
    assert cache.pin("apptainer", D, ["41", "42"])
    service = _service(cache)
    kept = []
    asked = []

    def alive(ids):
        asked.append(list(ids))
        return {"42"}
    assert service.prune(lambda n: None, max_size=0, jobs_alive=alive, on_kept=lambda e, w: kept.append(w)) == []
    assert asked == [["41", "42"]] and kept == ["Slurm job 42 (queued or running) needs it"]
    kept.clear()
    assert service.prune(lambda n: None, max_size=0, jobs_alive=lambda ids: None,
                         on_kept=lambda e, w: kept.append(w)) == []
    assert "its state cannot be read now" in kept[0]
    assert len(service.prune(lambda n: None, max_size=0, jobs_alive=lambda ids: set())) == 1
    assert cache.entries() == [] and not os.path.exists(cache.pin_dir("apptainer", D))


def test_a_pruned_build_no_longer_stands_for_its_tag(tmp_path):
    """A tag built here for podman names that build only while its cache entry exists: once
    pruned, the tag is pulled again (not "built here for podman, not for apptainer")."""
    from nsdf_hpc.reference import parse_reference
    cache = ImageCache(str(tmp_path / "c"))
    cache.ensure_dirs()
    digest = "sha256:" + "d" * 64
    work = cache.workdir("podman", digest)
    cache.publish(work, "podman", digest, {"source": "nsdf/mpi:v1.0.0", "location": "x", "relative": False})
    ref = parse_reference("nsdf/mpi:v1.0.0")
    cache.remember_ref(ref.slug(), digest, 1, built={"podman": digest})
    service = _service(cache)
    assert service.built_digests(ref) == {"podman": digest}
    entry = cache.lookup("podman", digest)
    assert entry is not None and cache.remove(entry)
    assert service.built_digests(ref) == {}


@pytest.mark.parametrize("size", [0, 1, (1 << 16) - 1, 1 << 18, (1 << 16) + 1, 3 * (1 << 16) + 12345])
def test_a_file_is_hashed_whole_through_its_fixed_buffer(tmp_path, size):
    import hashlib

    from nsdf_hpc.cache import _hash_file
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert _hash_file(str(tmp_path / "f")) == "sha256:" + hashlib.sha256(data).hexdigest()
