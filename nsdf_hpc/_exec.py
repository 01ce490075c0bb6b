"""The one place nsdf_hpc starts processes.

Every external tool is called through :class:`SubprocessRunner` with an argv list (never a
shell string); tests hand a fake runner to the same seam. Output is decoded with
``surrogateescape`` so that bytes which are not UTF-8 survive a round trip.
"""
from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import (IO, TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Protocol, Sequence,
                    Tuple, Union)

from ._proctree import HOLD_LIMIT, exists, innermost, still_starting, tree_io
from .paths import make_run_scratch, remove_files_and_dir
from .errors import CommandError, CommandTimeoutError, ToolNotFoundError

if TYPE_CHECKING:
    import logging


def _log() -> Optional[logging.Logger]:
    """This module's logger; None while no module has imported :mod:`logging`: then nobody
    configured it, and no message of this module (DEBUG and INFO) would show. The launch
    fast path (a podman run from its record) starts its process here without loading
    logging (~10 ms of its start-up)."""
    mod = sys.modules.get("logging")
    return None if mod is None else mod.getLogger(__name__)


class _Popen(subprocess.Popen[bytes]):
    """``Popen`` whose wait with a timeout (``communicate(timeout=...)`` ends with one) sleeps
    until the child exits, through a pidfd. The stdlib's polls ``waitpid(WNOHANG)`` between
    sleeps that start at 0.5 ms and double: a command that closed its pipes cost up to 1 ms
    more than itself (``sbatch`` through here took 1 ms longer than a plain ``Popen``)."""

    def _wait(self, timeout: Optional[float]) -> int:
        if timeout is None or self.returncode is not None or not hasattr(os, "pidfd_open"):
            return super()._wait(timeout)   # type: ignore[misc]
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:      # an old kernel (before 5.3), or no such process any more
            return super()._wait(timeout)   # type: ignore[misc]
        try:
            import select   # noqa: PLC0415 - only here, for a wait with a timeout
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(max(0, math.ceil(timeout * 1000))):
                raise subprocess.TimeoutExpired(self.args, timeout)
        finally:
            os.close(fd)
        return super()._wait(None)          # type: ignore[misc]  # it has exited: reaped at once


Argv = Sequence[str]
ENCODING = "utf-8"
ERRORS = "surrogateescape"


class CompletedCommand(NamedTuple):
    """The result of one external command: argv, exit status and captured output.

    A named tuple, not a dataclass: the launch fast path (a podman run from its record)
    imports this module, and dataclasses with inspect is ~10 ms of that start-up."""

    argv: Tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    env: Optional[Dict[str, str]] = None
    #: the last signal passed on to a streamed command while it ran (``capture=False``)
    forwarded: Optional[int] = None
    #: a signal still held (the runtime was still starting, see ``hold``) when the command
    #: ended: it never reached the command
    held: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def __repr__(self) -> str:
        # not ``env``: a pull's process environment can hold a registry login
        return (f"CompletedCommand(argv={self.argv!r}, returncode={self.returncode!r}, stdout={self.stdout!r}, "
                f"stderr={self.stderr!r}, duration={self.duration!r}, forwarded={self.forwarded!r}, "
                f"held={self.held!r})")


class CommandRunner(Protocol):
    """What the library needs from an executor (the fake in tests implements the same)."""

    def run(self, argv: Argv, *, check: bool = True, timeout: Optional[float] = None,
            env: Optional[Mapping[str, str]] = None,
            env_overrides: Optional[Mapping[str, Optional[str]]] = None,
            cwd: Optional[str] = None, capture: bool = True,
            stdin: Union[None, int, IO[bytes]] = None, hold: Sequence[str] = (),
            stall_timeout: Optional[float] = None, started: Optional[str] = None,
            blocked: Sequence[str] = ()) -> CompletedCommand: ...

    def run_many(self, argvs: Sequence[Argv], *, timeout: float = 10.0,
                 envs: Optional[Sequence[Optional[Mapping[str, str]]]] = None
                 ) -> List[Union[CompletedCommand, Exception]]: ...


def _decode(data: Optional[bytes]) -> str:
    return data.decode(ENCODING, ERRORS) if data else ""


def _child_env(env: Optional[Mapping[str, str]],
               overrides: Optional[Mapping[str, Optional[str]]]) -> Optional[Dict[str, str]]:
    if env is None and not overrides:
        return None
    result = dict(os.environ if env is None else env)
    for key, value in (overrides or {}).items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


