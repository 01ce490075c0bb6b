"""slurmrestd as data (pure): request builders and response parsers of the REST backend.

Nothing here opens a connection: :mod:`.rest` sends these :class:`Request` values through its
one HTTP executor, and the parsers are tested from responses recorded from the real daemon
(``tests/contracts/cassettes/slurmrestd``).

The job description is built from the SAME batch script the command backend hands to
``sbatch``: slurmrestd (22.05, v0.0.38) ignores ``#SBATCH`` lines, so they are parsed here
(:func:`script_directives`) and mapped onto the job description's fields
(:func:`job_description`); a directive without a field is a :class:`SubmitError` naming it,
never silently dropped.

What slurmrestd 22.05 (OpenAPI v0.0.38) does, measured on the testbed:

* ``#SBATCH`` lines in ``script`` are ignored (name, output, time limit... all default).
* ``environment`` is required (``"environment must be set"``, HTTP 400); v0.0.38 takes an
  object, v0.0.39+ a list of ``NAME=VALUE``.
* ``argv`` (script arguments) crashes the daemon (SIGSEGV in libslurmfull) in most requests:
  never sent. An array chunk's offset travels as ``NSDF_ARRAY_OFFSET`` in the environment.
* Several ids in one ``/job/`` path are refused: the status of many jobs is ONE
  ``GET /slurm/v0.0.38/jobs`` (every job slurmctld holds) filtered here.
* ``nodes`` as the schema's ``[min, max]`` list is ignored (``[2, 2]`` gives a one-node
  job) and ``[2]`` is refused: the string ``"2"`` / ``"2-4"`` is what works.
* ``exit_code`` from slurmctld is the raw wait status (exit 7 -> 1792): decoded here.
* ``/slurmdb/v0.0.38`` reports ``exit_code {"status": "SUCCESS", "return_code": 0}`` for a job
  that exited 7 (steps too): its state and signal are used, its exit code is not (see
  :data:`DB_EXIT_CODES_TRUSTED`). It stores ``"`` in job names as a backquote, as sacct does.
* A held submission (``hold``) is HTTP 200 with a ``job_id`` AND an error "Job is in held
  state, pending scheduler release" (2042): a job id means the job exists.
* Cancelling a completed job is HTTP 200 with no error; an unknown id is HTTP 500
  "Invalid job id specified" (2017). A cancelled job's ``exit_code`` is 15 (SIGTERM).
* ``GET /slurm/v0.0.38/job/1,2`` is HTTP 400 "Unable to parse URL path.".
* ``/slurmdb/v0.0.38/jobs?step=1,2`` is HTTP 400 "Unable to parse query." unless the commas
  are percent-encoded (``step=1%2C2`` selects jobs 1 and 2).
* A rejected token is HTTP 500 "Unspecified error" (error_number -1), not 401; no token at all
  is 401 "Authentication failure" (text/plain). Errors carry ``error_number`` or
  ``error_code`` depending on the endpoint.
"""
from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote, urlencode

from ..errors import SubmitError, UnexpectedOutputError
from .states import JobStatus, final_reason, slurm_state

__all__ = ["Request", "Response", "KNOWN_VERSIONS", "DB_EXIT_CODES_TRUSTED", "openapi_request",
           "ping_request", "submit_request", "jobs_request", "db_jobs_request",
           "cancel_request", "parse_openapi_versions", "choose_version", "parse_errors",
           "error_text", "parse_submit", "parse_jobs", "parse_db_jobs", "decode_wait_status",
           "script_directives", "job_description", "token_claims", "OFFSET_VARIABLE"]

#: API versions this module builds requests for, newest first (v0.0.38: Slurm 22.05;
#: v0.0.39: 23.02; v0.0.40-42: 23.11-24.11). Only v0.0.38 is tested against a real daemon.
KNOWN_VERSIONS: Tuple[str, ...] = ("v0.0.42", "v0.0.41", "v0.0.40", "v0.0.39", "v0.0.38")
#: slurmdbd's exit codes are wrong on v0.0.38 (0 for a job that exited 7).
DB_EXIT_CODES_TRUSTED: Mapping[str, bool] = {"v0.0.38": False}
#: where an array chunk's offset goes (argv crashes slurmrestd 22.05); the script reads it.
OFFSET_VARIABLE = "NSDF_ARRAY_OFFSET"


