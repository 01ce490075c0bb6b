"""The worker nsdf_hpc.Executor runs inside the container: ``python3 _pyworker.py ROOT TASK BATCH``.

A program of its own, never imported by the package: the executor copies it, with the host's
cloudpickle beside it, into a support directory that is bound read-only into the container
(sys.path[0] is the script's directory, so no PYTHONPATH is needed). It runs items
``TASK*BATCH .. TASK*BATCH+BATCH-1`` of ROOT, whose calls (function, args, kwargs) are in
``ROOT.pkl`` beside it (the host's ``executor.write_calls``: the calls' pickles, their index, and a
trailer line saying where the index starts; only this task's calls are read). For item N it
makes ``ROOT/items/N`` and writes there ``stdout``, ``stderr`` and, last and atomically,
``result.pkl``: ``("ok", value)``, ``("error", pickled exception or None, type
name, message, traceback text)`` or ``("died", status, how, oom)``; then it creates the empty
``ROOT/done/N``, so that the host learns of finished items from one directory.

Each item runs in a process of its own (forked from this one), so an item that ends its
process (``os._exit``, a signal, the out-of-memory killer) loses neither the results written
before it nor the items after it: this process writes the ``died`` result for it (its exit
status, 128+N for signal N, and whether the container's out-of-memory kill count went up) and
goes on. Results are written as each item finishes, so even a task killed as a whole keeps
what it finished. Standard library only (Debian's python3-minimal has no json, uuid or
dataclasses; the last two, which cloudpickle imports, come from ``fallback/``).
"""
import os
import pickle
import sys
import traceback
from typing import Any, List


def _write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _run_item(d: str, call: bytes, cloudpickle: Any) -> None:
    out = os.open(os.path.join(d, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(os.path.join(d, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)
    # line by line, so what a call printed before its process was killed is in its files
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)   # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    try:
        try:
            fn, args, kwargs = pickle.loads(call)
            result: Any = ("ok", fn(*args, **kwargs))
        except BaseException as exc:   # noqa: BLE001 - everything goes back to the caller
            result = ("error", exc, type(exc).__module__ + "." + type(exc).__qualname__, str(exc),
                      traceback.format_exc())
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (out, err, *saved):
            os.close(fd)
    if result[0] == "error":
        # the exception travels pickled on its own: the host may lack its class, and then
        # still gets its type name, message and traceback
        try:
            exc_data = cloudpickle.dumps(result[1])
        except BaseException:   # noqa: BLE001 - an unpicklable exception
            exc_data = None
        result = ("error", exc_data) + result[2:]
    try:
        data = cloudpickle.dumps(result)
    except BaseException as exc:   # noqa: BLE001 - an unpicklable result
        data = pickle.dumps(("error", None, type(exc).__module__ + "." + type(exc).__qualname__,
                             "the result could not be pickled: %s" % exc, traceback.format_exc()))
    _write(os.path.join(d, "result.pkl"), data)


#: the calls file's last line (executor.write_calls): magic, version, where the index starts
TRAILER = b"NSDF-CALLS 1 %012d\n"

_SIGNALS = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 7: "SIGBUS", 9: "SIGKILL", 11: "SIGSEGV",
            15: "SIGTERM"}


def _oom_kills() -> int:
    """How many processes the out-of-memory killer has ended in this container's memory cgroup
    (cgroup v2 ``memory.events``, v1 ``memory.oom_control``); -1 when it cannot be read."""
    paths = ["/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"]
    try:
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                parts = line.strip().split(":", 2)
                if len(parts) == 3 and parts[1] in ("", "memory") and parts[2] not in ("", "/"):
                    sub = parts[2].lstrip("/")
                    paths.insert(0, "/sys/fs/cgroup/%s/memory.events" % sub if parts[1] == ""
                                 else "/sys/fs/cgroup/memory/%s/memory.oom_control" % sub)
    except OSError:
        pass
    for path in paths:
        try:
            with open(path) as fh:
                for line in fh:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return -1


def _mark_done(d: str) -> None:
    """An empty ``ROOT/done/N`` once item N's result is written: the host lists that one
    directory to learn which items finished, rather than look for each item's result."""
    root, n = os.path.split(os.path.split(d)[0])[0], os.path.basename(d)
    try:
        os.close(os.open(os.path.join(root, "done", n), os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError:   # the host still reads the result once the scheduler says the task ended
        pass


def _run_isolated(d: str, call: bytes, cloudpickle: Any) -> None:
    """Run item ``d`` in a child process; when the child ends without a result, write one
    that says how it ended. Then the item is marked done."""
    _run_child(d, call, cloudpickle)
    _mark_done(d)


def _run_child(d: str, call: bytes, cloudpickle: Any) -> None:
    before = _oom_kills()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: run the item, then leave without running this process's exit code
        code = 0
        try:
            _run_item(d, call, cloudpickle)
        except BaseException:   # noqa: BLE001 - writing the result failed: say so in the task log
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.path.exists(os.path.join(d, "result.pkl")):
        return
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        code = 128 + sig
        how = "was killed by signal %d (%s, status %d)" % (sig, _SIGNALS.get(sig, "signal %d" % sig), code)
    else:
        code = os.WEXITSTATUS(status)
        how = "exited with status %d" % code
    after = _oom_kills()
    oom = before >= 0 and after > before
    _write(os.path.join(d, "result.pkl"), pickle.dumps(("died", code, how, oom), protocol=2))


def main(argv: List[str]) -> int:
    root, task, batch = argv[1], int(argv[2]), int(argv[3])
    # the host's pure-Python copies of stdlib modules cloudpickle needs, used only where the
    # image's Python lacks them (Debian's python3-minimal has no dataclasses or uuid):
    # appended, so the image's own standard library always wins
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fallback"))
    import cloudpickle
    with open(root + ".pkl", "rb") as fh:
        fh.seek(-len(TRAILER % 0), 2)
        magic, version, where = fh.read().split()
        if magic != b"NSDF-CALLS" or version != b"1":
            sys.stderr.write("nsdf-hpc worker: %s is not a calls file of this version\n" % fh.name)
            return 2
        fh.seek(int(where))
        index = pickle.load(fh)
        for d in (root, os.path.join(root, "items"), os.path.join(root, "done")):
            try:
                os.mkdir(d)
            except FileExistsError:     # another task's, or this one's before a requeue
                pass
        for n in range(task * batch, min(len(index), task * batch + batch)):
            d = os.path.join(root, "items", str(n))
            if os.path.exists(os.path.join(d, "result.pkl")):    # a requeued task: done before
                continue
            try:
                os.mkdir(d)
            except FileExistsError:
                pass
            offset, length = index[n]
            fh.seek(offset)
            _run_isolated(d, fh.read(length), cloudpickle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
