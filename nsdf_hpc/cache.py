"""The image cache: keyed by digest and runtime, safe across processes and nodes.

Layout under the cache root (one filesystem, so renames are atomic)::

    entries/<runtime>/<alg>-<hex>/      a published entry: entry.json + artifacts
    locks/<runtime>-<alg>-<hex>.lock    fcntl byte-range lock + owner/heartbeat record
    tmp/<runtime>-<alg>-<hex>.<host>.<pid>.<rand>/   a conversion in progress
    refs/<slug>.json                    tag -> digest, as last resolved

* Locks are ``fcntl`` (POSIX record) locks, which NFS (lockd), Lustre and GPFS honour across
  nodes; ``flock`` is node-local on GPFS and is not used. The owner writes host, pid and a
  heartbeat into the lock file; a waiter that sees no heartbeat for ``stale_after`` seconds
  (a node died with the lock) replaces the lock file. A double conversion after that is
  harmless: both produce the same digest-keyed entry and the publish is an atomic rename.
* An entry becomes visible only by ``rename(tmp, entries/...)`` after its files are written and
  ``entry.json`` is fsynced; a killed conversion leaves only a ``tmp/`` directory, which the
  next pull of the same key removes (same host, dead pid) and ``prune`` removes everywhere.
* Reads take no lock: an entry is checked by the sizes and mtimes recorded in ``entry.json``;
  a mismatch triggers a full sha256 check, and a bad entry is moved away and rebuilt.
* Read-only site tiers (``site_cache_dirs``) are looked up first, so admins can pre-stage.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import stat
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

from ._fsutil import atomic_write_json
from .errors import ImageError
from .paths import remove_files_and_dir

logger = logging.getLogger(__name__)

ENTRY_FILE = "entry.json"
LAST_USE = ".last-use"
FORMAT = 1


def _token(n: int) -> str:
    return os.urandom(n).hex()


def _hostname() -> str:
    return os.uname().nodename


def key_for(digest: str) -> str:
    return digest.replace(":", "-")


def _hash_file(path: str) -> str:
    """sha256 of a file, read into one 64 KiB buffer (a new 1 MiB ``bytes`` per read
    held two of them at once: 2 MB of a cold run's peak memory)."""
    h = hashlib.sha256()
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return "sha256:" + h.hexdigest()


def _file_records(root: str, main: Optional[str]) -> Dict[str, Dict[str, Any]]:
    """Size and mtime of every regular file in ``root`` (sha256 of the main artifact file)."""
    out: Dict[str, Dict[str, Any]] = {}
    if main and os.path.isfile(os.path.join(root, main)):
        p = os.path.join(root, main)
        st = os.stat(p)
        out[main] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _hash_file(p)}
    return out


