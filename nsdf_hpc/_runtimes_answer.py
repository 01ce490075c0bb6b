"""What runtime detection depends on, and the kept answer of ``nsdf-run runtimes``.

Detection (``runtimes/__init__.py``) finds each runtime's executables (:func:`find_candidates`),
probes them once per :func:`fingerprint` (the probes are kept in the detection cache), and
assesses each with the host's facts (``host.probe_host``) and the few files and variables the
runtime names itself (``Runtime.assessment_inputs``: Apptainer's setuid starter, UDocker's
engine configuration). The click command ``runtimes`` prints what detection and the choice
made of all that; then it keeps its output with those inputs (``remember_answer``).

A later ``nsdf-run runtimes`` (or ``--json``) prints the kept output without click, pydantic
or the runtime classes, when every input still holds: the settings' stamp (the config files'
text, ``NSDF_HPC_*``, ``HOME``: ``_listing.validated``), the interpreter, ``PATH``, each
runtime's executables found again on it (with their inode, size and modification time: the
detection cache's key), the host's facts read again, the assessment files and variables, and
the detection cache file itself (not rewritten or removed since). Anything else (a changed
input, an unreadable file, ``--refresh``, a runtime that cannot name its inputs: Shifter)
goes to the click command, which detects and keeps the new answer.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
# not `from typing import ...` at run time: this module is on the start-up path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ._launch import _sha256
from ._listing import remember_valid, validated
from ._version import __version__

#: the detection cache's format (its key and its probe records)
DETECT_CACHE_VERSION = 2
#: the stamp's name (``_listing.STAMP_FILES``)
STAMP = "runtimes"
#: the command lines whose output is kept
FAST_ARGS = (["runtimes"], ["runtimes", "--json"])


def find_candidates(configured: Optional[str], preferred: Sequence[str], executables: Sequence[str],
                    path_env: str) -> Tuple[List[str], List[str]]:
    """A runtime's executables to probe, in order, and notes: the configured path alone when
    there is one, else ``preferred`` ones that are executable (the one installed with this
    interpreter) before the first hit on ``PATH``."""
    notes: List[str] = []
    if configured is not None:
        if os.path.isfile(configured) and os.access(configured, os.X_OK):
            return [configured], notes
        notes.append(f"configured path {configured} is not an executable file")
        return [], notes
    found: List[str] = list(dict.fromkeys(p for p in preferred if os.access(p, os.X_OK)))
    for exe in executables:
        hit = shutil.which(exe, path=path_env)
        if hit and hit not in found:
            if found:   # not probed: one probe per runtime keeps detection cheap
                if os.path.realpath(hit) != os.path.realpath(found[0]):
                    notes.append(f"{found[0]} (installed with this Python) is used, not {hit} on PATH")
                continue
            found.append(hit)
    return found, notes


def fingerprint(paths: Sequence[str], path_env: str, uid: int) -> str:
    """The detection cache's key: the executables found (and what they resolve to, with
    inode, size and modification time), ``PATH`` and the user."""
    h = _sha256()   # CPython's built-in one: hashlib's OpenSSL costs about 7 ms to load
    h.update(f"{DETECT_CACHE_VERSION}|{__version__}|{uid}|{path_env}".encode())
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
            h.update(f"|{p}|{os.path.realpath(p)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{p}|missing".encode())
    return str(h.hexdigest())


def file_state(path: str) -> Optional[List[int]]:
    """What a kept answer compares of a file: None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mode, st.st_uid, st.st_ino, st.st_size, st.st_mtime_ns]


def inputs(lookups: Sequence[Tuple[Optional[str], Sequence[str], Sequence[str]]], path_env: str,
           host: Mapping[str, Any], files: Sequence[str], names: Sequence[str],
           env: Mapping[str, str], cache_file: Optional[str]) -> Dict[str, Any]:
    """Everything a detection and its assessments were made from, as plain data:
    ``lookups`` are each runtime's ``(configured path, preferred paths, executable names)``,
    ``host`` the host's facts, ``files`` and ``names`` what the runtimes' assessments read."""
    found = [find_candidates(c, p, e, path_env) for c, p, e in lookups]
    return {"executable": sys.executable, "path": path_env,
            "lookups": [[c, list(p), list(e)] for c, p, e in lookups],
            "found": [[list(f), list(n)] for f, n in found],
            "fingerprint": fingerprint([x for f, _ in found for x in f], path_env, os.getuid()),
            "host": dict(host), "files": [[f, file_state(f)] for f in files],
            "names": [[n, env.get(n)] for n in names],
            "cache": [cache_file, file_state(cache_file) if cache_file else None]}


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON keeps them (tuples are lists there)."""
    return bool(json.loads(json.dumps(a)) == b)


def _still_holds(kept: Mapping[str, Any], env: Mapping[str, str]) -> bool:
    from .host import probe_host   # noqa: PLC0415 (dataclasses: only once a kept answer exists)
    import dataclasses   # noqa: PLC0415
    path_env = env.get("PATH", os.defpath)
    lookups = kept["lookups"]
    if kept["executable"] != sys.executable or kept["path"] != path_env:
        return False
    now = inputs([(c, p, e) for c, p, e in lookups], path_env, dataclasses.asdict(probe_host(env)),
                 [f for f, _ in kept["files"]], [n for n, _ in kept["names"]], env, kept["cache"][0])
    return _same(now, dict(kept))


def remember_answer(env: Mapping[str, str], variant: str, text: str, made_from: Mapping[str, Any]) -> None:
    """Keep the output of ``nsdf-run runtimes`` (``variant``: ``""`` or ``"--json"``) with what
    it was made from (:func:`inputs`); the other variant is kept too while that is the same."""
    old = validated(env, STAMP)
    outputs: Dict[str, str] = {}
    if old is not None and _same(made_from, old.get("inputs")) and isinstance(old.get("outputs"), dict):
        outputs.update(old["outputs"])
    outputs[variant] = text
    remember_valid(env, STAMP, {"inputs": dict(made_from), "outputs": outputs})


def fast_runtimes(args: Sequence[str], env: Mapping[str, str]) -> Optional[str]:
    """The kept output of ``nsdf-run runtimes [--json]`` while everything it was made from
    holds, else None (the click command answers)."""
    if list(args) not in FAST_ARGS:
        return None
    try:
        data = validated(env, STAMP)
        if data is None:
            return None
        text = data["outputs"].get("--json" if "--json" in args else "")
        if not isinstance(text, str) or not _still_holds(data["inputs"], env):
            return None
        return text
    except Exception:   # noqa: BLE001 - the click command answers instead, and says what is wrong
        return None