@dataclass(frozen=True)
class Request:
    """One HTTP request to slurmrestd (no headers: the executor adds user and token)."""

    method: str
    path: str
    query: Tuple[Tuple[str, str], ...] = ()
    body: Optional[Mapping[str, Any]] = None

    def target(self) -> str:
        """The path with its query string (``,`` percent-encoded: 22.05 needs that)."""
        if not self.query:
            return self.path
        return self.path + "?" + urlencode(self.query, quote_via=quote, safe="")


@dataclass(frozen=True)
class Response:
    """What came back: the status code and the body (JSON when it parses)."""

    status: int
    body: bytes
    content_type: str = ""
    data: Optional[Any] = field(default=None, compare=False)

    def json(self) -> Any:
        if self.data is not None:
            return self.data
        try:
            return json.loads(self.body.decode("utf-8", "replace"))
        except ValueError:
            return None


# ---------------------------------------------------------------------------- builders
def openapi_request() -> Request:
    """Every path the daemon serves (the API versions are read from it)."""
    return Request("GET", "/openapi/v3")


def ping_request(version: str) -> Request:
    return Request("GET", f"/slurm/{version}/ping")


def jobs_request(version: str) -> Request:
    """Every job slurmctld holds, in one request (22.05 cannot select several ids)."""
    return Request("GET", f"/slurm/{version}/jobs")


def db_jobs_request(version: str, job_ids: Sequence[str]) -> Request:
    """The accounting records of ``job_ids`` in one request (``step=`` is sacct's ``-j``)."""
    ids = sorted({j.split("_", 1)[0] for j in job_ids}, key=lambda s: (len(s), s))
    return Request("GET", f"/slurmdb/{version}/jobs", query=(("step", ",".join(ids)),))


def cancel_request(version: str, job_id: str) -> Request:
    """``DELETE /slurm/vX/job/ID`` (one per id; an array task is ``ID_TASK``)."""
    return Request("DELETE", f"/slurm/{version}/job/{quote(job_id, safe='_')}")


def submit_request(version: str, description: Mapping[str, Any], script: str) -> Request:
    return Request("POST", f"/slurm/{version}/job/submit",
                   body={"script": script, "job": dict(description)})


# ---------------------------------------------------------------------------- versions
def parse_openapi_versions(data: Any) -> List[str]:
    """The ``/slurm/vX/`` versions an ``/openapi/v3`` document lists, newest first."""
    paths = data.get("paths") if isinstance(data, dict) else None
    if not isinstance(paths, dict):
        raise UnexpectedOutputError("slurmrestd", json.dumps(data)[:300] if data is not None else "",
                                    expected="an OpenAPI document with 'paths' (GET /openapi/v3)")
    found = {m.group(1) for p in paths for m in [re.match(r"^/slurm/(v\d+\.\d+\.\d+)/", p)] if m}
    return sorted(found, key=_version_key, reverse=True)


def _version_key(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in v.lstrip("v").split("."))


def choose_version(available: Sequence[str]) -> Optional[str]:
    """The newest version both sides know; None when there is none."""
    for v in KNOWN_VERSIONS:
        if v in available:
            return v
    return None


def db_available(data: Any, version: str) -> bool:
    """Whether ``/slurmdb/<version>/`` is served (slurmrestd started with the db plugin)."""
    paths = data.get("paths", {}) if isinstance(data, dict) else {}
    return any(str(p).startswith(f"/slurmdb/{version}/") for p in paths)


# ---------------------------------------------------------------------------- errors
def parse_errors(data: Any) -> List[str]:
    """The ``errors`` of a response, one readable string each ("Invalid partition name
    specified (2000)"); empty when there are none."""
    if not isinstance(data, dict):
        return []
    out = []
    for e in data.get("errors") or ():
        if not isinstance(e, dict):
            out.append(str(e))
            continue
        num = e.get("error_number", e.get("error_code"))
        words = [str(e.get("error") or "")]
        desc = str(e.get("description") or "")
        if desc and desc not in words[0]:
            words.append(desc)
        text = ": ".join(w for w in words if w) or "unknown error"
        out.append(f"{text} ({num})" if num not in (None, 0) else text)
    return out


def error_text(resp: Response) -> str:
    """One line for a failed response: its errors, else its (short) body."""
    errs = parse_errors(resp.json())
    if errs:
        return "; ".join(errs)
    body = resp.body.decode("utf-8", "replace").strip()
    return body[:200] or f"HTTP {resp.status}"


