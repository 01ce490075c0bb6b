"""Signal relay for udocker runs: ``python -I -S _udocker_relay.py [--in-shell] -- UDOCKER ARGS...``.

Run as a script (standard library only, never imported by nsdf_hpc), in front of ``udocker run``.

Why it exists. With udocker 1.3.17 in P1 mode the process tree is
``udocker (Python) -> proot -> command``, and a signal sent to the first process never reaches
the command:

* udocker's wrapper runs proot with ``subprocess.call`` (engine/proot.py ``run``) and installs
  no handler: SIGTERM kills it at once, leaving proot and the command running; SIGINT raises
  KeyboardInterrupt, whose clean-up SIGKILLs proot;
* PRoot ignores SIGTERM/SIGINT/SIGHUP on purpose (a terminal signals the whole foreground
  process group, so its tracees get them directly), and when SIGKILLed it leaves its tracees
  running, detached (PRoot 5.1.0 has no ``--kill-on-exit``, which udocker would otherwise pass).

So ``kill <nsdf-run>``, and Slurm or a batch system signalling one process, left the container
running. The relay stands where the udocker wrapper stood (nsdf-run execs it on the
launch-record path; on the planned path ``SubprocessRunner`` forwards signals to it), starts
udocker in the same process group (the terminal keeps its job control and ^C), and passes every
HUP/INT/QUIT/TERM/USR1/USR2 it is sent on to the container's processes: every process proot
traces below it (``TracerPid``). With ``--in-shell`` the top tracee is nsdf_hpc's in-container
shell (``runtimes/udocker.py``, ``SHELL_WRAPPER``), which is left alone: it waits for the
command and exits with its status, 128+N when the command dies of signal N.

* nsdf-run starts the relay with these signals blocked (``Invocation.blocked_signals``): one
  that comes while the interpreter starts is pending when the relay begins, which then ends
  with 128+N without starting udocker.
* A signal that arrives before the command runs is held until it does (udocker needs about
  0.3 s to start proot), so nothing starts after the signal and keeps running.
* A signal the kernel sent for the terminal (``si_code`` SI_KERNEL: ^C, ^\\, hang-up) already
  reached the container's processes, which share the process group: it is not sent twice, nor
  when the parent nsdf-run passes the same signal on right after.
* Not PRoot (a udocker ``--execmode`` F* or R*): after ``FALLBACK_AFTER`` seconds without a
  tracee the signal goes to udocker's children that are not PRoot (the command under
  fakechroot, runc under R*). Only P1 (what ``udocker create`` gives) is tested.

The exit status is udocker's (128+N when udocker itself died of signal N); without the
in-container shell, PRoot's 255 for a command killed by a signal the relay delivered is
reported as 128+N; after a terminal's ^C, udocker's own 1 (KeyboardInterrupt) is reported as 130.
"""
from __future__ import annotations   # annotations stay strings: no `typing` import

import os
import sys
import time

TYPE_CHECKING = False   # not typing.TYPE_CHECKING: importing typing costs ~9 ms
if TYPE_CHECKING:
    import signal
else:   # the C module: `signal` imports enum (~10 ms), and this script runs per container start
    import _signal as signal

RELAYED = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1,
           signal.SIGUSR2)