RELAYED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: TERM/INT/HUP that the CLI's own handler took (``cli.main`` appends them) while this process
#: worked before a streamed run. Its exception should have ended the process, but one raised
#: while Python runs a finalizer (``__del__``, a weakref callback) is only printed, and the
#: planning then went on: a streamed run does not start once one is here (a container would
#: run on with nobody left to pass the signal to it).
received: List[int] = []


def _note_early(early: List[int]) -> Dict[int, Any]:
    """Until ``_forward_signals`` takes over, note TERM/INT/HUP in ``early`` instead of acting
    on them: one that arrives just after the child started would otherwise end this process
    (or raise in it) and leave the child running. Returns the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, lambda n, frame: early.append(n)) for signum in RELAYED}


def _forward_signals(proc: "subprocess.Popen[bytes]", seen: List[int], hold: Sequence[str] = (),
                     done: Optional[threading.Event] = None, started: Optional[str] = None,
                     pending: Optional[List[int]] = None, early: Sequence[int] = ()) -> Dict[int, Any]:
    """While a streamed child runs, SIGTERM/SIGINT/SIGHUP sent to this process are passed on
    to it (and noted in ``seen``) and this process keeps waiting for it (so nothing keeps
    running after we return). Returns the previous handlers; only the main thread can
    install handlers.

    ``hold`` names the processes of a runtime that drops a signal while it sets up (Apptainer's
    starter: measured, 6 of 60 SIGINTs sent in its first 0.12 s were lost and the container
    ran on). A signal that arrives while the child's process tree has no other process yet is
    held, and passed on by a small thread as soon as the command runs (or after HOLD_LIMIT s).
    ``early``: signals noted before (``_note_early``), handled now as if they came now.
    ``started``: ``OrphanGuard.started`` (a container that is not in the child's tree, see
    ``_proctree.still_starting``); then a signal goes to the innermost process of the child's
    own name (``_proctree.innermost``): rootless podman re-executes itself in its user
    namespace, and its outer process, sent SIGTERM, exits 0 at once and leaves the inner one
    and the container running (measured, podman 4.3.1, even 0.3 s after the container
    started). A signal still held when the child ends stays in ``pending``: it never reached
    the command.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: Dict[int, Any] = {}
    pending = [] if pending is None else pending
    done = done or threading.Event()

    def send(signum: int) -> None:
        try:
            if started is not None and proc.poll() is None:
                os.kill(innermost(proc.pid), signum)
            else:
                proc.send_signal(signum)
        except OSError:
            pass

    def release() -> None:
        deadline = time.monotonic() + HOLD_LIMIT
        while (not done.is_set() and proc.poll() is None and time.monotonic() < deadline
               and still_starting(proc.pid, hold, started)):
            done.wait(0.005)
        # `done`: the caller's wait returned. (proc.poll() alone can say None while that wait
        # holds Popen's waitpid lock, even though the child has ended; and then, reaped, it
        # is no longer in /proc, which still_starting reads as "not starting")
        if done.is_set() or proc.poll() is not None or not exists(proc.pid):
            return      # it ended while the signal was held: left in `pending` for the caller
        while pending:
            try:
                signum = pending.pop(0)
            except IndexError:   # a second release thread took it
                break
            if not done.is_set():
                log = _log()
                if log:
                    log.debug("passing on signal %d, held while the runtime started", signum)
                send(signum)

    def forward(signum: int, frame: Any) -> None:
        seen.append(signum)
        if pending or (hold and still_starting(proc.pid, hold, started)):
            pending.append(signum)
            if len(pending) == 1:
                threading.Thread(target=release, name="nsdf-signal-hold", daemon=True).start()
            return
        send(signum)
    for signum in RELAYED:
        previous[signum] = signal.signal(signum, forward)
    for noted in early:
        forward(noted, None)
    return previous


