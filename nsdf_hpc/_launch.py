"""Launch records: the fast path of ``nsdf-run run`` for the second and later identical calls.

A job script that calls ``srun nsdf-run run IMG -- cmd`` starts nsdf-run once per task; paying
Python + pydantic + click imports and the planning each time costs ~0.25 s per task. After a
normal (planned) run, the CLI saves a *launch record*: the exact runtime argv and process
environment it used, with the container environment kept apart so it can be rebuilt. The next
call with the same command line, directory, configuration and planning-relevant environment
loads the record, re-checks that everything it relied on is unchanged, rebuilds the container
environment from the current host environment (``SLURM_PROCID`` differs per task) with the
recorded allow/deny lists, and replaces itself with the runtime (``os.execve``), so the exit
code is the command's. Any doubt (a missing or changed file, an expired tag, a parse error)
falls back to the planned path, which rewrites the record.

This module imports nothing but ``os``, ``time`` and ``marshal`` (built in) at start-up; a record
is marshal data, not JSON (``json`` imports ``re`` and ``enum``: ~12 ms where a console-script
wrapper of pip >= 25 or uv did not import them already), keyed by CPython's own SHA-256 (not
hashlib's OpenSSL, which costs ~7 ms to load); it is the one place besides
``_exec.py`` that hands control to another program. One exception to the exec: a runtime whose
container can outlive its own process (podman: ``Runtime.orphan_guard``) is not exec'd, since
nobody would be left to remove a container that a signal reached too early; the record keeps
the guard, and this process spawns podman and waits for it (``_spawn_wait``: signals passed
on as the executor's ``_exec._forward_signals`` does, without its imports), leaving a removal
after a signal to the executor (``_exec.ended_by_signal``). Being the parent also lets
it notice a record gone stale in a way no stat shows: when podman fails (125) before any
container existed (the image left its store), the record is dropped and the planned path
takes over, which checks the store and pulls again. A runtime that can lose a signal while
it starts (Apptainer: ``Runtime.startup_names``) is not exec'd either: the parent holds an
early signal until the command runs (``_exec._forward_signals``).
"""
from __future__ import annotations

import marshal
import os
import time
# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False

if TYPE_CHECKING:   # not imported at run time: this module is on the start-up path
    from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ._version import __version__
from .paths import candidate_config_files, make_run_scratch, remove_files_and_dir, split_bind, user_state_dir
from .environment import DEFAULT_ENV_ALLOW, LAUNCHER_DIR_VARS, PROCESS_ENV_KEEP, EnvEncoding, container_env, matches

FORMAT = 11  # 3: the orphan guard (podman); 4: held signals (apptainer); 5: any command;
#            6: the guard's ``started`` file (podman: a signal held until the container runs);
#            7: any ``--env`` values; 8: any ``--bind`` directories; 9: marshal, not JSON;
#            10: signals blocked in the runtime (udocker's relay); 11: the runtime's name and
#            the native image (``run()``'s result, ``try_api_run``)
#: a record file's name after its key
SUFFIX = ".rec"
#: stands for the command in the key of a record that any command after ``--`` reuses
COMMAND_SLOT = "\x00command"
#: stands for an ``--env NAME=VALUE`` value in the key of a record that any value reuses
VALUE_SLOT = "\x00value"
#: stands for a ``--bind`` value in the key of a record that any directory bind reuses (with
#: ``:ro`` after it for a read-only one: the mode stays in the key)
BIND_SLOT = "\x00bind"
#: ``nsdf-run run`` options that take the next word as their value (``--env`` aside)
_VALUE_OPTIONS = frozenset({"-r", "--runtime", "-B", "--bind", "-w", "--workdir", "--runtime-arg", "--platform"})
#: characters a value may not have when the runtime also puts it in a word of its argv
#: (``--set-env=NAME=VALUE``): a quoted value can take another path through the planner
_WORD_UNSAFE = frozenset("'\"\\`$")
#: characters a bind path may not have to fill a record's marks: the runtimes' bind syntax
#: (``SRC:DST``, Apptainer's ``--mount`` CSV form for ``,``) plans such a path apart
_BIND_UNSAFE = _WORD_UNSAFE | frozenset(":,=")
#: stand-ins in a record's orphan guard for the name and path each run gets (``_exec.run_scratch``)
GUARD_NAME = "{nsdf-run-name}"
GUARD_PATH = "{nsdf-run-path}"
#: variables that change between identical calls and that planning never reads
_VOLATILE = ("_", "OLDPWD", "SHLVL", "PWD", "COLUMNS", "LINES")
#: variables planning reads although the container allowlist also takes them
#: (the MPI launcher's directories become binds: a record of one job step is not another's)
_PLANNING = frozenset(PROCESS_ENV_KEEP) | frozenset(LAUNCHER_DIR_VARS) | {"SCRATCH", "PSCRATCH", "CSCRATCH"}