# ---------------------------------------------------------------------------- parsers
def parse_submit(resp: Response) -> str:
    data = resp.json()
    jid = data.get("job_id") if isinstance(data, dict) else None
    if isinstance(jid, int) or (isinstance(jid, str) and jid.isdigit()):
        return str(jid)
    raise UnexpectedOutputError("slurmrestd", resp.body.decode("utf-8", "replace")[:500],
                                expected="a job submission response with 'job_id'")


def decode_wait_status(status: int) -> Tuple[int, Optional[int]]:
    """slurmctld's raw wait status (``1792``) -> ``(exit code, signal)``: ``(7, None)``."""
    sig = status & 0x7F
    if sig:
        return 0, sig
    return (status >> 8) & 0xFF, None


def _number(value: Any) -> Optional[int]:
    """An int, or v0.0.40+'s ``{"set": true, "number": N}``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and value.get("set", True) and isinstance(value.get("number"), int):
        return int(value["number"])
    return None


def _state_word(value: Any) -> str:
    """``"FAILED"`` (v0.0.38) or ``["FAILED"]`` / ``{"current": ["FAILED"]}`` (newer)."""
    if isinstance(value, dict):
        value = value.get("current")
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value or "")


def _exit_of(value: Any, raw_wait_status: bool) -> Tuple[Optional[int], Optional[int]]:
    """An exit code: v0.0.38 slurmctld's int is a wait status; newer ones are objects
    ``{"status": [...], "return_code": N|{number}, "signal": {"id": N}}``."""
    if isinstance(value, dict):
        rc = _number(value.get("return_code"))
        sig = value.get("signal")
        signo = _number(sig.get("id", sig.get("signal_id"))) if isinstance(sig, dict) else None
        return rc, signo or None
    n = _number(value)
    if n is None:
        return None, None
    return decode_wait_status(n) if raw_wait_status else (n, None)


def _job_key(job: Mapping[str, Any]) -> str:
    jid = _number(job.get("job_id"))
    arr, task = _number(job.get("array_job_id")), _number(job.get("array_task_id"))
    if arr and task is not None and (job.get("array_task_string") in (None, "")):
        return f"{arr}_{task}"
    if arr and task is None and job.get("array_task_string"):
        # the pending rest of an array: one record "ID_[2-9]" under the array's id
        return f"{arr}_[{job['array_task_string']}]"
    return str(jid)


def parse_jobs(data: Any, version: str) -> Dict[str, JobStatus]:
    """``GET /slurm/vX/jobs`` -> statuses keyed ``ID`` or ``ID_TASK`` (pending array
    ranges keyed ``ID_[range]``)."""
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list):
        raise UnexpectedOutputError("slurmrestd", json.dumps(data)[:300] if data is not None else "",
                                    expected="a jobs response with a 'jobs' list")
    raw = version == "v0.0.38"
    out: Dict[str, JobStatus] = {}
    for job in jobs:
        if not isinstance(job, dict):
            continue
        key = _job_key(job)
        word = _state_word(job.get("job_state"))
        st = slurm_state(word)
        rc, sig = _exit_of(job.get("exit_code"), raw) if st.state.final else (None, None)
        out[key] = st.model_copy(update={
            "job_id": key, "name": job.get("name") or None, "source": "slurmrestd",
            "exit_code": rc, "signal": sig,
            "reason": final_reason(st.state, job.get("state_reason")) or st.reason})
    return out


def parse_db_jobs(data: Any, version: str) -> Dict[str, JobStatus]:
    """``GET /slurmdb/vX/jobs`` -> statuses. On v0.0.38 the exit code is left out
    (:data:`DB_EXIT_CODES_TRUSTED`): the caller fills it from the job's exit-code file."""
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if jobs is None and isinstance(data, dict) and data.get("errors"):
        return {}                       # "Nothing found with query" (9003)
    if not isinstance(jobs, list):
        raise UnexpectedOutputError("slurmrestd", json.dumps(data)[:300] if data is not None else "",
                                    expected="a slurmdb jobs response with a 'jobs' list")
    trusted = DB_EXIT_CODES_TRUSTED.get(version, True)
    out: Dict[str, JobStatus] = {}
    for job in jobs:
        if not isinstance(job, dict):
            continue
        jid = str(_number(job.get("job_id")))
        arr: Dict[str, Any] = job["array"] if isinstance(job.get("array"), dict) else {}
        task = _number(arr.get("task_id"))
        base = _number(arr.get("job_id"))
        key = f"{base}_{task}" if base and task is not None else jid
        state: Dict[str, Any] = job["state"] if isinstance(job.get("state"), dict) else {}
        st = slurm_state(_state_word(state.get("current")))
        rc, sig = _exit_of(job.get("exit_code"), False)
        if not trusted:
            rc = None           # v0.0.38: 0 for a job that exited 7; its signals are right
        out[key] = st.model_copy(update={
            "job_id": key, "name": job.get("name") or None, "source": "slurmrestd-slurmdb",
            "exit_code": rc if st.state.final else None, "signal": sig,
            "reason": final_reason(st.state, state.get("reason")) or st.reason})
    return out