NAMES: dict[int, str] = dict(zip(RELAYED, ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2")))
SI_KERNEL = 0x80          # <asm-generic/siginfo.h>: sent by the kernel (the tty driver)
POLL = 0.02               # while a signal waits for the container to start
FALLBACK_AFTER = 5.0      # no tracee by then: not PRoot (see the module docstring)
DEDUP_WINDOW = 2.0        # a terminal's signal passed on by the parent nsdf-run


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read(f"/proc/{name}/stat")
            if stat:
                try:
                    out[int(name)] = int(stat.rsplit(b")", 1)[1].split()[1])
                except (IndexError, ValueError):
                    continue
    return out


def _traced(pid: int) -> bool:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(b"TracerPid:"):
            return line.split()[1:2] != [b"0"]
    return False


def targets(root: int, in_shell: bool, fallback: bool) -> list[int]:
    """The container's processes below ``root`` (the udocker wrapper) to signal."""
    parent = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    below: list[int] = []
    stack = [root]
    while stack:
        for c in children.get(stack.pop(), ()):
            below.append(c)
            stack.append(c)
    traced = [p for p in below if _traced(p)]
    if not traced:
        if not fallback:
            return []
        # udocker's own children that are not PRoot (its probes, or a PRoot about to trace):
        # the command under fakechroot (F* modes), runc under R*
        return [p for p in children.get(root, ()) if b"proot" not in _read(f"/proc/{p}/cmdline")]
    if not in_shell:
        return traced
    inside = set(traced)
    tops = [p for p in traced if parent.get(p) not in inside]
    # a child the shell has forked but not yet exec'd still has the shell's command line:
    # signalled now, it would run the shell's trap and go on to exec the command
    top_cmd = {_read(f"/proc/{p}/cmdline") for p in tops}
    return [p for p in traced if p not in tops and _read(f"/proc/{p}/cmdline") not in top_cmd]


def _interrupted(signo: int) -> int:
    """Nothing started: end as nsdf-run ends when a signal comes before the container runs."""
    sys.stderr.write(f"\nnsdf-run: interrupted by {NAMES.get(signo, signo)}\n")
    return 128 + signo


def main(argv: list[str]) -> int:
    args = argv[1:]
    in_shell = bool(args) and args[0] == "--in-shell"
    if in_shell:
        args = args[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        sys.stderr.write("usage: _udocker_relay.py [--in-shell] -- UDOCKER ARGS...\n")
        return 125
    if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
        # not started with the signals blocked (a batch script), a SIGINT while the interpreter
        # started may have been printed and passed over (see nsdf_hpc._entry.main)
        return _interrupted(signal.SIGINT)
    watched = {*RELAYED, signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    # nsdf-run starts this script with RELAYED blocked (udocker.RELAY_SIGNALS): one sent while
    # the interpreter started waits here (unblocked, CPython could lose a SIGINT: a
    # KeyboardInterrupt while it checks the script's directory is printed and the script runs
    # on). Nothing has started yet: end as that signal would have ended us
    early = signal.sigpending() & set(RELAYED)
    if early:
        first = signal.sigtimedwait(early, 0)
        return _interrupted(first.si_signo if first is not None else min(early))
    try:
        child = os.posix_spawnp(args[0], args, dict(os.environ), setsigmask=())
    except OSError as err:
        sys.stderr.write(f"nsdf-hpc: cannot run {args[0]}: {err.strerror}\n")
        return 125
    started = time.monotonic()
    pending: list[int] = []
    delivered: list[int] = []
    from_tty: dict[int, float] = {}
    while True:
        info: signal.struct_siginfo | None
        if pending:
            info = signal.sigtimedwait(watched, POLL)
        else:
            info = signal.sigwaitinfo(watched)
        now = time.monotonic()
        if info is not None and info.si_signo != signal.SIGCHLD:
            signo = info.si_signo
            if info.si_code == SI_KERNEL:
                from_tty[signo] = now
            elif not (info.si_pid == os.getppid() and now - from_tty.get(signo, -1e9) < DEDUP_WINDOW):
                pending.append(signo)
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            break
        if pending:
            pids = targets(child, in_shell, now - started > FALLBACK_AFTER)
            if pids:
                for signo in pending:
                    for pid in pids:
                        try:
                            os.kill(pid, signo)
                        except OSError:
                            pass
                delivered += pending
                pending = []
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    rc = os.WEXITSTATUS(status)
    if rc == 255 and delivered and not in_shell:
        rc = 128 + delivered[-1]
    if rc == 1 and signal.SIGINT in from_tty:
        # the terminal's ^C reached udocker's wrapper too: KeyboardInterrupt, "exit_status = 1"
        # (udocker 1.3.17 maincmd.py main), after it SIGKILLed proot; the run was interrupted
        rc = 128 + signal.SIGINT
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
