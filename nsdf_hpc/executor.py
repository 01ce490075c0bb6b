"""Python functions in containers, in the manner of ``concurrent.futures`` (issue 13).

``Executor(image, on="local" | "slurm")`` pickles each call with cloudpickle into a work
directory, runs the standalone worker ``_pyworker.py`` with the image's Python (the worker and
a copy of the host's cloudpickle are bound read-only; nothing is installed into the image and
PYTHONPATH is not used) and reads the result back. Layout of one executor's directory::

    BASE/support/            worker, cloudpickle, fallback/ (bound read-only at the same path)
    BASE/calls/GROUP.pkl      every call of the group in one file (write_calls)
    BASE/calls/GROUP/items/N/stdout, stderr, result.pkl   made by the worker
    BASE/calls/GROUP/done/N   empty, once item N's result is written (on Slurm, the host
                              lists this one directory instead of looking at every item)

``BASE/calls`` is bound read-write. A Slurm submission is one group (``gK``), a local call
one group of one item (``lN``): writing a submission costs one file whatever the number of
items (a 200-item ``map`` made 200 directories and 200 files before).

Locally every call is one container run (``max_workers`` at a time); on Slurm a ``map`` is one
array job whose tasks each run ``batch_size`` items, and ``submit`` a one-task array job.
Inside the container every item runs in a process of its own (the worker forks), so an item
whose process dies is a :class:`WorkerDiedError` of its own and its batch-mates still run.

The interpreter guard: cloudpickle output can be loaded only by the same Python major.minor,
so the image's version is probed once per image digest and interpreter (kept in
``CACHE/python-versions.json``) and a mismatch is an :class:`InterpreterMismatchError`
before anything runs.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import importlib
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import types
import uuid
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Literal, Optional,
                    Sequence, Tuple)

from .errors import (ExecutorError, InterpreterMismatchError, NsdfError, RemoteError,
                     RemoteTraceback, SchedulerError, SpecError, WorkerDiedError)
from .models import Bind

if TYPE_CHECKING:
    from .client import Client
    from .models import NativeImage
    from .runtimes.base import Invocation, Runtime
    from .schedulers.backoff import Backoff
    from .schedulers.job import Job
    from .schedulers.submit import Prepared

__all__ = ["Executor", "CallFuture", "check_interpreter", "parse_version", "task_count", "write_calls"]

logger = logging.getLogger(__name__)

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_pyworker.py")
_INDEX = "__NSDF_EXEC_INDEX__"
_FALLBACK = ("dataclasses", "uuid")
_COLLECTOR_IDLE = 30.0    # s the Slurm collector thread waits for more work before it ends
_VERSION_CODE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
#: ``Executor`` options that are its own, not run options or sbatch resources
_OWN = ("python", "max_workers", "batch_size", "max_tasks", "work_dir", "client", "keep")


class CallFuture(Future):
    """A ``concurrent.futures.Future`` that also carries the call's ``stdout`` and ``stderr``
    (as the function wrote them in the container; set when the future is done)."""

    def __init__(self) -> None:
        super().__init__()
        self.stdout: str = ""
        self.stderr: str = ""
        self.index: int = -1


# ---------------------------------------------------------------------------- pure helpers
def parse_version(text: str) -> Tuple[int, int, int]:
    """``"3.11.2"`` (the probe's last output line) -> ``(3, 11, 2)``."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    try:
        parts = tuple(int(x) for x in lines[-1].split("."))
    except (IndexError, ValueError):
        raise ExecutorError(f"could not read the image's Python version from {text.strip()!r}") from None
    if len(parts) != 3:
        raise ExecutorError(f"could not read the image's Python version from {text.strip()!r}")
    return parts[0], parts[1], parts[2]


def check_interpreter(image: str, python: str, image_version: Tuple[int, int, int],
                      host_version: Tuple[int, ...]) -> None:
    """Raise :class:`InterpreterMismatchError` unless major.minor agree (cloudpickle needs it)."""
    if tuple(image_version[:2]) == tuple(host_version[:2]):
        return
    img = ".".join(map(str, image_version))
    host = ".".join(map(str, host_version[:3]))
    raise InterpreterMismatchError(
        f"the image {image} has Python {img} ({python}) but this host runs Python {host}: "
        f"functions pickled by Python {host_version[0]}.{host_version[1]} cannot be loaded by "
        f"{image_version[0]}.{image_version[1]}. Use an image with Python "
        f"{host_version[0]}.{host_version[1]}, pass python=... naming another interpreter in the "
        f"image (for example python='python{host_version[0]}.{host_version[1]}'), or run this "
        f"script with Python {image_version[0]}.{image_version[1]} on the host.")


def task_count(items: int, batch_size: Optional[int], max_tasks: int) -> Tuple[int, int]:
    """``(tasks, batch)`` for ``items`` calls: ``batch_size`` items per task when given, else
    as few per task as keep the array at most ``max_tasks`` tasks."""
    if items <= 0:
        return 0, 1
    if batch_size is None:
        batch_size = max(1, math.ceil(items / max_tasks))
    if batch_size < 1:
        raise SpecError(f"batch_size must be at least 1, got {batch_size}")
    return math.ceil(items / batch_size), batch_size


def host_python() -> Tuple[int, int, int]:
    """This interpreter's version (the one that pickles)."""
    return sys.version_info[0], sys.version_info[1], sys.version_info[2]


_BY_VALUE = threading.Lock()   # cloudpickle's by-value registry is process-wide


#: the last line of a calls file: magic, format version and where its index starts
_PACK_TRAILER = b"NSDF-CALLS 1 %012d\n"
PACK_TRAILER_SIZE = len(_PACK_TRAILER % 0)


def write_calls(path: str, calls: Sequence[Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]]
                ) -> None:
    """Write ``calls`` to one file: each call's cloudpickle, one after the other (one call
    in memory at a time), then the index (a pickled list of ``(offset, length)``) and a
    fixed-size trailer line giving where the index starts; ``_pyworker.py`` reads only its
    own task's calls. The user's own modules are pickled by value."""
    import cloudpickle  # noqa: PLC0415
    import pickle  # noqa: PLC0415
    fns = {id(fn): fn for fn, _, _ in calls}.values()     # callables may be unhashable
    by_value = {m.__name__: m for m in map(user_module, fns) if m is not None}
    index: List[Tuple[int, int]] = []
    with _BY_VALUE, open(path, "wb") as fh:
        for m in by_value.values():
            cloudpickle.register_pickle_by_value(m)
        try:
            for fn, args, kwargs in calls:
                try:
                    data = cloudpickle.dumps((fn, args, kwargs))
                except Exception as err:   # noqa: BLE001 - pickling raises many types
                    raise ExecutorError(f"cannot pickle the call of {getattr(fn, '__qualname__', fn)!r}: "
                                        f"{err}") from err
                index.append((fh.tell(), len(data)))
                fh.write(data)
        finally:
            for m in by_value.values():
                cloudpickle.unregister_pickle_by_value(m)
        where = fh.tell()
        fh.write(pickle.dumps(index))
        fh.write(_PACK_TRAILER % where)


