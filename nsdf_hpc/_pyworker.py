"""The worker nsdf_hpc.Executor runs inside the container: ``python3 _pyworker.py ROOT TASK BATCH``.

A program of its own, never imported by the package: the executor copies it, with the host's
cloudpickle beside it, into a support directory that is bound read-only into the container
(sys.path[0] is the script's directory, so no PYTHONPATH is needed). It runs items
``TASK*BATCH .. TASK*BATCH+BATCH-1`` of ROOT: each item directory ``ROOT/items/N`` holds
``call.pkl`` (function, args, kwargs); the worker writes ``stdout``, ``stderr`` and, last and
atomically, ``result.pkl``: ``("ok", value)`` or ``("error", pickled exception or None, type
name, message, traceback text)``. Standard library only (Debian's python3-minimal has no
json, uuid or dataclasses; the last two, which cloudpickle imports, come from ``fallback/``).
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


def _run_item(d: str, cloudpickle: Any) -> None:
    out = os.open(os.path.join(d, "stdout"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(os.path.join(d, "stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(err, 2)
    try:
        try:
            with open(os.path.join(d, "call.pkl"), "rb") as fh:
                fn, args, kwargs = pickle.load(fh)
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


def main(argv: List[str]) -> int:
    root, task, batch = argv[1], int(argv[2]), int(argv[3])
    # the host's pure-Python copies of stdlib modules cloudpickle needs, used only where the
    # image's Python lacks them (Debian's python3-minimal has no dataclasses or uuid):
    # appended, so the image's own standard library always wins
    sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "fallback"))
    import cloudpickle
    for n in range(task * batch, task * batch + batch):
        d = os.path.join(root, "items", str(n))
        if os.path.isfile(os.path.join(d, "call.pkl")) and not os.path.exists(os.path.join(d, "result.pkl")):
            _run_item(d, cloudpickle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
