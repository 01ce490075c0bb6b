"""The Slurm REST backend: slurmrestd over HTTP with a JWT, for hosts without Slurm's commands.

Selected only when asked for (``backend = "rest"`` in ``[slurm]`` or
``NSDF_HPC_SLURM_BACKEND=rest``). The URL is ``rest_url`` / ``SLURMRESTD_URL``, the token
``SLURM_JWT`` (what ``scontrol token`` prints), the user name the current user's; the API
version is read from the daemon (``GET /openapi/v3``, else ``/slurm/vX/ping`` newest first).

Every request is built and every answer parsed in :mod:`.rest_api` (pure); :meth:`RestSlurm.send`
is the one place that talks HTTP (``http.client`` from the standard library: a few JSON
requests need no HTTP package). The token is only ever in the request header: never logged,
never in an error message, a script, provenance or any argv.

* submit: the batch script the command backend would hand to sbatch, its ``#SBATCH`` lines
  mapped onto the job description; its environment is only ``PATH`` (the script is rendered
  for ``--export=NIL``; the container's environment is in the script).
* status of any number of jobs: ONE ``GET /slurm/vX/jobs``; jobs slurmctld no longer holds
  come from ONE ``GET /slurmdb/vX/jobs?step=ID,...`` when the daemon serves the slurmdb
  endpoints (22.05: the state, with the exit code from the job's exit-code file), else from
  the exit-code file alone.
* cancel: one ``DELETE /slurm/vX/job/ID`` per id (the API has no multi-id form).
* errors: daemon unreachable or 5xx with a transient message -> transient
  (``TransientStatusError`` / ``SubmitError(transient=True)``); 401/403 and a rejected
  token -> not transient, with the way out (a new ``scontrol token``).
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import pwd
import random
import socket
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit

from .._exec import CommandRunner
from ..config import SlurmSettings
from ..errors import ConfigError, SchedulerError, SubmitError, UnexpectedOutputError
from . import commands as cmd
from . import rest_api as api
from .backoff import Backoff
from .spec import check_job_id, task_covered
from .slurm import Slurm, TransientStatusError
from .states import JobStatus

__all__ = ["RestSlurm", "Transport", "http_transport"]

logger = logging.getLogger(__name__)

#: (method, url, headers, body, timeout) -> Response; the seam unit tests replace
Transport = Callable[[str, str, Mapping[str, str], Optional[bytes], float], api.Response]

#: the batch script's environment (it sets its own PATH; the container's is in the script)
JOB_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
_TOKEN_HINT = ("check SLURM_JWT: get a new token with `scontrol token` (with lifespan=SECONDS "
               "for a longer one)")


def http_transport(method: str, url: str, headers: Mapping[str, str], body: Optional[bytes],
                   timeout: float) -> api.Response:
    """One request with http.client (http:// and https://); raises OSError when unreachable."""
    parts = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(parts.hostname or "localhost", parts.port, timeout=timeout)
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        conn.request(method, target, body=body, headers=dict(headers))
        resp = conn.getresponse()
        data = resp.read()
        return api.Response(resp.status, data, resp.getheader("Content-Type") or "")
    except http.client.HTTPException as err:
        # the daemon closed the connection without an answer (22.05 does that when it crashes)
        raise ConnectionError(f"{type(err).__name__}: {err}") from err
    finally:
        conn.close()


class RestSlurm(Slurm):
    """Slurm through slurmrestd (the Job handle, waiting and logs are the command backend's)."""

    backend = "rest"

    def __init__(self, runner: Optional[CommandRunner] = None,
                 settings: Optional[SlurmSettings] = None, *,
                 env: Optional[Mapping[str, str]] = None,
                 transport: Optional[Transport] = None,
                 user: Optional[str] = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, **overrides: Any) -> None:
        super().__init__(runner, settings, env=env, sleep=sleep, clock=clock, rng=rng, **overrides)
        source: Mapping[str, str] = os.environ if env is None else env
        url = self.settings.rest_url or source.get("SLURMRESTD_URL", "")
        if not url:
            raise ConfigError("the Slurm REST backend needs slurmrestd's URL: set rest_url in "
                              "[slurm] or SLURMRESTD_URL (e.g. http://127.0.0.1:6820)")
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ConfigError(f"slurmrestd URL {url!r} (from {self.settings.source('rest_url')}) "
                              "is not an http:// or https:// URL")
        self.url = url.rstrip("/")
        token = source.get("SLURM_JWT", "")
        if not token:
            raise ConfigError("the Slurm REST backend needs a token in SLURM_JWT (the output of "
                              "`scontrol token`, or your site's way to get one)")
        self.__token = token
        self.rest_user = user or pwd.getpwuid(os.getuid()).pw_name
        claims = api.token_claims(token)
        sun = claims.get("sun")
        if isinstance(sun, str) and sun != self.rest_user:
            raise ConfigError(f"SLURM_JWT is a token for user {sun!r}, but this process runs as "
                              f"{self.rest_user!r}: get one with `scontrol token` as {self.rest_user}")
        self._token_exp = claims.get("exp") if isinstance(claims.get("exp"), int) else None
        self._transport: Transport = transport or http_transport
        self._version: Optional[str] = None
        self._db: Optional[bool] = None
        self.requests = 0

    def __repr__(self) -> str:
        return f"RestSlurm(url={self.url!r}, user={self.rest_user!r}, version={self._version!r})"

    # -------------------------------------------------------------- the one executor
    def send(self, req: api.Request, *, submit: bool = False) -> api.Response:
        """Send one request; unreachable -> transient error, 401/403 -> a token error.

        Other HTTP statuses are returned for the caller to read (slurmrestd answers 500 for
        many ordinary refusals, with ``errors`` saying why)."""
        err_cls = SubmitError if submit else SchedulerError
        if self._token_exp is not None and self._token_exp < time.time():
            raise err_cls(f"SLURM_JWT expired at {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(self._token_exp))}: "
                          + _TOKEN_HINT)
        headers = {"X-SLURM-USER-NAME": self.rest_user, "X-SLURM-USER-TOKEN": self.__token,
                   "Accept": "application/json"}
        body = None
        if req.body is not None:
            body = json.dumps(req.body).encode("utf-8", "surrogateescape")
            headers["Content-Type"] = "application/json"
        self.calls += 1
        self.requests += 1
        logger.debug("slurmrestd: %s %s", req.method, req.target())
        try:
            resp = self._transport(req.method, self.url + req.target(), headers, body,
                                   self.settings.command_timeout)
        except (OSError, socket.timeout) as err:
            what = f"slurmrestd at {self.url} did not answer {req.method} {req.path} ({_describe(err)})"
            if submit:
                # refused before anything was sent: safe to retry; otherwise the job may exist
                sent = not isinstance(err, ConnectionRefusedError)
                raise SubmitError(what + ("; check `squeue` before submitting again" if sent else ""),
                                  transient=True) from None
            raise TransientStatusError(what) from None
        if resp.status in (401, 403):
            raise err_cls(f"slurmrestd refused the token for user {self.rest_user} "
                          f"(HTTP {resp.status}: {api.error_text(resp)}): " + _TOKEN_HINT)
        return resp

    def _failure(self, resp: api.Response, what: str, submit: bool = False) -> SchedulerError:
        text = api.error_text(resp)
        data = resp.json()
        errs = data.get("errors") if isinstance(data, dict) else None
        if resp.status == 500 and any(isinstance(e, dict) and e.get("error_number") == -1
                                      for e in errs or ()):
            text += f" (slurmrestd 22.05 answers a rejected token this way: {_TOKEN_HINT})"
        msg = f"slurmrestd {what} failed (HTTP {resp.status}): {text}"
        transient = resp.status >= 500 and cmd.is_transient(text) or resp.status in (502, 503, 504)
        if submit:
            return SubmitError(msg, transient=transient)
        return TransientStatusError(msg) if transient else SchedulerError(msg)

    # -------------------------------------------------------------- versions
    @property
    def api_version(self) -> str:
        """The API version used (read from the daemon once): ``v0.0.38`` on Slurm 22.05."""
        if self._version is None:
            self._version, self._db = self._discover()
        return self._version

    @property
    def has_slurmdb(self) -> bool:
        """Whether the daemon serves ``/slurmdb/`` (slurmdbd accounting through REST)."""
        self.api_version
        return bool(self._db)

    def _discover(self) -> Tuple[str, bool]:
        resp = self.send(api.openapi_request())
        if resp.status == 200 and isinstance(resp.json(), dict):
            data = resp.json()
            available = api.parse_openapi_versions(data)
            chosen = api.choose_version(available)
            if chosen is None:
                raise SchedulerError(f"slurmrestd at {self.url} offers API {', '.join(available) or 'none'}; "
                                     f"nsdf-hpc knows {', '.join(api.KNOWN_VERSIONS)}")
            logger.info("slurmrestd %s: API %s (offered: %s)", self.url, chosen, ", ".join(available))
            return chosen, api.db_available(data, chosen)
        for v in api.KNOWN_VERSIONS:            # no OpenAPI document: ask each version
            r = self.send(api.ping_request(v))
            if r.status == 200:
                db = self.send(api.Request("GET", f"/slurmdb/{v}/diag")).status == 200
                return v, db
        raise SchedulerError(f"slurmrestd at {self.url} answers no known API version "
                             f"(HTTP {resp.status} for /openapi/v3: {api.error_text(resp)})")

    def version(self) -> Tuple[int, int]:
        """Slurm's major.minor, from the daemon's ping."""
        resp = self.send(api.ping_request(self.api_version))
        if resp.status != 200:
            raise self._failure(resp, "ping")
        data = resp.json() or {}
        ver = ((data.get("meta") or {}).get("Slurm") or {}).get("version") or {}
        try:
            return int(ver["major"]), int(ver["minor"])
        except (KeyError, TypeError, ValueError):
            raise UnexpectedOutputError("slurmrestd", resp.body.decode("utf-8", "replace")[:300],
                                        expected="meta.Slurm.version in the ping answer") from None

    def ping(self) -> str:
        """One line for doctor: the API version and the controller's answer."""
        resp = self.send(api.ping_request(self.api_version))
        if resp.status != 200:
            raise self._failure(resp, "ping")
        data = resp.json() or {}
        pings = data.get("pings") or []
        state = ", ".join(f"{p.get('hostname')} {p.get('ping')}" for p in pings if isinstance(p, dict))
        release = ((data.get("meta") or {}).get("Slurm") or {}).get("release", "?")
        return (f"slurmrestd {self.url}: Slurm {release}, API {self.api_version}, "
                f"slurmdb endpoints {'yes' if self._db else 'no'}; slurmctld {state or '?'}")

    def max_array_size(self) -> int:
        """slurmrestd does not show MaxArraySize: Slurm's default 1001 is assumed (bigger
        arrays are split into chunks, each with its offset in the environment)."""
        if self._max_array is None:
            self._max_array = 1001
        return self._max_array

    # -------------------------------------------------------------- submit
    def submit_argv(self, script: str, args: Sequence[str] = (),
                    options: Sequence[str] = ()) -> List[str]:
        """What the command backend would run (for ``--dry-run`` displays)."""
        return cmd.sbatch_argv(script, args, options)

    def submit_request(self, script_path: str, args: Sequence[str] = (),
                       options: Sequence[str] = ()) -> api.Request:
        """The submission of ``script_path`` (the file submit.py wrote) as the command
        backend would sbatch it: ``args`` (an array chunk's offset) go in the environment."""
        with open(script_path, encoding="utf-8", errors="surrogateescape") as fh:
            script = fh.read()
        environment = dict(JOB_ENVIRONMENT)
        if len(args) > 1:
            raise SubmitError("the REST backend passes at most one script argument (an array "
                              "chunk's offset)")
        if args:
            environment[api.OFFSET_VARIABLE] = str(args[0])
        desc = api.job_description(script, self.api_version, environment=environment,
                                   options=options, cwd=os.path.dirname(script_path) or None)
        return api.submit_request(self.api_version, desc, script)

    def start_ahead(self) -> None:
        """Nothing to start: a submission is one HTTP request to slurmrestd."""

    def sbatch(self, script: str, args: Sequence[str] = (), options: Sequence[str] = ()) -> str:
        """Submit one script file through slurmrestd; transient errors are retried."""
        try:
            req = self.submit_request(script, args, options)
        except SubmitError:
            raise
        except SchedulerError as err:          # the version discovery failed: nothing was sent
            raise SubmitError(f"cannot submit: {err}", transient=getattr(err, "transient", False)) from None
        backoff = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.3, clock=self._clock,
                          sleep=self._sleep, rng=self._rng)
        attempts = max(1, self.settings.submit_retries)
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                resp = self.send(req, submit=True)
            except SubmitError as err:
                if not err.transient or "before submitting again" in str(err):
                    raise
                last = str(err)
            else:
                data = resp.json()
                if resp.status == 200 and isinstance(data, dict) and data.get("job_id"):
                    # 22.05 lists notes as errors beside the id ("Job is in held state,
                    # pending scheduler release (2042)" for --hold): the job exists
                    for note in api.parse_errors(data):
                        logger.info("slurmrestd, job %s: %s", data.get("job_id"), note)
                    return api.parse_submit(resp)
                failure = self._failure(resp, "job submission", submit=True)
                if not getattr(failure, "transient", False):
                    raise failure
                last = str(failure)
            if attempt < attempts:
                logger.info("%s (attempt %d/%d; retrying)", last, attempt, attempts)
                backoff.sleep()
        raise SubmitError(f"submission through slurmrestd failed {attempts} times: {last}",
                          transient=True)

    # -------------------------------------------------------------- status
    def query_status(self, job_ids: Sequence[str],
                     accounting: str) -> Tuple[Dict[str, JobStatus], str]:
        """ONE ``/slurm/vX/jobs`` request, plus ONE ``/slurmdb/vX/jobs`` for the jobs
        slurmctld no longer holds (when the daemon has the slurmdb endpoints)."""
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        if not ids:
            return {}, accounting
        version = self.api_version
        resp = self.send(api.jobs_request(version))
        if resp.status != 200:
            raise self._failure(resp, "job status")
        wanted = set(ids) | {j.split("_", 1)[0] for j in ids}
        table = {k: v for k, v in api.parse_jobs(resp.json(), version).items()
                 if k in wanted or k.split("_", 1)[0] in wanted}
        missing = [j for j in ids if not _present(j, table)]
        if missing and accounting != "none" and self.has_slurmdb:
            table.update(self.db_status(missing))
            missing = [j for j in ids if not _present(j, table)]
        for j in missing:
            table[j] = self._exit_file_status(j, accounting)
        return table, accounting

    def db_status(self, job_ids: Sequence[str]) -> Dict[str, JobStatus]:
        """The accounting records of ``job_ids`` (ONE request). On v0.0.38 the database's exit
        codes are wrong (0 for a job that exited 7): the exit code comes from the job's
        exit-code file, or stays unknown."""
        version = self.api_version
        resp = self.send(api.db_jobs_request(version, job_ids))
        if resp.status != 200:
            raise self._failure(resp, "accounting query")
        wanted = set(job_ids) | {j.split("_", 1)[0] for j in job_ids}
        out = {k: v for k, v in api.parse_db_jobs(resp.json(), version).items()
               if k in wanted or k.split("_", 1)[0] in wanted}
        if api.DB_EXIT_CODES_TRUSTED.get(version, True):
            return out
        for k, st in list(out.items()):
            if not st.final:
                continue
            rc = self._exit_file_code(k)
            note = (f"exit code from the job's exit-code file (slurmdbd's {version} exit codes are wrong)"
                    if rc is not None else
                    f"exit code unknown: slurmdbd's {version} exit codes are wrong and the job left no exit-code file")
            out[k] = st.model_copy(update={"exit_code": rc, "reason": st.reason or note})
        return out

    def _exit_file_code(self, job_id: str) -> Optional[int]:
        base = job_id.split("_", 1)[0]
        d = self.dirs.get(base) or self.find_dir(base)
        if not d:
            return None
        try:
            with open(os.path.join(d, "exit", job_id)) as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    # -------------------------------------------------------------- cancel
    def cancel_argv(self, job_ids: Sequence[str]) -> List[str]:
        return cmd.cancel_argv(job_ids)

    def cancel(self, job_ids: Sequence[str]) -> None:
        """One DELETE per id; ids that already ended or are unknown are not errors (as with
        scancel)."""
        ids = list(dict.fromkeys(check_job_id(j) for j in job_ids))
        for j in ids:
            resp = self.send(api.cancel_request(self.api_version, j))
            if resp.status == 200 and not api.parse_errors(resp.json()):
                continue
            text = api.error_text(resp)
            if "already completing or completed" in text or "Invalid job id" in text \
                    or "Job/step already completing" in text:
                continue
            raise self._failure(resp, f"cancel of job {j}")

    # -------------------------------------------------------------- foreign jobs
    def paths_from_scontrol(self, job_id: str) -> Dict[str, Any]:
        """stdout/stderr paths of a job nsdf-hpc did not submit, from ``/slurm/vX/job/ID``."""
        try:
            resp = self.send(api.Request("GET", f"/slurm/{self.api_version}/job/{job_id.split('_', 1)[0]}"))
        except SchedulerError:
            return {}
        data = resp.json() if resp.status == 200 else None
        jobs = data.get("jobs") if isinstance(data, dict) else None
        if not jobs or not isinstance(jobs[0], dict):
            return {}
        out: Dict[str, Any] = {}
        for key, field in (("output", "standard_output"), ("error", "standard_error")):
            if jobs[0].get(field):
                out[key] = str(jobs[0][field])
        if jobs[0].get("array_task_string") or jobs[0].get("array_task_id") is not None:
            out["array"] = True
        return out


def _present(job_id: str, table: Mapping[str, JobStatus]) -> bool:
    if job_id in table:
        return True
    if "_" not in job_id:
        return any(k.split("_", 1)[0] == job_id for k in table)
    return any(task_covered(job_id, k) for k in table)


def _describe(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused: is slurmrestd running?"
    if isinstance(err, socket.timeout):
        return "timed out"
    return str(err) or type(err).__name__