def user_module(fn: Any) -> Optional[types.ModuleType]:
    """The module of ``fn`` when it is the user's own code (a file outside the interpreter's
    standard library and site-packages, not ``__main__``): cloudpickle pickles functions by
    reference to their module, which the image does not have, so such a module is pickled by
    value. Installed packages must be in the image."""
    name = getattr(fn, "__module__", None)
    module = sys.modules.get(name or "")
    path = getattr(module, "__file__", None)
    if module is None or name == "__main__" or not path:
        return None
    return module if _is_users_file(path) else None


@functools.lru_cache(maxsize=256)
def _is_users_file(path: str) -> bool:
    real = os.path.realpath(path)
    return not any(real.startswith(p + os.sep) for p in _installed_roots())


@functools.lru_cache(maxsize=1)
def _installed_roots() -> Tuple[str, ...]:
    """The interpreter's standard library and site-packages directories, resolved once per
    process (``sysconfig.get_paths`` costs about 0.5 ms a call: 4 calls per item made a
    200-item ``map`` spend 0.2-0.4 s in it)."""
    import sysconfig   # noqa: PLC0415
    paths = sysconfig.get_paths()
    return tuple(dict.fromkeys(os.path.realpath(p) for key in ("stdlib", "platstdlib", "purelib", "platlib")
                               if (p := paths.get(key))))


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _read(path: str) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def killed_hint(code: Optional[int], oom: bool = False) -> str:
    """What an exit status says about how a process ended (for messages)."""
    if oom:
        return ("; the out-of-memory killer ended it (the container's or the job's memory limit: "
                "give it more memory, or use less)")
    if code == 137:
        return "; SIGKILL: killed, for example by the out-of-memory killer or a time limit"
    return ""