# ---------------------------------------------------------------------------- the script
def _sbatch_words(text: str) -> List[str]:
    """Split one ``#SBATCH`` line as sbatch does for what :func:`.script.sbatch_quote` wrote:
    double quotes group, a backslash escapes the next character."""
    lex = shlex.shlex(text, posix=True)
    lex.whitespace_split = True
    lex.commenters = ""
    lex.quotes = '"'
    lex.escapedquotes = '"'
    return list(lex)


def script_directives(script: str) -> List[Tuple[str, Optional[str]]]:
    """The ``#SBATCH`` options of a batch script, as ``(--flag, value or None)``, in order.

    Like sbatch: only the lines before the first command count."""
    out: List[Tuple[str, Optional[str]]] = []
    for i, line in enumerate(script.splitlines()):
        s = line.strip()
        if i == 0 and s.startswith("#!"):
            continue
        if not s:
            continue
        if not s.startswith("#"):
            break
        m = re.match(r"#SBATCH\s+(.*)$", s)
        if not m:
            continue
        words = _sbatch_words(m.group(1))
        j = 0
        while j < len(words):
            w = words[j]
            if w.startswith("--"):
                name, eq, value = w.partition("=")
                out.append((name, value if eq else None))
            elif re.fullmatch(r"-[A-Za-z]", w):
                out.append((w, words[j + 1] if j + 1 < len(words) else None))
                j += 1
            elif re.fullmatch(r"-[A-Za-z].+", w):
                out.append((w[:2], w[2:]))
            else:
                raise SubmitError(f"cannot read the #SBATCH line {line!r} for slurmrestd")
            j += 1
    return out


_SHORT = {"-J": "--job-name", "-o": "--output", "-e": "--error", "-D": "--chdir",
          "-N": "--nodes", "-n": "--ntasks", "-c": "--cpus-per-task", "-t": "--time",
          "-p": "--partition", "-A": "--account", "-q": "--qos", "-C": "--constraint",
          "-G": "--gpus", "-a": "--array", "-d": "--dependency", "-H": "--hold"}
#: #SBATCH flag -> job description field, for flags whose value passes through unchanged
_PLAIN = {"--job-name": "name", "--output": "standard_output", "--error": "standard_error",
          "--input": "standard_input", "--chdir": "current_working_directory",
          "--partition": "partition", "--account": "account", "--qos": "qos",
          "--constraint": "constraints", "--gpus": "gpus", "--gpus-per-node": "gpus_per_node",
          "--gpus-per-task": "gpus_per_task", "--array": "array", "--dependency": "dependency",
          "--reservation": "reservation", "--comment": "comment", "--gres": "gres",
          "--licenses": "licenses", "--wckey": "wckey", "--mail-type": "mail_type",
          "--mail-user": "mail_user", "--signal": "signal", "--open-mode": "open_mode",
          "--prefer": "prefer", "--distribution": "distribution"}
_INT = {"--ntasks": "tasks", "--ntasks-per-node": "tasks_per_node",
        "--cpus-per-task": "cpus_per_task", "--nice": "nice"}
_FLAG = {"--hold": ("hold", True), "--requeue": ("requeue", True),
         "--no-requeue": ("requeue", False), "--oversubscribe": ("oversubscribe", True),
         "--spread-job": ("spread_job", True), "--no-kill": ("no_kill", True)}
_YES = ("yes", "true", "1", None)