def _stat_id(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _sha256() -> Any:
    """A SHA-256 object from CPython's built-in module (3.11: ``_sha256``, 3.12: ``_sha2``),
    else hashlib's; the digests are the same."""
    try:
        from _sha256 import sha256   # type: ignore[import-not-found, unused-ignore]   # noqa: PLC0415
    except ImportError:
        try:
            from _sha2 import sha256   # type: ignore[import-not-found, no-redef, unused-ignore]   # noqa: PLC0415
        except ImportError:
            from hashlib import sha256   # type: ignore[assignment, unused-ignore]   # noqa: PLC0415
    return sha256()


def record_dir(env: Mapping[str, str]) -> str:
    """Launch records live in the cache named by ``NSDF_HPC_CACHE`` when it is set (with the
    images they point at), else in the per-user state directory."""
    cache = env.get("NSDF_HPC_CACHE")
    return os.path.join(cache if cache else user_state_dir(env), "launch")


def launch_key(args: Sequence[str], env: Mapping[str, str], cwd: str) -> str:
    """What the plan depends on: the command line, the directory, the config files, and every
    environment variable except the container allowlist's (rebuilt per call) and volatile ones."""
    h = _sha256()
    # each word with its length before it: no two lists give the same text
    words = [str(FORMAT), __version__, str(os.getuid()), str(os.getgid()), cwd, *args]
    h.update("".join(f"{len(w)}:{w}" for w in words).encode("utf-8", "surrogateescape"))
    for path in candidate_config_files(env):
        h.update(f"|{path}|{_stat_id(path)}".encode("utf-8", "surrogateescape"))
    h.update(f"|alloc={bool(env.get('SLURM_JOB_ID'))}".encode())
    # a plan made under a terminal (podman -t) is not valid in a pipe, and back
    h.update(f"|tty={os.isatty(0) and os.isatty(1)}".encode())
    for k in sorted(env):
        if k in _VOLATILE or (k not in _PLANNING and matches(k, DEFAULT_ENV_ALLOW)):
            continue
        h.update(f"|{k}={env[k]}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:40]


def save(args: Sequence[str], env: Mapping[str, str], cwd: str, inv: Any,
         allow: Sequence[str], deny: Sequence[str], checks: Sequence[str], expires: float,
         exists: Sequence[str] = (), guard: Any = None, hold: Sequence[str] = (),
         command_at: Optional[int] = None, use: Optional[Sequence[str]] = None,
         marks: Optional[Mapping[str, str]] = None, template: Any = None,
         runtime: str = "", native: Optional[Mapping[str, Any]] = None) -> None:
    """Write the record for a planned run (best effort: a read-only home just skips it).

    The record keeps the invocation in its parts (``runtimes.base.Invocation``) and the
    runtime's one environment encoding, so a later call re-encodes its own host variables.
    ``guard`` is the runtime's orphan guard made with ``GUARD_NAME`` and ``GUARD_PATH``;
    ``hold`` the runtime's ``startup_names`` (a signal is held while it starts, so this process
    stays its parent rather than exec it). ``command_at``: where the user's command starts in
    the runtime argv's tail (None: unknown, the record is for this exact command only).
    ``use``: the cache entry's use lock and directory (``ImageCache.use_path``), held shared
    by the run so that a prune keeps the entry. ``marks`` (mark -> variable name) and
    ``template``: the same invocation planned with each ``--env`` value replaced by its mark
    (``Client.env_template``); the record then serves any values of those variables.
    """
    tail = list(inv.tail) + list(inv.command)
    i = _separator(args)
    if command_at is not None and (i is None or tail[command_at:] != list(args[i + 1:])):
        command_at = None   # the words after `--` are not exactly the command: this line only
    words: List[str] = []
    if marks and template is not None:
        words = [*template.head, *template.tail, *template.command]
        values = {name: value for _, name, _, value in env_options(args) or []}
        binds = bind_values(args, cwd) if any(_is_bind(n) for n in marks.values()) else {}
        # values the record could not take again keep it for this exact line (a record of any
        # value must serve the line that made it)
        if binds is not None and all(_is_bind(name) or _fillable(values.get(name, ""), any(m in w for w in words))
                                     for m, name in marks.items()):
            inv = template
            tail = list(inv.tail) + list(inv.command)
        else:
            marks = None
    else:
        marks = None
    record = {
        "format": FORMAT, "encoding": inv.encoding.as_dict(), "head": list(inv.head),
        "tail": tail, "static_env": dict(inv.static_env),
        "marks": dict(marks or {}),
        "marks_in_words": sorted(m for m in (marks or {}) if any(m in w for w in words)),
        "explicit": dict(inv.explicit_env), "allow": list(allow), "deny": list(deny),
        "mkdirs": list(inv.mkdirs), "mkfiles": list(inv.mkfiles), "expires": expires,
        "checks": [[p, _stat_id(p)] for p in checks] + [[p, None] for p in exists],
        "guard": None if guard is None else {"options": list(guard.options), "remove": list(guard.remove),
                                             "created": guard.created, "started": guard.started},
        "hold": list(hold),
        "block": list(inv.blocked_signals),
        "cmd_at": command_at,
        "use": None if use is None else list(use),
        "runtime": runtime, "native": None if native is None else dict(native),
    }
    d = record_dir(env)
    names = list((marks or {}).values())
    key = _record_args(args, command_at, any(not _is_bind(n) for n in names), _bind_slots(names))
    path = os.path.join(d, launch_key(key, env, cwd) + SUFFIX)
    try:
        from ._fsutil import atomic_write   # noqa: PLC0415 (a planned run writes; the fast path reads)
        atomic_write(path, marshal.dumps(record, 4))
    except (OSError, ValueError):   # ValueError: a value marshal cannot write (none expected)
        pass


def load(args: Sequence[str], env: Mapping[str, str], cwd: str
         ) -> Optional[Tuple[List[str], Dict[str, str], List[Tuple[str, bool]]]]:
    """The argv, environment and mount points (path, is a file) to exec, or None when the
    record is not valid."""
    rec, _ = _valid_record(args, env, cwd)
    return None if rec is None else _command(rec, env)


def _command(rec: Dict[str, Any], env: Mapping[str, str], options: Sequence[str] = ()
             ) -> Tuple[List[str], Dict[str, str], List[Tuple[str, bool]]]:
    cenv = container_env(env, rec["explicit"], rec["allow"], rec["deny"])
    encoding = EnvEncoding(**rec["encoding"])
    argv = [*rec["head"], *options, *encoding.argv_words(cenv), *rec["tail"]]
    penv = encoding.process_env(rec["static_env"], cenv)
    points = [(d, False) for d in rec.get("mkdirs", [])] + [(f, True) for f in rec.get("mkfiles", [])]
    return argv, penv, points


def _separator(args: Sequence[str]) -> Optional[int]:
    """Where ``--`` ends nsdf-run's own arguments, when a command follows it."""
    try:
        i = list(args).index("--")
    except ValueError:
        return None
    return i if i + 1 < len(args) else None


def _record_args(args: Sequence[str], command_at: Optional[int], values: bool = False,
                 binds: str = "") -> List[str]:
    """What a record is keyed by: the whole command line, or, when the command's place in the
    runtime argv is known, everything up to ``--`` (any command then reuses the record); with
    ``values``, each ``--env`` value is a slot too (the names stay in the key); with ``binds``
    ``"any"``, each ``--bind`` value (its ``:ro`` stays in the key), with ``"source"`` the
    source of each ``SRC:DST[:MODE]`` (the rest stays in the key)."""
    out = list(args)
    if values:
        for at, name, prefix, _ in env_options(args) or []:
            out[at] = f"{prefix}{name}={VALUE_SLOT}"
    for at, prefix, text in bind_options(args) if binds else ():
        rest = text.partition(":")[2]
        if binds == "any":
            out[at] = prefix + BIND_SLOT + (":ro" if text.endswith(":ro") else "")
        elif rest:
            out[at] = prefix + BIND_SLOT + ":" + rest
    i = _separator(args)
    if command_at is None or i is None:
        return out
    return [*out[:i + 1], COMMAND_SLOT]


def env_options(args: Sequence[str]) -> Optional[List[Tuple[int, str, str, str]]]:
    """The ``--env NAME=VALUE`` options of an ``nsdf-run run`` command line, in order, as
    (index of the word, name, what precedes the name in that word, value); None when one has
    no ``=``. Options end at ``--`` or at the image; the planner checks this reading against
    its own (``Client.env_template``) before a record relies on it."""
    out: List[Tuple[int, str, str, str]] = []
    i = 1
    while i < len(args):
        w = args[i]
        if w == "--" or not w.startswith("-"):
            break
        if w in _VALUE_OPTIONS:
            i += 2
            continue
        at, prefix = None, ""
        if w in ("-e", "--env"):
            at = i + 1
            i += 1
        elif w.startswith("--env="):
            at, prefix = i, "--env="
        elif w.startswith("-e") and not w.startswith("--"):
            at, prefix = i, "-e"
        i += 1
        if at is None:
            continue
        if at >= len(args):
            return None
        name, eq, value = args[at][len(prefix):].partition("=")
        if not eq or not name:
            return None
        out.append((at, name, prefix, value))
    return out


def bind_options(args: Sequence[str]) -> List[Tuple[int, str, str]]:
    """The ``--bind`` options of an ``nsdf-run run`` command line, in order, as (index of the
    word, what precedes the value in that word, value). The planner checks this reading
    against its own (``Client.binds_template``) before a record relies on it."""
    out: List[Tuple[int, str, str]] = []
    i = 1
    while i < len(args):
        w = args[i]
        if w == "--" or not w.startswith("-"):
            break
        if w in ("-B", "--bind"):
            if i + 1 < len(args):
                out.append((i + 1, "", args[i + 1]))
            i += 2
            continue
        if w in _VALUE_OPTIONS or w in ("-e", "--env"):
            i += 2
            continue
        if w.startswith("--bind="):
            out.append((i, "--bind=", w[len("--bind="):]))
        elif w.startswith("-B"):
            out.append((i, "-B", w[2:]))
        i += 1
    return out


def _is_bind(name: str) -> bool:
    """A mark's name: an ``--env`` variable, or ``-B<i>:source`` / ``-B<i>:target``."""
    return name.startswith("-B")


def _bind_slots(names: Sequence[str]) -> str:
    """How a record with marks of these names keys its ``--bind`` values (``_record_args``):
    ``"any"`` when the destinations have marks too, ``"source"`` when only the sources do."""
    if any(n.endswith(":target") for n in names if _is_bind(n)):
        return "any"
    return "source" if any(_is_bind(n) for n in names) else ""


def bind_values(args: Sequence[str], cwd: str) -> Optional[Dict[str, str]]:
    """This call's ``--bind`` paths by mark name (``-B0:source``, ``-B0:target``, ...), as a
    record made by ``Client.binds_template`` takes them: None when one needs planning (a
    source that is not an existing directory, the current directory or ``/`` as the
    destination, a character of the runtimes' bind syntax, not valid text)."""
    out: Dict[str, str] = {}
    for i, (_, _, text) in enumerate(bind_options(args)):
        try:
            source, target, _ = split_bind(text)
        except ValueError:
            return None
        source, target = os.path.normpath(source), os.path.normpath(target)
        if target in ("/", cwd) or not os.path.isdir(source):
            return None
        for p in (source, target):
            if not _fillable(p, False) or _BIND_UNSAFE.intersection(p):
                return None
        out[f"-B{i}:source"], out[f"-B{i}:target"] = source, target
    return out


def _fillable(value: str, in_word: bool) -> bool:
    """Whether a record with marks may take ``value`` (else planning does): valid text, no
    control character, and no quote or ``$`` when a runtime word carries it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:     # undecodable bytes: planning says why it refuses them
        return False
    return not (any(ord(c) < 32 or ord(c) == 127 for c in value) or (in_word and _WORD_UNSAFE.intersection(value)))


def _fill_values(rec: Dict[str, Any], args: Sequence[str], cwd: str) -> bool:
    """Put this call's ``--env`` values and ``--bind`` paths in place of the record's marks;
    False when a value needs planning (not valid text, a control character, or a quote in a
    runtime word; a bind as ``bind_values`` says)."""
    marks: Dict[str, str] = rec.get("marks") or {}
    values = {name: value for _, name, _, value in env_options(args) or []}
    in_words = set(rec.get("marks_in_words") or [])
    binds = bind_values(args, cwd) if any(_is_bind(n) for n in marks.values()) else {}
    # every bind of this call has its marks (a record of the sources keeps the rest in its key)
    if binds is None or {n.partition(":")[0] for n in binds} != {n.partition(":")[0] for n in marks.values()
                                                                    if _is_bind(n)}:
        return False
    fill: Dict[str, str] = {}
    for mark, name in marks.items():
        v = binds.get(name) if _is_bind(name) else values.get(name)
        if v is None or not (_is_bind(name) or _fillable(v, mark in in_words)):
            return False
        fill[mark] = v

    def put(word: str) -> str:
        for mark, v in fill.items():
            if mark in word:
                word = word.replace(mark, v)
        return word
    rec["head"] = [put(w) for w in rec["head"]]
    rec["tail"] = [put(w) for w in rec["tail"]]
    rec["explicit"] = {k: put(v) for k, v in rec["explicit"].items()}
    rec["mkdirs"] = [put(p) for p in rec.get("mkdirs", [])]   # mount points at a bind's destination
    return True


def _load_valid(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            rec: Dict[str, Any] = marshal.loads(fh.read())
    except (OSError, ValueError, EOFError, TypeError):   # marshal's errors for a bad file
        return None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or time.time() > float(rec.get("expires", 0)):
        return None
    for p, ident in rec.get("checks", []):
        now = _stat_id(p)
        if now is None or (ident is not None and tuple(now) != tuple(ident)):
            return None
    return rec


def _valid_record(args: Sequence[str], env: Mapping[str, str], cwd: str
                  ) -> Tuple[Optional[Dict[str, Any]], str]:
    """The record for this command line and its path: the one of this exact line, else the
    one of its arguments up to ``--`` with this call's command put in its place."""
    d = record_dir(env)
    i = _separator(args)
    values, binds = bool(env_options(args)), bool(bind_options(args))
    # this exact line; any command; any --env values; any --bind directories; each mixed
    for slots, bslots in ((False, ""), (True, ""), (False, "any"), (True, "any"), (False, "source"),
                          (True, "source")):
        if (slots and not values) or (bslots and not binds):
            continue
        for command in (False, True):
            if command and i is None:
                continue
            rec, path = _lookup(d, args, env, cwd, command, slots, bslots)
            if rec is not None:
                return rec, path
    return None, os.path.join(d, launch_key(args, env, cwd) + SUFFIX)


def _lookup(d: str, args: Sequence[str], env: Mapping[str, str], cwd: str, command: bool, slots: bool,
            bslots: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """The record of one way of keying ``args``, filled in for this call (None: there is none,
    or it cannot serve this call)."""
    i = _separator(args)
    path = os.path.join(d, launch_key(_record_args(args, 0 if command else None, slots, bslots), env, cwd) + SUFFIX)
    rec = _load_valid(path)
    if rec is None:
        return None, path
    if command and i is not None:
        at = rec.get("cmd_at")
        if not (isinstance(at, int) and 0 <= at <= len(rec["tail"])):
            return None, path
        rec["tail"] = [*rec["tail"][:at], *args[i + 1:]]
    if rec.get("marks") and not _fill_values(rec, args, cwd):
        return None, path
    return rec, path


def try_fast_run(args: Sequence[str], interrupted: Sequence[int] = ()) -> Optional[int]:
    """Exec the recorded runtime command for ``nsdf-run run ...``; returns None if there is
    none, or the exit status of a guarded run (see the module docstring). ``interrupted``:
    ``_entry.interrupted``; a SIGINT noted there (its KeyboardInterrupt was passed over in a
    finalizer) raises KeyboardInterrupt before anything starts."""
    if os.environ.get("NSDF_HPC_NO_FAST_PATH"):
        return None
    if not args or args[0] != "run" or any(a in ("--dry-run", "-h", "--help") for a in args):
        return None
    try:
        cwd = os.getcwd()
        rec, path = _valid_record(args, os.environ, cwd)
        if rec is None:
            return None
        argv, penv, mkdirs = _command(rec, os.environ)
        if not os.path.isabs(argv[0]):
            return None
        _make_mount_points(mkdirs)
        guard = rec.get("guard")
        hold = rec.get("hold") or []
        block = rec.get("block") or []
        if rec.get("use") and _hold_use(*rec["use"]) is None:
            return None
    except Exception:   # any doubt: the planned path decides
        return None
    if interrupted:
        raise KeyboardInterrupt
    if hold and not guard:
        ran = _spawn_wait(argv, penv, hold, block=block)
        return None if ran is None else ran[0]
    if guard:
        status = _run_guarded(rec, guard, hold, block)
        if status is None:
            # the runtime failed before it created the container (podman 125: e.g. the image
            # was removed from its store behind the cache's back): this record is stale, and
            # the planned path checks the store, pulls again and runs the command once
            try:
                os.unlink(path)
            except OSError:
                pass
        return status
    _exec(argv, penv, block)
    return None   # the exec failed


def _make_mount_points(mkdirs: Sequence[Tuple[str, bool]]) -> None:
    """The mount points a record's run needs (``Client.prepare`` on the planned path)."""
    for d, is_file in mkdirs:
        os.makedirs(os.path.dirname(d) if is_file else d, exist_ok=True)
        if is_file:   # the mount point of a file bind
            open(d, "a").close()


#: stands between the image and ``--`` in the command line a ``run()`` call is keyed by: no
#: ``nsdf-run`` argument has a NUL byte, so the library's records and the CLI's never meet
API_MARK = "\x00run()"


def api_args(image: str, command: Sequence[str], runtime: Optional[str] = None, cwd: Optional[str] = None,
             env: Any = None, binds: Any = None) -> Optional[List[str]]:
    """The command line that ``nsdf_hpc.run(image, command, runtime=..., cwd=..., env=...,
    binds=...)`` is keyed by, written as ``nsdf-run run`` would take it (``env`` a mapping or
    ``NAME=VALUE`` strings become ``-e`` options, ``binds`` strings ``-B`` options), so that its
    record serves any command, any values of the same variables and other bind directories as
    the CLI's does; the process's and the call's directories follow the image. None when the
    call has a value that is no plain string (a ``Bind``, a number): it is planned each time."""
    if env is None:
        pairs: List[str] = []
    elif isinstance(env, dict):
        pairs = [f"{k}={v}" if type(k) is str and type(v) is str else "" for k, v in env.items()]  # noqa: E721
        if "" in pairs:
            return None
    elif isinstance(env, (list, tuple)):
        pairs = list(env)
    else:
        return None
    if (not isinstance(binds, (list, tuple)) and binds is not None) or (cwd and not os.path.isabs(cwd)):
        return None
    words = [image, *command, runtime or "", cwd or "", *pairs, *(binds or ())]
    if not all(type(w) is str and "\x00" not in w for w in words):   # noqa: E721 (str, not a subclass)
        return None
    try:
        here = os.getcwd()
    except OSError:
        return None
    options = [*(["--runtime", runtime] if runtime else []), *(w for p in pairs for w in ("-e", p)),
               *(w for b in binds or () for w in ("-B", b))]
    return ["run", *options, image, API_MARK, here, cwd or "", "--", *command]


def try_api_run(args: Sequence[str], cwd: Optional[str] = None) -> Any:
    """``nsdf_hpc.run(image, command, runtime=..., cwd=..., env=..., binds=...)``, keyed as
    ``args`` (``api_args``; ``cwd`` the call's), from the record an earlier
    planned call of the library saved (``Client.run``'s ``record``): its ``RunResult``, or
    None when there is no valid record (the planned path runs it and saves one). The runtime
    runs as the executor's captured run starts it (``_exec.SubprocessRunner.run``): stdin
    ``/dev/null``, its output captured, signals at their defaults and the record's blocked
    ones blocked; an exception here (KeyboardInterrupt) kills it and waits for it, and then
    removes a container it left (a record with an orphan guard: podman)."""
    if os.environ.get("NSDF_HPC_NO_FAST_PATH"):
        return None
    use = -1
    try:
        rec, path = _valid_record(args, os.environ, cwd or os.getcwd())
        if rec is None or not rec.get("runtime") or rec.get("native") is None:
            return None
        argv, penv, mkdirs = _command(rec, os.environ)
        if not os.path.isabs(argv[0]):
            return None
        _make_mount_points(mkdirs)
        if rec.get("use"):
            held = _hold_use(*rec["use"])
            if held is None:
                return None
            use = held
            if use >= 0:
                os.set_inheritable(use, False)   # this process holds it while the runtime runs
    except Exception:   # any doubt: the planned path decides
        if use >= 0:
            os.close(use)
        return None
    try:
        ran = _api_spawn(rec, path, argv, penv)
    finally:
        if use >= 0:
            os.close(use)
    if ran is None:
        return None
    from ._result import RunResult   # noqa: PLC0415
    return RunResult(returncode=ran[0], stdout=ran[1], stderr=ran[2], argv=ran[3], runtime=rec["runtime"],
                     image_data=rec["native"])


def _api_spawn(rec: Dict[str, Any], path: str, argv: List[str], penv: Dict[str, str]
               ) -> Optional[Tuple[int, str, str, List[str]]]:
    """Run a record's command (``argv``, ``penv``: ``_command``'s) captured
    (``_spawn_capture``), inside its orphan guard when it has one: the guard's options name
    the container (its own argv), and after an exception the guard's removal runs (what ``_exec.run_guarded`` does after a signal). None: it could not be
    started, or the runtime failed (125) before it created the container (the record is
    stale: removed here, and the planned path checks the store and pulls again)."""
    guard = rec.get("guard")
    if not guard:
        ran = _spawn_capture(argv, penv, rec.get("block") or [])
        return None if ran is None else (*ran, argv)
    guarded = _guarded_command(rec, guard)
    if guarded is None:
        return None
    argv, penv, fill, scratch_dir, created = guarded
    try:
        try:
            ran = _spawn_capture(argv, penv, rec.get("block") or [])
        except BaseException:
            remove = [fill(w) for w in guard.get("remove", [])]
            if remove:
                from ._exec import SubprocessRunner   # noqa: PLC0415 (rare: after an exception)
                SubprocessRunner().run(remove, check=False, env=penv, timeout=120)
            raise
        never_created = created is not None and not (os.path.isfile(created) and os.path.getsize(created))
    finally:
        remove_files_and_dir(scratch_dir)
    if ran is not None and ran[0] == 125 and never_created:
        try:
            os.unlink(path)
        except OSError:
            pass
        return None
    return None if ran is None else (*ran, argv)


def _spawn_capture(argv: Sequence[str], penv: Mapping[str, str], block: Sequence[str] = ()
                   ) -> Optional[Tuple[int, str, str]]:
    """Run ``argv`` with stdin ``/dev/null`` and stdout and stderr captured, in its own session
    (as the executor's captured run: an exception here ends its whole process tree); its
    status (128+N when the signal N ended it) and its output, decoded as the executor decodes
    it (UTF-8, ``surrogateescape``). None when it could not be started."""
    import select   # noqa: PLC0415 (built in; only on this path)
    sig = _signals()
    current = sig.pthread_sigmask(sig.SIG_BLOCK, [])
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        pid = os.posix_spawn(argv[0], list(argv), dict(penv),
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                           (os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, err_w, 2)],
                             setsigmask={*current, *_signal_numbers(sig, block)},
                             setsigdef=_restore_signals(sig), setsid=True)
    except OSError:
        for fd in (out_r, err_r):
            os.close(fd)
        return None
    finally:
        os.close(out_w)
        os.close(err_w)
    chunks: Dict[int, List[bytes]] = {out_r: [], err_r: []}
    try:
        poller = select.poll()
        for fd in chunks:
            poller.register(fd, select.POLLIN)
        reading = set(chunks)
        while reading:
            for fd, _ in poller.poll():
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    poller.unregister(fd)
                    reading.discard(fd)
        _, status = os.waitpid(pid, 0)
    except BaseException:   # KeyboardInterrupt: do not leave the runtime or its children behind
        try:
            os.killpg(pid, sig.SIGKILL)
        except OSError:
            pass
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(out_r)
        os.close(err_r)
    code = os.waitstatus_to_exitcode(status)
    out, err = (b"".join(chunks[fd]).decode("utf-8", "surrogateescape") for fd in (out_r, err_r))
    return (128 - code if code < 0 else code), out, err


def _hold_use(lock: str, entry: str) -> Optional[int]:
    """Take the cache entry's use lock shared on a descriptor that this process keeps and its
    runtime inherits (so a prune keeps the entry while the container runs: what
    ``Client.using`` does on the planned path); returns the descriptor (-1: none was needed,
    as for a read-only cache, where the lock cannot be taken). None when the entry is gone
    (pruned): the planned path then pulls it again."""
    import fcntl   # noqa: PLC0415 (only on this path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return -1 if os.path.isdir(entry) else None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.set_inheritable(fd, True)
    except OSError:
        os.close(fd)
        return -1 if os.path.isdir(entry) else None
    if not os.path.isdir(entry):
        os.close(fd)
        return None
    return fd


def _signals() -> Any:
    """CPython's built-in ``_signal``: the ``signal`` module wraps it in enums, and enum costs
    about 8 ms on this path (``signal`` where there is no ``_signal``)."""
    try:
        import _signal   # type: ignore[import-not-found, unused-ignore]   # noqa: PLC0415
    except ImportError:   # pragma: no cover - not CPython
        import signal as _signal   # noqa: PLC0415
    return _signal


def _restore_signals(sig: Any) -> Tuple[int, ...]:
    """The signals Python ignores at start-up (SIGPIPE, SIGXFSZ) and a program it starts must
    not inherit ignored (``subprocess``'s ``restore_signals``): ``yes | head`` in the container
    would print "Broken pipe" and fail instead of ending quietly."""
    return tuple(getattr(sig, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(sig, name))


def _signal_numbers(sig: Any, names: Sequence[str]) -> List[int]:
    """The numbers of the signals named (``"SIGINT"``) that this platform has."""
    return [getattr(sig, n) for n in names if isinstance(getattr(sig, n, None), int)]


def _exec(argv: Sequence[str], penv: Mapping[str, str], block: Sequence[str] = ()) -> None:
    """Replace this process with the runtime, its signal dispositions as a shell would leave
    them and the signals named in ``block`` blocked (``Invocation.blocked_signals``: the
    mask outlives the exec); returns only when the exec failed (then the planned path says
    why)."""
    sig = _signals()
    # SIGINT: Python's handler (``_entry._note_sigint``) only marks it for later, and a SIGINT
    # taken just before the exec would be lost with this process image (by hand, Charliecloud:
    # 1 of 400 SIGINTs, and the command ran on with nothing printed). Blocked, the handler of
    # one already taken runs now (pthread_sigmask runs pending handlers: KeyboardInterrupt,
    # nothing started); then SIGINT is left at its default, which ends this process if one
    # comes before the exec. (An ignored SIGINT stays ignored.)
    before = sig.pthread_sigmask(sig.SIG_BLOCK, [sig.SIGINT])
    try:
        interrupt = sig.getsignal(sig.SIGINT)
        if interrupt is not sig.SIG_IGN:
            sig.signal(sig.SIGINT, sig.SIG_DFL)
    finally:
        sig.pthread_sigmask(sig.SIG_SETMASK, before)
    restored = [(signum, sig.signal(signum, sig.SIG_DFL)) for signum in _restore_signals(sig)]
    restored.append((sig.SIGINT, interrupt))
    mask = sig.pthread_sigmask(sig.SIG_BLOCK, _signal_numbers(sig, block)) if block else None
    try:
        os.execve(argv[0], list(argv), penv)
    except OSError:
        if mask is not None:
            sig.pthread_sigmask(sig.SIG_SETMASK, mask)
        for signum, handler in restored:
            sig.signal(signum, handler)


def _spawn_wait(argv: Sequence[str], penv: Mapping[str, str], hold: Sequence[str], started: Optional[str] = None,
                block: Sequence[str] = ()) -> Optional[Tuple[int, Optional[int], Optional[int]]]:
    """Start the runtime and wait for it, passing SIGTERM/SIGINT/SIGHUP on, but holding one
    that arrives while the runtime still sets up (``Runtime.startup_names``; ``started``:
    ``OrphanGuard.started``) until the command runs: what ``_exec._forward_signals`` does,
    without the executor's imports (this is the start-up path). The hold re-checks on a 5 ms
    SIGALRM timer, so no thread is needed. Returns the runtime's status (128+N when a signal
    ended it), the last signal this process got while it ran, and one still held when it
    ended (it never reached the command); None when it could not be started (the planned
    path then says why). ``block``: signals the runtime starts with blocked (``_exec``)."""
    from ._proctree import HOLD_LIMIT, exists, innermost, still_starting   # noqa: PLC0415 (only on this path)
    sig = _signals()
    # blocked from before the spawn until the handlers are in place: a signal in between
    # would otherwise end this process (SIGTERM's default) and leave the runtime running
    relayed = (sig.SIGTERM, sig.SIGINT, sig.SIGHUP)
    mask = sig.pthread_sigmask(sig.SIG_BLOCK, relayed)
    try:
        pid = os.posix_spawn(argv[0], list(argv), dict(penv), setsigmask={*mask, *_signal_numbers(sig, block)},
                             setsigdef=_restore_signals(sig))
    except OSError:
        sig.pthread_sigmask(sig.SIG_SETMASK, mask)
        return None
    seen: List[int] = []
    pending: List[int] = []
    since = [0.0]
    done = [False]

    def send(signum: int) -> None:
        try:
            os.kill(innermost(pid) if started is not None else pid, signum)
        except OSError:
            pass

    def release(signum: int = 0, frame: Any = None) -> None:
        # done, or reaped: this timer's handler can run right after waitpid returned and
        # before ``done`` is set; the runtime ended with the signal still held (and its
        # process ID may be another process's by now)
        if done[0] or not exists(pid):
            return
        if still_starting(pid, hold, started) and time.monotonic() - since[0] < HOLD_LIMIT:
            sig.setitimer(sig.ITIMER_REAL, 0.005)
            return
        while pending:
            send(pending.pop(0))

    def forward(signum: int, frame: Any) -> None:
        seen.append(signum)
        if pending or (hold and still_starting(pid, hold, started)):
            if not pending:
                since[0] = time.monotonic()
                sig.setitimer(sig.ITIMER_REAL, 0.005)
            pending.append(signum)
            return
        send(signum)
    previous = [(sig.SIGALRM, sig.signal(sig.SIGALRM, release))]
    previous += [(signum, sig.signal(signum, forward)) for signum in relayed]
    sig.pthread_sigmask(sig.SIG_SETMASK, mask)   # one that came meanwhile arrives now
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        done[0] = True
        sig.setitimer(sig.ITIMER_REAL, 0)
        for signum, handler in previous:
            sig.signal(signum, handler)
    code = os.waitstatus_to_exitcode(status)
    return (128 - code if code < 0 else code, seen[-1] if seen else None, pending[-1] if pending else None)


def _guarded_command(rec: Dict[str, Any], guard: Dict[str, Any]
                     ) -> Optional[Tuple[List[str], Dict[str, str], Callable[[str], str], str, Optional[str]]]:
    """A record's argv and environment inside its orphan guard, named for this run
    (``GUARD_NAME``, ``GUARD_PATH`` filled in), what fills the guard's other words, the run's
    scratch directory (the caller removes it) and the guard's ``created`` file; None when no
    scratch directory can be made (the planned path then says why)."""
    try:
        name, scratch_dir = make_run_scratch(os.environ)
    except OSError:
        return None
    scratch = os.path.join(scratch_dir, "run")

    def fill(word: str) -> str:
        return word.replace(GUARD_NAME, name).replace(GUARD_PATH, scratch)
    try:
        argv, penv, _ = _command(rec, os.environ, [fill(w) for w in guard.get("options", [])])
    except BaseException:
        remove_files_and_dir(scratch_dir)
        raise
    return argv, penv, fill, scratch_dir, fill(guard["created"]) if guard.get("created") else None


def _run_guarded(rec: Dict[str, Any], guard: Dict[str, Any], hold: Sequence[str] = (),
                 block: Sequence[str] = ()) -> Optional[int]:
    """The exit status, or None when the runtime failed (125) before any container existed
    (an empty ``guard``: nothing to remove, only ``hold``), or could not be started (a
    scratch directory or the spawn failed: the planned path then says why)."""
    guarded = _guarded_command(rec, guard)
    if guarded is None:
        return None
    argv, penv, fill, scratch_dir, created = guarded
    try:
        started = fill(guard["started"]) if guard.get("started") else None
        ran = _spawn_wait(argv, penv, hold, started, block)
        if ran is None:
            return None
        code, forwarded, held = ran
        remove = [fill(w) for w in guard.get("remove", [])]
        if forwarded is not None and remove:
            # rare (a signal came): the executor removes a container left behind
            from ._exec import SubprocessRunner, ended_by_signal   # noqa: PLC0415
            if ended_by_signal(SubprocessRunner(), argv[0], penv, forwarded, held, remove, created):
                code = 128 + forwarded
        never_created = created is not None and not (os.path.isfile(created) and os.path.getsize(created))
    finally:
        remove_files_and_dir(scratch_dir)
    if code == 125 and forwarded is None and never_created:
        return None
    return code