def item_output(item_dir: str) -> str:
    """The tail of what the call itself wrote (its stderr, then its stdout)."""
    err = _tail(_read(os.path.join(item_dir, "stderr")))
    out = _tail(_read(os.path.join(item_dir, "stdout")))
    return "\n".join(x for x in (err, out) if x)


def load_result(item_dir: str, where: str = "the call") -> Tuple[bool, Any]:
    """Read ``result.pkl``: ``(True, value)`` or ``(False, exception to raise)``.

    An exception is re-raised as its own type with the remote traceback as ``__cause__`` when
    it can be unpickled here, else as :class:`RemoteError` (type name, message, traceback).
    An item whose process died (the worker's ``died`` record) gives :class:`WorkerDiedError`
    with its exit status and the tail of the call's output; ``where`` names it.
    """
    import cloudpickle  # noqa: PLC0415 (importing nsdf_hpc stays light)
    with open(os.path.join(item_dir, "result.pkl"), "rb") as fh:
        data = fh.read()
    try:
        result = cloudpickle.loads(data)
    except Exception as err:   # noqa: BLE001 - the value's class may not exist here
        return False, RemoteError(type(err).__name__, f"the result could not be unpickled here: {err}", "")
    if result[0] == "ok":
        return True, result[1]
    if result[0] == "died":
        _, code, how, oom = result
        return False, WorkerDiedError(
            f"{where}: the process running the function {how} before returning"
            f"{killed_hint(code, oom)}; the other items ran as usual",
            code, item_output(item_dir))
    _, exc_data, type_name, message, tb = result
    exc: Any = None
    if exc_data is not None:
        try:
            exc = cloudpickle.loads(exc_data)
        except Exception as err:   # noqa: BLE001 - its class may not be importable here
            logger.debug("cannot unpickle the remote %s: %s", type_name, err)
    if isinstance(exc, BaseException):
        exc.__cause__ = RemoteTraceback(tb)
        return False, exc
    return False, RemoteError(type_name, message, tb)


# ---------------------------------------------------------------------------- the executor

class _JobWatch:
    """When ``Executor._collect`` asks the scheduler about one Slurm job: on the schedule
    ``wait()`` keeps (``schedulers.job.QuerySchedule``), checking the job's exit-code files
    each time the collector asks."""

    def __init__(self, job: "Job", base: "Backoff") -> None:
        from .schedulers.job import QuerySchedule   # noqa: PLC0415
        self.job = job
        self.plan = QuerySchedule.start(base, job.exit_files_done() is not None)
        self.due = self.plan.clock() + self.plan.next_interval()

    def query_due(self) -> bool:
        """Whether to ask the scheduler now (then the next time is set)."""
        now = self.plan.clock()
        if self.plan.awaiting_files and self.job.exit_files_done():
            self.plan.files_done()
            self.due = now + self.plan.next_interval()
        if now < self.due:
            return False
        self.due = now + self.plan.next_interval()
        return True