def _kill_group(proc: "subprocess.Popen[bytes]") -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _communicate_watching(proc: "subprocess.Popen[bytes]", timeout: Optional[float], stall: float,
                          args: Tuple[str, ...]) -> Tuple[bytes, bytes]:
    """``proc.communicate`` that also kills a process tree whose I/O stopped for ``stall`` s."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last, last_change = tree_io(proc.pid), time.monotonic()
    tick = min(1.0, max(0.05, stall / 5))
    while True:
        wait = tick if deadline is None else max(0.0, min(tick, deadline - time.monotonic()))
        try:
            return proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise subprocess.TimeoutExpired(args, timeout or 0.0)
        io = tree_io(proc.pid)
        if io is None or io != last:
            last, last_change = io, now
        elif now - last_change >= stall:
            _kill_group(proc)
            out, err_out = proc.communicate()
            raise CommandTimeoutError(args, stall, _decode(out), _decode(err_out), stalled=True)


class SubprocessRunner:
    """Runs argv lists with :mod:`subprocess`: timeouts kill the whole process group.

    ``capture=False`` streams: the child inherits this process's stdout and stderr (what
    ``nsdf-run run`` wants), and the result carries empty output.
    """

    def run(self, argv: Argv, *, check: bool = True, timeout: Optional[float] = None,
            env: Optional[Mapping[str, str]] = None,
            env_overrides: Optional[Mapping[str, Optional[str]]] = None,
            cwd: Optional[str] = None, capture: bool = True,
            stdin: Union[None, int, IO[bytes]] = None, hold: Sequence[str] = (),
            stall_timeout: Optional[float] = None, started: Optional[str] = None,
            blocked: Sequence[str] = ()) -> CompletedCommand:
        """``timeout`` bounds the whole run; ``stall_timeout`` (captured runs only) stops a
        command whose process tree reads and writes nothing (``/proc/PID/io``) for that
        long: a download from a server that stopped sending. Both kill the process group
        and raise :class:`CommandTimeoutError` (``.stalled`` tells which). ``blocked``:
        ``Invocation.blocked_signals``, blocked in the child from its start (and in this
        thread only while it is started: one that comes meanwhile is handled right after)."""
        args = tuple(str(a) for a in argv)
        child_env = _child_env(env, env_overrides)
        log = _log()
        if log and log.isEnabledFor(10):   # logging.DEBUG
            log.debug("run: %s", shlex.join(args))
        pipe = subprocess.PIPE if capture else None
        start = time.perf_counter()
        streamed = not capture and timeout is None
        if streamed and received:
            # nothing is started: the handler that took the signal decides again (the CLI's
            # raises, and nsdf-run ends with 128+N)
            signal.raise_signal(received[0])
            raise InterruptedError(f"signal {received[0]} came before {args[0]} started")
        early: List[int] = []
        original = _note_early(early) if streamed else {}
        # the child inherits this thread's signal mask (subprocess restores it in the child)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, n) for n in blocked if hasattr(signal, n)]
                                      ) if blocked else None
        # a captured or timed run has its own session: what ends it early (a timeout, Ctrl-C's
        # KeyboardInterrupt here) ends its whole process tree, not only the program started
        # (a runtime that runs the command in a child, as UDocker's relay does, left it running)
        own_session = capture or timeout is not None or stall_timeout is not None
        try:
            proc = _Popen(args, stdout=pipe, stderr=pipe, env=child_env, cwd=cwd,
                                    stdin=subprocess.DEVNULL if stdin is None and capture else stdin,
                                    start_new_session=own_session)
        except BaseException as err:   # OSError, ValueError, SubprocessError: nothing started
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for signum, handler in original.items():
                signal.signal(signum, handler)
            if early:   # nothing started: the caller's own handler decides
                signal.raise_signal(early[-1])
            if isinstance(err, FileNotFoundError):
                raise ToolNotFoundError(args[0]) from err
            if isinstance(err, PermissionError):
                raise ToolNotFoundError(args[0], f"not executable ({err.strerror})") from err
            raise
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        seen: List[int] = []
        pending: List[int] = []
        done = threading.Event()
        forwarded = _forward_signals(proc, seen, hold, done, started, pending, early) if streamed else {}
        if original:
            forwarded = original      # restored at the end, not the early notes
        try:
            if stall_timeout is not None and capture:
                out, err_out = _communicate_watching(proc, timeout, stall_timeout, args)
            else:
                out, err_out = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err_out = proc.communicate()
            raise CommandTimeoutError(args, timeout or 0.0, _decode(out), _decode(err_out)) from None
        except BaseException:  # KeyboardInterrupt: do not leave the child behind
            _kill_group(proc) if own_session else proc.kill()
            proc.wait()
            raise
        finally:
            done.set()
            for signum, handler in forwarded.items():
                signal.signal(signum, handler)
        # a command killed by signal N exits 128+N, as in a shell (Popen reports -N)
        rc = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
        result = CompletedCommand(args, rc, _decode(out), _decode(err_out),
                                  time.perf_counter() - start, child_env, seen[-1] if seen else None,
                                  pending[-1] if pending else None)
        if log:
            log.debug("rc=%s in %.1f ms", result.returncode, result.duration * 1000)
        if check and result.returncode != 0:
            raise CommandError(args, result.returncode, result.stdout, result.stderr)
        return result

    def start(self, argv: Argv, *, env: Optional[Mapping[str, str]] = None,
              cwd: Optional[str] = None) -> "Started":
        """Start a captured command ahead of its input (see :class:`Started`), in its own
        session: a Ctrl-C at the terminal does not reach it. Raises as :meth:`run` does when
        it cannot be started."""
        args = tuple(str(a) for a in argv)
        child_env = _child_env(env, None)
        read, write = os.pipe()
        try:
            proc = _Popen(args, stdin=read, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env,
                          cwd=cwd, start_new_session=True)
        except FileNotFoundError as err:
            os.close(write)
            raise ToolNotFoundError(args[0]) from err
        except BaseException:
            os.close(write)
            raise
        finally:
            os.close(read)
        log = _log()
        if log and log.isEnabledFor(10):   # logging.DEBUG
            log.debug("started ahead: %s", shlex.join(args))
        return Started(args, proc, write, dict(os.environ if env is None else env), cwd)

    def run_many(self, argvs: Sequence[Argv], *, timeout: float = 10.0,
                 envs: Optional[Sequence[Optional[Mapping[str, str]]]] = None
                 ) -> List[Union[CompletedCommand, Exception]]:
        """Start every argv at once, then collect them; a failure is returned, not raised."""
        started: List[Union[Tuple[Tuple[str, ...], "subprocess.Popen[bytes]", float], Exception]] = []
        for i, argv in enumerate(argvs):
            env = envs[i] if envs else None
            child_env = None if env is None else dict(env)
            args = tuple(str(a) for a in argv)
            log = _log()
            if log:
                log.debug("probe: %s", shlex.join(args))
            try:
                started.append((args, _Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL, env=child_env,
                                             start_new_session=True), time.perf_counter()))
            except OSError as err:
                started.append(ToolNotFoundError(args[0], err.strerror or str(err)))
        deadline = time.monotonic() + timeout
        results: List[Union[CompletedCommand, Exception]] = []
        for item in started:
            if isinstance(item, Exception):
                results.append(item)
                continue
            args, proc, t0 = item
            try:
                out, err_out = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                out, err_out = proc.communicate()
                results.append(CommandTimeoutError(args, timeout, _decode(out), _decode(err_out)))
                continue
            results.append(CompletedCommand(args, proc.returncode, _decode(out), _decode(err_out),
                                            time.perf_counter() - t0))
        return results


#: commands started ahead and not yet given their input (:class:`Started`), by ``id``
_AHEAD: Dict[int, "Started"] = {}


class Started:
    """A captured command started ahead of its input (:meth:`SubprocessRunner.start`), for a
    command that does nothing before its standard input ends: ``sbatch`` reading its script
    from stdin has read its configuration and loaded its libraries by then (about 1.5 ms of
    its 6 on the testbed), so :meth:`finish` costs only the submission itself.

    :meth:`finish` hands over the whole input in ONE ``write`` to the empty pipe, then ends
    the input and waits as :meth:`SubprocessRunner.run` does. Linux copies such a write whole
    or not at all up to the pipe's size (64 KiB; a signal is only taken where a write must
    wait for room), so the command reads all of its input or none, never a cut script. Input
    larger than the pipe, a short write, or a command that already ended is not used:
    :meth:`finish` returns None, the command is killed before its input ended (it never
    acted) and the caller runs it afresh. :meth:`discard` does the same for a command not
    needed. A process that ends without either closes the pipe: the command reads an empty
    input (``sbatch``: "Batch script is empty", no job). A child forked without exec
    (``multiprocessing``) closes its copies of the pipe (``os.register_at_fork``), else the
    command would wait for that child's end too."""

    def __init__(self, args: Tuple[str, ...], proc: "subprocess.Popen[bytes]", fd: int,
                 env: Dict[str, str], cwd: Optional[str]) -> None:
        self.args, self.proc, self._fd = args, proc, fd
        #: the environment and directory it was started with, and when (``time.monotonic``)
        self.env, self.cwd, self.since = env, cwd, time.monotonic()
        _AHEAD[id(self)] = self

    def usable(self) -> bool:
        """Whether it still waits for its input."""
        return self._fd >= 0 and self.proc.poll() is None

    def finish(self, data: bytes, timeout: Optional[float] = None) -> Optional[CompletedCommand]:
        """Give it ``data`` as its whole input and wait for it; None when it was not used."""
        start = time.perf_counter()
        if not self.usable():
            self.discard()
            return None
        try:
            import fcntl   # noqa: PLC0415 - only here
            room = fcntl.fcntl(self._fd, fcntl.F_GETPIPE_SZ)
        except (ImportError, AttributeError, OSError):
            room = 4096   # PIPE_BUF: atomic by POSIX
        try:
            written = os.write(self._fd, data) if len(data) <= room else -1
            if written == len(data):
                self._close_input()   # the input ends: from here on it acts
        except OSError:   # EPIPE: it ended meanwhile
            written = -1
        except BaseException:   # KeyboardInterrupt before the input ended: it never acts
            self.discard()
            raise
        if written != len(data):
            self.discard()
            return None
        _AHEAD.pop(id(self), None)
        try:
            out, err_out = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
            out, err_out = self.proc.communicate()
            raise CommandTimeoutError(self.args, timeout or 0.0, _decode(out), _decode(err_out)) from None
        except BaseException:  # KeyboardInterrupt: do not leave the child behind
            _kill_group(self.proc)
            self.proc.wait()
            raise
        rc = 128 - self.proc.returncode if self.proc.returncode < 0 else self.proc.returncode
        return CompletedCommand(self.args, rc, _decode(out), _decode(err_out), time.perf_counter() - start,
                                self.env)

    def discard(self) -> None:
        """End it unused: killed while its input is still open, it never acted."""
        _AHEAD.pop(id(self), None)
        if self.proc.returncode is None:
            _kill_group(self.proc)
        self._close_input()
        self.proc.communicate()

    def _close_input(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _forget_ahead() -> None:
    """In a child forked without exec: close its copies of the inputs of commands started
    ahead (their parent still owns them)."""
    for started in list(_AHEAD.values()):
        started._close_input()
    _AHEAD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_ahead)