def parse_memory_mb(value: str) -> int:
    """``--mem`` values (``4G``, ``500M``, ``2048``: MB by default) -> MB."""
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", value.strip().upper())
    if not m:
        raise SubmitError(f"cannot read --mem={value} for slurmrestd")
    n, unit = int(m.group(1)), m.group(2) or "M"
    return {"K": max(1, -(-n // 1024)), "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]


def parse_time_minutes(value: str) -> int:
    """Slurm's time formats (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``)
    -> whole minutes, rounded up as Slurm does."""
    v = value.strip()
    if v.lower() in ("infinite", "unlimited"):
        raise SubmitError("--time=UNLIMITED cannot be sent to slurmrestd; give a limit")
    days = 0
    if "-" in v:
        d, _, v = v.partition("-")
        if not d.isdigit():
            raise SubmitError(f"cannot read --time={value}")
        days = int(d)
        parts = v.split(":")
        if not all(p.isdigit() for p in parts) or len(parts) > 3:
            raise SubmitError(f"cannot read --time={value}")
        h, m, s = ([int(p) for p in parts] + [0, 0])[:3]
    else:
        parts = v.split(":")
        if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
            raise SubmitError(f"cannot read --time={value}")
        nums = [int(p) for p in parts]
        if len(nums) == 1:
            h, m, s = 0, nums[0], 0
        elif len(nums) == 2:
            h, m, s = 0, nums[0], nums[1]
        else:
            h, m, s = nums
    total = ((days * 24 + h) * 60 + m) * 60 + s
    return max(1, -(-total // 60))


def _nodes(value: str) -> str:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", value.strip())
    if not m:
        raise SubmitError(f"cannot read --nodes={value} for slurmrestd")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    # v0.0.38's schema says [min, max], but slurmrestd 22.05 ignores [2, 2] (the job gets ONE
    # node) and refuses [2]; the string form "2" / "2-4" is honoured
    return f"{lo}-{hi}" if hi != lo else str(lo)


def job_description(script: str, version: str, *, environment: Mapping[str, str],
                    options: Sequence[str] = (), cwd: Optional[str] = None) -> Dict[str, Any]:
    """The job description for ``POST /slurm/vX/job/submit`` from the script's ``#SBATCH``
    lines, then ``options`` (sbatch command-line options, e.g. an array chunk's
    ``--array=0-999``), which win as they do for sbatch.

    ``environment`` is the batch script's whole environment: the script is rendered with
    ``--export=NIL`` and sets its own ``PATH``, so the caller passes only what sbatch would.
    """
    pairs = script_directives(script)
    for opt in options:
        name, eq, val = opt.partition("=")
        pairs.append((name, val if eq else None))
    desc: Dict[str, Any] = {}
    for flag, value in pairs:
        flag = _SHORT.get(flag, flag)
        if flag in _PLAIN:
            if value is None:
                raise SubmitError(f"#SBATCH {flag} needs a value")
            desc[_PLAIN[flag]] = value
        elif flag in _INT:
            if value is None or not value.strip().isdigit():
                raise SubmitError(f"#SBATCH {flag}={value}: a whole number is needed")
            desc[_INT[flag]] = int(value)
        elif flag in _FLAG:
            key, on = _FLAG[flag]
            desc[key] = on
        elif flag == "--nodes":
            desc["nodes"] = _nodes(value or "")
        elif flag == "--mem":
            desc["memory_per_node"] = parse_memory_mb(value or "")
        elif flag == "--mem-per-cpu":
            desc["memory_per_cpu"] = parse_memory_mb(value or "")
        elif flag == "--time":
            desc["time_limit"] = parse_time_minutes(value or "")
        elif flag == "--exclusive":
            desc["exclusive"] = "true" if value in (None, "") else value
        elif flag == "--kill-on-invalid-dep":
            desc["kill_on_invalid_dependency"] = (value or "yes").lower() in _YES
        elif flag == "--export":
            if (value or "").upper() not in ("NIL", "NONE"):
                raise SubmitError(f"#SBATCH --export={value}: the REST backend sends the job's "
                                  "environment itself and supports only --export=NIL")
        else:
            raise SubmitError(f"#SBATCH {flag}{'=' + value if value is not None else ''} has no "
                              f"field in slurmrestd's {version} job description; remove it from "
                              "extra_directives or use the command backend")
    if cwd and "current_working_directory" not in desc:
        desc["current_working_directory"] = cwd
    env = dict(environment)
    desc["environment"] = env if version == "v0.0.38" else [f"{k}={v}" for k, v in env.items()]
    return desc


# ---------------------------------------------------------------------------- the token
def token_claims(token: str) -> Dict[str, Any]:
    """The (unverified) claims of a JWT: ``exp``, ``iat``, ``sun`` (the user name).
    Empty when it is not a JWT. Only used for clear messages before a request."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        data = json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