def tree_digest(root: str) -> str:
    """One digest over a directory image's metadata: every path with its type, mode, size,
    mtime and link target (a file added, removed, resized or rewritten changes it)."""
    h = hashlib.sha256()
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(top, name)
            try:
                st = os.lstat(p)
                link = os.readlink(p) if stat.S_ISLNK(st.st_mode) else ""
            except OSError:
                continue
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            rel = os.path.relpath(p, root)
            h.update(f"{rel}\0{st.st_mode:o}\0{size}\0{st.st_mtime_ns}\0{link}\n".encode(
                "utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


class Entry:
    """A published cache entry: its directory, its ``entry.json`` and its tier ("user" or
    "site"). A plain class, not a dataclass: ``nsdf-run images`` lists entries without
    importing dataclasses and inspect (``_listing.py``)."""

    __slots__ = ("path", "data", "tier")

    def __init__(self, path: str, data: Dict[str, Any], tier: str = "user") -> None:
        self.path, self.data, self.tier = path, data, tier

    def __repr__(self) -> str:
        return f"Entry(path={self.path!r}, data={self.data!r}, tier={self.tier!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return (self.path, self.data, self.tier) == (other.path, other.data, other.tier)

    __hash__ = None   # type: ignore[assignment]   # mutable data, as the dataclass had

    @property
    def runtime(self) -> str:
        return str(self.data.get("runtime", ""))

    @property
    def digest(self) -> str:
        return str(self.data.get("digest", ""))

    @property
    def location(self) -> str:
        loc = str(self.data.get("location", ""))
        return loc if not self.data.get("relative") else os.path.join(self.path, loc)

    def size(self) -> int:
        return int(self.data.get("size") or 0)

    def last_use(self) -> float:
        for name in (LAST_USE, ENTRY_FILE):
            try:
                return os.stat(os.path.join(self.path, name)).st_mtime
            except OSError:
                continue
        return 0.0


class ImageCache:
    """Digest-keyed entries with cross-node locking and atomic publication."""

    def __init__(self, root: str, site_tiers: Sequence[str] = (), *, stale_after: float = 120.0,
                 heartbeat: float = 10.0) -> None:
        self.root = os.path.abspath(root)
        self.site_tiers = [os.path.abspath(t) for t in site_tiers]
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self._warned: Set[str] = set()

    # ---------------------------------------------------------------- paths
    def entry_dir(self, runtime: str, digest: str, root: Optional[str] = None) -> str:
        return os.path.join(root or self.root, "entries", runtime, key_for(digest))

    def lock_path(self, runtime: str, digest: str) -> str:
        return os.path.join(self.root, "locks", f"{runtime}-{key_for(digest)}.lock")

    def use_path(self, runtime: str, digest: str) -> str:
        """The entry's use lock: every run of it holds a shared ``flock`` on this file for as
        long as its container runs (inherited by the runtime, so an exec'd runtime keeps it;
        a batch script takes it with ``flock -s``); ``remove`` needs it exclusively."""
        return os.path.join(self.root, "locks", f"{runtime}-{key_for(digest)}.use")

    @staticmethod
    def _names(entry: Entry) -> str:
        """``<runtime>-<key>`` from the entry's directory (``entries/<runtime>/<key>``), which
        a damaged entry.json cannot change."""
        return f"{os.path.basename(os.path.dirname(entry.path))}-{os.path.basename(entry.path)}"

    def hold_use(self, runtime: str, digest: str) -> Optional[int]:
        """Take the entry's use lock shared and return its (non-inheritable) descriptor, which
        releases it when closed; waits while a prune removes the entry (then the entry is gone,
        which the caller checks). None when the lock cannot be taken (a read-only cache: its
        entries are not pruned by this user)."""
        try:
            fd = os.open(self.use_path(runtime, digest), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            os.close(fd)
            return None
        return fd

    @contextmanager
    def unused(self, entry: Entry) -> Iterator[bool]:
        """Yields True, holding the entry's use lock exclusively, when no run holds it; False
        when one does (a running container, or a Slurm job's task)."""
        path = os.path.join(self.root, "locks", self._names(entry) + ".use")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            try:   # a cache this user cannot write: a lock file that exists is still read
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                yield True      # no such lock file: no run holds it
                return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ImageError(f"cannot lock {path}: {err.strerror}") from None
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def pin_dir(self, runtime: str, digest: str) -> str:
        """One empty file per Slurm job submitted with the entry (``pin``): a prune asks the
        scheduler about these jobs and keeps the entry while one is queued or running."""
        return os.path.join(self.root, "pins", f"{runtime}-{key_for(digest)}")

    def pin(self, runtime: str, digest: str, job_ids: Sequence[str]) -> bool:
        """Record that these jobs will run the entry; False when that cannot be written."""
        d = self.pin_dir(runtime, digest)
        try:
            for j in job_ids:
                path = os.path.join(d, os.path.basename(str(j)))
                try:
                    open(path, "a").close()
                except FileNotFoundError:      # the entry's first pin
                    os.makedirs(d, exist_ok=True)
                    open(path, "a").close()
        except OSError as err:
            logger.warning("cannot record job %s as a user of its image in %s (%s): a prune "
                           "may remove the image while the job is queued", ",".join(job_ids), d,
                           err.strerror)
            return False
        return True

    def pins(self, entry: Entry) -> List[str]:
        try:
            return sorted(os.listdir(os.path.join(self.root, "pins", self._names(entry))))
        except OSError:
            return []

    def unpin(self, entry: Entry, job_ids: Sequence[str]) -> None:
        remove_files_and_dir(os.path.join(self.root, "pins", self._names(entry)), job_ids)

    def ensure_dirs(self) -> None:
        for sub in ("entries", "locks", "tmp", "refs"):
            try:
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
            except OSError as err:
                raise ImageError(f"cannot create the image cache at {self.root}: {err.strerror}; "
                                 "set NSDF_HPC_CACHE to a writable directory (e.g. on $SCRATCH)") from None

    # ---------------------------------------------------------------- lookup
    def lookup(self, runtime: str, digest: str, *, verify: Optional[Callable[[Entry], bool]] = None,
               touch: bool = True) -> Optional[Entry]:
        """A valid published entry, from a site tier first, else ours; no lock taken."""
        for tier, root in [*[("site", t) for t in self.site_tiers], ("user", self.root)]:
            d = self.entry_dir(runtime, digest, root)
            entry = self._read(d, tier)
            if entry is None:
                continue
            if not self.check(entry) or (verify is not None and not verify(entry)):
                if tier == "user":
                    self.discard(entry, "failed its integrity check")
                elif d not in self._warned:   # once per process, however often it is looked up
                    self._warned.add(d)
                    logger.warning("site cache entry %s failed its integrity check (or its runtime "
                                   "store is not readable by this user); ignoring it", d)
                continue
            if touch and tier == "user":
                self._touch(entry)
            return entry
        return None

    @staticmethod
    def _read(d: str, tier: str) -> Optional[Entry]:
        try:
            with open(os.path.join(d, ENTRY_FILE)) as fh:
                data = json.load(fh)
        except (FileNotFoundError, NotADirectoryError):   # no entry (or no cache dir at all)
            return None
        except (OSError, ValueError) as err:
            logger.warning("unreadable cache entry %s: %s", d, err)
            return Entry(d, {"broken": str(err)}, tier)
        why = _malformed(data)
        if why:
            logger.warning("unreadable cache entry %s: %s", d, why)
            return Entry(d, {"broken": why}, tier)
        return Entry(d, data, tier)

    def check(self, entry: Entry) -> bool:
        """Cheap check (stat): every recorded file has its size and mtime; on a mismatch,
        the sha256 decides (a copy with a new mtime but the same bytes is fine)."""
        if entry.data.get("broken") or entry.data.get("format") != FORMAT:
            return False
        for rel, rec in (entry.data.get("files") or {}).items():
            p = os.path.join(entry.path, rel)
            try:
                st = os.stat(p)
            except OSError:
                return False
            if st.st_size != rec.get("size"):
                return False
            if st.st_mtime_ns != rec.get("mtime_ns") and rec.get("sha256"):
                if _hash_file(p) != rec["sha256"]:
                    return False
        for rel in entry.data.get("dirs") or []:
            if not os.path.isdir(os.path.join(entry.path, rel)):
                return False
        return True

    def verify_full(self, entry: Entry) -> bool:
        """Re-hash every recorded artifact, and compare every directory image with what was
        converted (``nsdf-run images --verify``)."""
        for rel, rec in (entry.data.get("files") or {}).items():
            if rec.get("sha256") and _hash_file(os.path.join(entry.path, rel)) != rec["sha256"]:
                return False
        for rel, digest in (entry.data.get("trees") or {}).items():
            if tree_digest(os.path.join(entry.path, rel)) != digest:
                return False
        return self.check(entry)

    def _touch(self, entry: Entry) -> None:
        p = os.path.join(entry.path, LAST_USE)
        try:
            os.utime(p)
        except FileNotFoundError:
            try:
                open(p, "a").close()
            except OSError:
                pass
        except OSError:
            pass

    def discard(self, entry: Entry, why: str) -> None:
        """Move a bad entry out of the way (atomic), then delete it."""
        logger.warning("cache entry %s %s; rebuilding it", entry.path, why)
        trash = os.path.join(self.root, "tmp", f"trash-{_token(6)}")
        try:
            os.rename(entry.path, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    # ---------------------------------------------------------------- locking
    @contextmanager
    def locked(self, runtime: str, digest: str, *, timeout: float = 3600.0,
               on_wait: Optional[Callable[[Dict[str, Any]], None]] = None) -> Iterator[None]:
        """Hold the conversion lock for (runtime, digest); waits, recovering stale locks."""
        path = self.lock_path(runtime, digest)
        deadline = time.monotonic() + timeout
        delay = 0.05
        waited = False
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise ImageError(f"cannot lock {path}: {err.strerror}") from None
                owner = self._owner(path)
                if not waited and on_wait:
                    on_wait(owner)
                waited = True
                last_beat = float(owner.get("heartbeat") or 0)
                if last_beat and time.time() - last_beat > self.stale_after:
                    logger.warning("lock %s held by %s without a heartbeat for %.0f s: replacing it",
                                   path, owner.get("owner"), time.time() - last_beat)
                    self._replace_lock(path)
                    continue
                if time.monotonic() > deadline:
                    raise ImageError(f"timed out after {timeout:.0f} s waiting for {path} "
                                     f"(held by {owner.get('owner', 'unknown')})")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.25)   # waiters notice a publish within 0.25 s
                continue
            # the file we locked may have been replaced while we waited on it
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            break
        stop = threading.Event()
        self._write_owner(fd)
        beat = threading.Thread(target=self._beat, args=(fd, stop), daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join(timeout=1)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)   # closing releases the fcntl lock

    def _beat(self, fd: int, stop: "threading.Event") -> None:
        while not stop.wait(self.heartbeat):
            self._write_owner(fd)

    @staticmethod
    def _write_owner(fd: int) -> None:
        rec = json.dumps({"owner": f"{_hostname()}:{os.getpid()}",
                          "heartbeat": time.time()}).encode()
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, rec, 0)
        except OSError:
            pass

    @staticmethod
    def _owner(path: str) -> Dict[str, Any]:
        try:
            with open(path) as fh:
                data = json.loads(fh.read() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _replace_lock(path: str) -> None:
        tmp = f"{path}.{_token(4)}"
        try:
            with open(tmp, "w"):
                pass
            os.replace(tmp, path)
        except OSError:
            pass

    # ---------------------------------------------------------------- building
    def workdir(self, runtime: str, digest: str) -> str:
        """A fresh private directory on the cache filesystem; removes dead leftovers first."""
        self.clean_tmp(prefix=f"{runtime}-{key_for(digest)}.")
        d = os.path.join(self.root, "tmp", f"{runtime}-{key_for(digest)}.{_hostname()}."
                         f"{os.getpid()}.{_token(4)}")
        os.makedirs(d)
        return d

    def clean_tmp(self, prefix: str = "", older_than: Optional[float] = None) -> int:
        """Remove conversion leftovers whose process is gone (this host) or that are old."""
        tmp = os.path.join(self.root, "tmp")
        host = _hostname()
        removed = 0
        try:
            names = os.listdir(tmp)
        except OSError:
            return 0
        for name in names:
            if not name.startswith(prefix):
                continue
            p = os.path.join(tmp, name)
            parts = name.rsplit(".", 3)
            dead = False
            if name.startswith("trash-"):
                dead = True
            elif len(parts) == 4 and parts[1] == host and parts[2].isdigit():
                dead = not _pid_alive(int(parts[2]))
            if not dead and older_than is not None:
                try:
                    dead = time.time() - os.stat(p).st_mtime > older_than
                except OSError:
                    continue
            if dead:
                rmtree(p)
                removed += 1
        return removed

    def publish(self, workdir: str, runtime: str, digest: str, data: Dict[str, Any],
                main_file: Optional[str] = None, dirs: Sequence[str] = (), extra_size: int = 0) -> Entry:
        """Record the artifacts' sizes and hashes, then make the entry visible atomically."""
        files = _file_records(workdir, main_file)
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(workdir) for f in fs
                   if not os.path.islink(os.path.join(r, f))) + extra_size
        data = {**data, "format": FORMAT, "runtime": runtime, "digest": digest, "files": files,
                "dirs": list(dirs), "trees": {d: tree_digest(os.path.join(workdir, d)) for d in dirs}, "size": size, "created": time.time(),
                "builder": f"{_hostname()}:{os.getpid()}"}
        atomic_write_json(os.path.join(workdir, ENTRY_FILE), data, fsync=True, indent=1,
                          make_dirs=False)
        final = self.entry_dir(runtime, digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if os.path.exists(final):   # a broken entry we hold the lock for
            self.discard(Entry(final, {}), "is being replaced")
        os.rename(workdir, final)
        _fsync_dir(os.path.dirname(final))
        return Entry(final, data)

    # ---------------------------------------------------------------- refs
    def ref_path(self, slug: str) -> str:
        return os.path.join(self.root, "refs", slug + ".json")

    def remember_ref(self, slug: str, digest: str, size: Optional[int], **extra: Any) -> None:
        """Record what a tag stands for; ``extra`` (``built=...``) is stored beside it."""
        p = self.ref_path(slug)
        try:
            atomic_write_json(p, {"digest": digest, "size": size, "resolved": time.time(), **extra})
        except OSError as err:
            logger.debug("cannot record %s: %s", p, err)

    def known_ref(self, slug: str) -> Optional[Dict[str, Any]]:
        """What the tag was last resolved to; a damaged record (not JSON, a digest that is not
        ``alg:hex``, a time that is not a number) counts as none: the tag is resolved again."""
        for root in [*self.site_tiers, self.root]:
            p = os.path.join(root, "refs", slug + ".json")
            try:
                with open(p) as fh:
                    data = json.load(fh)
            except (OSError, ValueError):
                continue
            if not isinstance(data, dict) or not data.get("digest"):
                continue
            if not (isinstance(data["digest"], str) and _DIGEST.fullmatch(data["digest"])
                    and _number(data.get("resolved", 0)) and _number(data.get("size") or 0)):
                logger.warning("ignoring the damaged tag record %s", p)
                continue
            return data
        return None

    # ---------------------------------------------------------------- listing / pruning
    def entries(self) -> List[Entry]:
        out: List[Entry] = []
        for tier, root in [*[("site", t) for t in self.site_tiers], ("user", self.root)]:
            base = os.path.join(root, "entries")
            try:
                runtimes = sorted(os.listdir(base))
            except OSError:
                continue
            for rt in runtimes:
                try:
                    keys = sorted(os.listdir(os.path.join(base, rt)))
                except OSError:
                    continue
                for k in keys:
                    e = self._read(os.path.join(base, rt, k), tier)
                    if e is not None:
                        out.append(e)
        return out

    def remove(self, entry: Entry, runtime_cleanup: Optional[Callable[[Entry], None]] = None) -> bool:
        """Remove an entry under its lock, unless a run uses it (its use lock, ``use_path``):
        a running container or a Slurm task keeps its image; a conversion in progress for the
        same key is never interrupted. False when the entry was kept."""
        if entry.tier != "user":
            return False
        with self.unused(entry) as free:
            if not free:
                logger.info("kept %s %s: in use", entry.runtime, entry.digest)
                return False
            with self.locked(entry.runtime, entry.digest, timeout=30):
                if runtime_cleanup is not None:
                    runtime_cleanup(entry)
                trash = os.path.join(self.root, "tmp", f"trash-{_token(6)}")
                try:
                    os.rename(entry.path, trash)
                except OSError:
                    return False
        rmtree(trash)
        return True

    def in_use(self, entry: Entry) -> bool:
        """Whether a run holds the entry's use lock now."""
        with self.unused(entry) as free:
            return not free


_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
#: the types entry.json's fields must have (a hand-edited or damaged file is a broken entry)
_ENTRY_TYPES: Dict[str, Any] = {"runtime": str, "digest": str, "location": str, "size": int,
                                "files": dict, "dirs": list, "trees": dict, "source": (str, type(None))}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _malformed(data: Any) -> str:
    """Why a parsed entry.json cannot be used as one ("" when it can)."""
    if not isinstance(data, dict):
        return "not an object"
    for key, types in _ENTRY_TYPES.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            return f"field {key!r} has the wrong type"
    if not all(isinstance(r, dict) for r in (data.get("files") or {}).values()) \
            or not all(isinstance(r, str) for r in data.get("dirs") or []):
        return "malformed file records"
    return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rmtree(path: str) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        try:   # read-only dirs from image layers: make writable, retry once
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