@contextmanager
def run_scratch() -> Iterator[Tuple[str, str]]:
    """A name and a file path unique to one run (the path in a private directory that is
    removed afterwards), for a runtime's orphan guard (``Runtime.orphan_guard``)."""
    name, d = make_run_scratch(os.environ)
    try:
        yield name, os.path.join(d, "run")
    finally:
        remove_files_and_dir(d)


def run_guarded(runner: CommandRunner, argv: Argv, *, env: Optional[Mapping[str, str]], capture: bool,
                remove: Sequence[str] = (), created: Optional[str] = None,
                hold: Sequence[str] = (), started: Optional[str] = None,
                blocked: Sequence[str] = ()) -> CompletedCommand:
    """Run a container's runtime; when a signal was passed on to it while it ran, make sure
    the container did not outlive it.

    ``remove`` (an orphan guard's argv) removes the run's container if it is still there and
    prints what it removed; ``created`` is a file the runtime writes once the container
    exists. The run ended by the signal N (exit 128+N) when the container never existed, had
    to be removed, or the runtime ended while the signal was still held (the command never
    got it); otherwise the container got the signal and its own status stands (a command
    that traps SIGTERM and exits 7 gives 7). An exception while it runs (KeyboardInterrupt in
    a captured run, whose runtime the executor kills) removes the container too, then goes
    on. ``hold``: ``Runtime.startup_names``; ``started``: ``OrphanGuard.started``;
    ``blocked``: ``Invocation.blocked_signals``.
    """
    try:
        res = runner.run(argv, check=False, env=env, capture=capture, hold=hold, started=started,
                         blocked=blocked)
    except BaseException:
        # the executor ended the runtime (KeyboardInterrupt): its container can outlive it
        if remove:
            try:
                runner.run(remove, check=False, env=env, timeout=120)
            except Exception:   # noqa: BLE001 - the first exception is the one to raise
                pass
        raise
    if res.forwarded is None or not remove:
        return res
    if ended_by_signal(runner, argv[0], env, res.forwarded, res.held, remove, created):
        return res._replace(returncode=128 + res.forwarded)
    return res


def ended_by_signal(runner: CommandRunner, program: str, env: Optional[Mapping[str, str]], forwarded: int,
                    held: Optional[int], remove: Sequence[str], created: Optional[str]) -> bool:
    """After the signal ``forwarded`` was passed on to a guarded run (:func:`run_guarded`; the
    launch record's own spawn, ``_launch._spawn_wait``): remove its container if it is still
    there, and say whether the run ended by the signal rather than by its command."""
    # its own session: a second Ctrl-C at the terminal does not interrupt the removal
    left = runner.run(remove, check=False, env=env, timeout=120)
    removed = left.returncode == 0 and bool(left.stdout.strip())
    try:
        existed = created is None or os.path.getsize(created) > 0
    except OSError:
        existed = False
    if removed or not existed or held is not None:
        log = _log()
        if log:
            log.info("%s ended on signal %d before its container did (%s)", program, forwarded,
                     "removed it" if removed else "none was created" if not existed
                     else "the command never got the signal")
        return True
    return False