class Executor:
    """Run Python functions inside ``image``, locally or on Slurm.

    Parameters
    ----------
    image:
        The image reference (as for :meth:`Client.run`); it needs a Python with the host's
        major.minor.
    on:
        ``"local"`` (one container per call, ``max_workers`` at a time) or ``"slurm"`` (``map``
        is one array job, ``batch_size`` items per task; ``submit`` a one-task job).
    runtime:
        The container runtime (default: the configured or first usable one).
    options:
        Run options of :meth:`Client.run` (``env``, ``binds``, ``bind_cwd``, ...), with
        ``on="slurm"`` the resources of :meth:`Client.submit` (``time``, ``partition``, ...),
        and the executor's own: ``python`` (the interpreter in the image, default
        ``python3``), ``max_workers``, ``batch_size``, ``max_tasks`` (default 100),
        ``work_dir`` (default: a temporary directory locally, the Slurm work directory on
        Slurm), ``client`` (a :class:`Client`), ``keep`` (keep the work directory).
    """

    def __init__(self, image: str, *, on: Literal["local", "slurm"] = "local",
                 runtime: Optional[str] = None, **options: Any) -> None:
        if on not in ("local", "slurm"):
            raise SpecError(f"on must be 'local' or 'slurm', got {on!r}")
        self.image = image
        self.on = on
        self.runtime_name = runtime
        self.python: str = options.pop("python", "python3")
        self.max_workers: int = int(options.pop("max_workers", None) or min(4, os.cpu_count() or 1))
        self.batch_size: Optional[int] = options.pop("batch_size", None)
        self.max_tasks: int = int(options.pop("max_tasks", 100))
        self.keep: bool = bool(options.pop("keep", False))
        self._work_dir: Optional[str] = options.pop("work_dir", None)
        self._client: Optional["Client"] = options.pop("client", None)
        self.options = options
        self.base: Optional[str] = None
        self.image_python: Optional[Tuple[int, int, int]] = None
        self.jobs: List["Job"] = []
        self._lock = threading.Lock()
        self._rt: Optional["Runtime"] = None
        self._native: Optional["NativeImage"] = None
        self._submit_image = image
        self._template: Optional["Invocation"] = None
        self._prep: Optional["Prepared"] = None     # the last Slurm job, prepared (_sbatch)
        self._ahead = False                          # an sbatch was started ahead (Slurm.start_ahead)
        self._unrecorded: List["Job"] = []          # submitted, record not yet written
        self._record_lock = threading.Lock()
        self._at_exit = False
        self._wake = threading.Event()              # a submission for the collector
        self._pool: Optional[ThreadPoolExecutor] = None
        self._groups = 0
        self._next_local = 0
        self._watch: List[Tuple["Job", str, int, List[CallFuture]]] = []
        self._collector: Optional[threading.Thread] = None
        self._closed = False

    # ------------------------------------------------------------ setup (once)
    @property
    def client(self) -> "Client":
        if self._client is None:
            from .client import Client   # noqa: PLC0415
            self._client = Client()
        return self._client

    def _setup(self) -> None:
        with self._lock:
            if self._closed:
                raise ExecutorError("this Executor is shut down")
            if self._rt is not None:
                return
            client = self.client
            rt = client.runtime(self.runtime_name)
            native = client.pull(self.image, rt)
            self.image_python = self._image_python(client, rt, native)
            check_interpreter(self.image, self.python, self.image_python, host_python())
            self.base = self._make_base()
            self._rt, self._native = rt, native
            self._submit_image = self._pinned(client, native)

    def _pinned(self, client: "Client", native: "NativeImage") -> str:
        """What each Slurm submission names: a registry tag pinned to the digest resolved here.
        The interpreter was checked on that image, a tag that moves later does not change what
        this Executor runs, and each submission's pull is a cache hit with no registry request."""
        src = client.parse_image(self.image)
        if src.kind != "registry" or src.ref is None or src.ref.digest or not native.digest:
            return self.image
        return str(src.ref.pinned(native.digest))

    def _image_python(self, client: "Client", rt: "Runtime", native: "NativeImage") -> Tuple[int, int, int]:
        """The image's Python version: probed once per image digest and interpreter, kept in
        ``CACHE/python-versions.json``."""
        import json   # noqa: PLC0415
        from ._fsutil import atomic_write_json   # noqa: PLC0415
        path = os.path.join(client.cache.root, "python-versions.json")
        key = f"{native.digest or native.location} {self.python}"
        try:
            with open(path, encoding="utf-8") as fh:
                known = json.load(fh)
        except (OSError, ValueError):
            known = {}
        if isinstance(known.get(key), str):
            return parse_version(known[key])
        spec = client.spec(self.image, [self.python, "-c", _VERSION_CODE], bind_cwd=False)
        inv, native, rt = client.invocation(spec, rt, native)
        res = client.execute(inv, native, rt, capture=True)
        if res.returncode != 0:
            raise ExecutorError(
                f"cannot run {self.python!r} in {self.image} ({rt.name}, exit status "
                f"{res.returncode}): the executor needs a Python in the image; pass python=... "
                f"naming its interpreter.\n{_tail(res.stderr or res.stdout, 10)}")
        version = parse_version(res.stdout)
        known[key] = ".".join(map(str, version))
        try:
            atomic_write_json(path, known)
        except OSError as err:
            logger.debug("cannot keep the image's Python version in %s: %s", path, err)
        return version

    def _make_base(self) -> str:
        if self.on == "slurm":
            from .schedulers.submit import check_work_dir   # noqa: PLC0415
            settings = self.client.scheduler().settings
            check_work_dir(settings)
            parent = self._work_dir or os.path.join(settings.work_dir, "executor")
        else:
            parent = self._work_dir or tempfile.gettempdir()
        os.makedirs(parent, exist_ok=True)
        base = os.path.join(parent, f"nsdf-exec-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
        os.makedirs(os.path.join(base, "calls"), mode=0o700)
        support = os.path.join(base, "support")
        os.makedirs(support)
        import cloudpickle  # noqa: PLC0415
        shutil.copy2(_WORKER, os.path.join(support, "_pyworker.py"))
        shutil.copytree(os.path.dirname(os.path.abspath(cloudpickle.__file__)),
                        os.path.join(support, "cloudpickle"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # stdlib modules cloudpickle imports that minimal Pythons leave out (Debian's
        # python3-minimal: dataclasses, uuid); pure Python, and the guard ensures the same
        # major.minor; the worker puts them last on sys.path, so the image's own win
        fallback = os.path.join(support, "fallback")
        os.makedirs(fallback)
        for name in _FALLBACK:
            shutil.copy2(importlib.import_module(name).__file__ or "", os.path.join(fallback, f"{name}.py"))
        return base

    def _binds(self) -> List[Any]:
        assert self.base is not None
        own = [Bind(source=os.path.join(self.base, "support"), target=os.path.join(self.base, "support"),
                    read_only=True),
               Bind(source=os.path.join(self.base, "calls"), target=os.path.join(self.base, "calls"))]
        return [*self.options.get("binds", ()), *own]

    def _command(self, group_dir: str, index: str, batch: int) -> List[str]:
        assert self.base is not None
        return [self.python, os.path.join(self.base, "support", "_pyworker.py"), group_dir, index, str(batch)]

    # ------------------------------------------------------------ writing calls
    def _new_group(self, calls: Sequence[Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]],
                   name: Optional[str] = None) -> str:
        """A group of ``calls``: ``GROUP.pkl`` (the worker makes the directory ``GROUP``,
        its ``items`` and ``done``); nothing is left behind when a call cannot be pickled."""
        assert self.base is not None
        if name is None:
            with self._lock:
                self._groups += 1
                name = f"g{self._groups}"
        g = os.path.join(self.base, "calls", name)
        try:
            write_calls(g + ".pkl", calls)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(g + ".pkl")
            raise
        return g

    def _finish(self, fut: CallFuture, item_dir: str, died: Callable[[], WorkerDiedError],
                where: str) -> None:
        """Resolve ``fut`` from ``item_dir`` (``died()`` when there is no result)."""
        fut.stdout = _read(os.path.join(item_dir, "stdout"))
        fut.stderr = _read(os.path.join(item_dir, "stderr"))
        try:
            if not os.path.exists(os.path.join(item_dir, "result.pkl")):
                fut.set_exception(died())
                return
            ok, value = load_result(item_dir, where)
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        except InvalidStateError:   # cancelled meanwhile
            pass

    # ------------------------------------------------------------ local
    def _local_template(self) -> "Invocation":
        assert self.base is not None and self._rt is not None
        if self._template is None:
            run_opts = {k: v for k, v in self.options.items() if k != "binds"}
            # call N is the one item of group lN
            command = self._command(os.path.join(self.base, "calls", "l" + _INDEX), "0", 1)
            spec = self.client.spec(self.image, command, binds=self._binds(), **run_opts)
            inv, native, rt = self.client.invocation(spec, self._rt, self._native)
            self.client.prepare(inv, rt)
            self._template, self._native = inv, native
        return self._template

    def _run_local(self, fut: CallFuture, n: int) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        assert self._rt is not None and self._native is not None and self._template is not None
        inv = dataclasses.replace(self._template,
                                  command=tuple(a.replace(_INDEX, str(n)) for a in self._template.command))
        assert self.base is not None
        item = os.path.join(self.base, "calls", f"l{n}", "items", "0")
        try:
            res = self.client.execute(inv, self._native, self._rt, capture=True)
        except NsdfError as err:
            fut.set_exception(err)
            return
        rt_name = self._rt.name

        def died() -> WorkerDiedError:
            return WorkerDiedError(
                f"the container ({rt_name}, {self.image}) exited with status {res.returncode} before "
                f"the worker wrote the result of call {n}{killed_hint(res.returncode)}", res.returncode,
                _tail("\n".join(x for x in (item_output(item), res.stderr, res.stdout) if x.strip())))
        self._finish(fut, item, died, f"call {n} in the container ({rt_name}, {self.image})")

    # ------------------------------------------------------------ public API
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> CallFuture:
        """Schedule ``fn(*args, **kwargs)`` in the image; returns a :class:`CallFuture`."""
        self._setup()
        if self.on == "slurm":
            return self._submit_slurm([(fn, args, kwargs)])[0]
        self._local_template()
        with self._lock:
            n = self._next_local
            self._next_local += 1
        self._new_group([(fn, args, kwargs)], name=f"l{n}")
        fut = CallFuture()
        fut.index = n
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="nsdf-exec")
        self._pool.submit(self._run_local, fut, n)
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any],
            timeout: Optional[float] = None) -> Iterator[Any]:
        """``fn`` over the items of ``iterables``; results in order (the first failed call's
        exception is raised when its turn comes; use :meth:`map_futures` to see every one).
        On Slurm this is one array job."""
        futures = self.map_futures(fn, *iterables)
        deadline = None if timeout is None else time.monotonic() + timeout

        def results() -> Iterator[Any]:
            for f in futures:
                yield f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return results()

    def map_futures(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> List[CallFuture]:
        """Like :meth:`map` but returns the futures (a failed item keeps the others' results)."""
        calls: List[Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]] = \
            [(fn, tuple(a), {}) for a in zip(*iterables)]
        if not calls:
            return []
        self._setup()
        if self.on == "slurm":
            return self._submit_slurm(calls)
        return [self.submit(fn, *a) for _, a, _ in calls]

    def cancel(self) -> None:
        """Cancel what has not finished: queued local calls, and every Slurm job (scancel)."""
        for job, _, _, futs in list(self._watch):
            try:
                job.cancel()
            except SchedulerError as err:
                logger.info("scancel %s failed: %s", job.job_id, err)
            for f in futs:
                f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting calls; with ``wait``, wait for every call and remove the work
        directory (unless ``keep``)."""
        self._closed = True
        self._record_jobs()
        if cancel_futures:
            self.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=wait)
        collector = self._collector
        if wait and collector is not None:
            collector.join()
        if self._ahead:
            self.client.scheduler().close_ahead()   # after the collector, which starts it
        if wait and self.base and not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(wait=True, cancel_futures=exc[0] is not None)

    # ------------------------------------------------------------ Slurm
    def _submit_slurm(self, calls: List[Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]]
                      ) -> List[CallFuture]:
        assert self._rt is not None
        group = self._new_group(calls)
        tasks, batch = task_count(len(calls), self.batch_size, self.max_tasks)
        job = self._sbatch(self._command(group, "{index}", batch), tasks)
        futs = []
        for n in range(len(calls)):
            f = CallFuture()
            f.index = n
            futs.append(f)
        with self._lock:
            self.jobs.append(job)
            self._watch.append((job, group, batch, futs))
            if self._collector is None or not self._collector.is_alive():
                self._collector = threading.Thread(target=self._collect, name="nsdf-exec-slurm", daemon=True)
                self._collector.start()
        self._wake.set()
        return futs

    def _sbatch(self, command: List[str], tasks: int) -> "Job":
        """One array job of ``tasks`` tasks running ``command``. The first is prepared in
        full (image, runtime invocation, script); later ones re-use that, in a new job
        directory with their own command and tasks, while the image it names is still there
        and the working directory the same (else prepared in full again): a submission is
        then little more than its sbatch."""
        from .schedulers import submit as slurm_submit   # noqa: PLC0415
        assert self._rt is not None
        client = self.client
        slurm = client.scheduler()
        self._ahead = True
        prep = self._prep
        if prep is not None and (self.options.get("cwd") or os.getcwd()) == prep.inputs.chdir \
                and all(os.path.exists(p) for p in prep.inputs.requires):
            prep = slurm_submit.again(prep, slurm, command=command, array=tasks)
        else:
            opts = {k: v for k, v in self.options.items() if k != "binds"}
            opts.setdefault("job_name", "nsdf-exec")
            if opts.pop("dry_run", False):
                raise ExecutorError("dry_run is not an Executor option")
            slurm_submit.check_work_dir(slurm.settings)
            slurm.start_ahead()   # its start overlaps the preparation
            spec = slurm_submit.job_spec(client, self._submit_image, command, array=tasks, slurm=slurm,
                                         binds=self._binds(), **opts)
            prep = slurm_submit.prepare(client, spec, slurm, self._rt.name)
        job = slurm_submit.sbatch_prepared(slurm, prep)
        self._prep = prep
        with self._lock:
            # its record (by-id link, provenance, the image's pin) is written by the collector
            # right after this returns, or at shutdown or exit (_record_jobs)
            self._unrecorded.append(job)
            if not self._at_exit:
                atexit.register(self._record_jobs)
                self._at_exit = True
        return job

    def _record_jobs(self) -> None:
        """Write the record of the jobs submitted so far (``schedulers.submit.record``)."""
        from .schedulers import submit as slurm_submit   # noqa: PLC0415
        with self._record_lock:     # an exit waits for the collector's record in progress
            while True:
                with self._lock:
                    if not self._unrecorded:
                        return
                    job = self._unrecorded.pop(0)
                slurm_submit.record(self.client.scheduler(), job, self.client.cache)

    def _collect(self) -> None:
        """Resolve Slurm futures as their items finish. The worker marks each finished item in
        its group's ``done`` directory, which is listed every ``WATCH_INTERVAL`` s (one
        directory read on the shared work directory: it costs the scheduler nothing, whatever
        the number of items). The scheduler is asked about a job on ``wait()``'s schedule
        (``_JobWatch``); once it says a job is final, its items without a result get a
        :class:`WorkerDiedError` (state, exit code, log tail)."""
        base = self.client.scheduler().backoff()
        watches: Dict[int, _JobWatch] = {}
        idle_since: Optional[float] = None
        ending = False
        while True:
            self._record_jobs()
            if not self._closed:
                # the next submission's sbatch, started off its path (Slurm.start_ahead)
                self.client.scheduler().start_ahead()
            with self._lock:
                watch = list(self._watch)
                if not watch:
                    # kept a while for the next submission (starting a thread is part of its
                    # time); decided under the lock that submissions append under
                    idle_since = time.monotonic() if idle_since is None else idle_since
                    if self._closed or time.monotonic() - idle_since > _COLLECTOR_IDLE:
                        self._collector = None
                        ending = True
                else:
                    idle_since = None
            if ending:
                # nor is an sbatch kept ahead longer than this thread (an Executor dropped
                # without shutdown() would keep one until the process ends)
                self.client.scheduler().close_ahead()
                return
            if not watch:
                self._pause()
                continue
            for entry in watch:
                job, group, batch, futs = entry
                try:
                    marked = set(os.listdir(os.path.join(group, "done")))
                except OSError:
                    marked = set()
                for f in futs:
                    if not f.done() and str(f.index) in marked:
                        self._finish(f, os.path.join(group, "items", str(f.index)),
                                     lambda: WorkerDiedError("no result"),
                                     self._slurm_where(job, f.index // batch, f.index))
                pending = [f for f in futs if not f.done()]
                jw = watches.get(id(job))
                if jw is None:
                    jw = watches[id(job)] = _JobWatch(job, base)
                final = False
                if pending and jw.query_due():
                    try:
                        final = job.status().final
                    except SchedulerError as err:
                        logger.info("status of %s failed (%s); polling again", job.job_id, err)
                if final:
                    # results written since the last look, or whose mark failed, are read here
                    for f in pending:
                        item = os.path.join(group, "items", str(f.index))
                        self._finish(f, item, self._slurm_died(job, f.index // batch, f.index, item),
                                     self._slurm_where(job, f.index // batch, f.index))
                if not pending or final:
                    with self._lock:
                        self._watch.remove(entry)
                    watches.pop(id(job), None)
            self._pause()

    def _pause(self) -> None:
        """``WATCH_INTERVAL`` s, or until a submission wakes the collector."""
        from .schedulers.job import WATCH_INTERVAL   # noqa: PLC0415
        self._wake.wait(WATCH_INTERVAL)
        self._wake.clear()

    def _slurm_where(self, job: "Job", task: int, n: int) -> str:
        rt = self._rt.name if self._rt is not None else "?"
        return f"item {n} in Slurm job {job.job_id} task {task} ({rt}, {self.image})"

    def _slurm_died(self, job: "Job", task: int, n: int, item: str) -> Callable[[], WorkerDiedError]:
        def died() -> WorkerDiedError:
            try:
                st = job.tasks.get(job.task_id(task)) or job.last
            except NsdfError:
                st = job.last
            state = st.native_state if st else "UNKNOWN"
            code = st.exit_code if st else None
            try:
                log = job.logs("stderr", tail=20, task=task) + job.logs("stdout", tail=20, task=task)
            except (NsdfError, OSError):
                log = ""
            return WorkerDiedError(
                f"Slurm job {job.job_id} task {task} ended ({state}, exit code {code}) before the "
                f"worker wrote the result of item {n}{killed_hint(code)}; the items of that task "
                "that finished before keep their results", code,
                _tail("\n".join(x for x in (item_output(item), log) if x.strip())))
        return died
