"""The REST backend's pure request builders and parsers, from answers recorded from the real
slurmrestd 22.05.8 of the testbed (tests/unit/data/slurmrestd), and the backend over a fake
transport (errors, token handling, the choice of backend)."""
from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import pytest

from nsdf_hpc.config import SlurmSettings, load_slurm_settings
from nsdf_hpc.errors import ConfigError, SchedulerError, SubmitError
from nsdf_hpc.schedulers import get_backend
from nsdf_hpc.schedulers import rest_api as api
from nsdf_hpc.schedulers.rest import RestSlurm
from nsdf_hpc.schedulers.script import ScriptInputs, render_script
from nsdf_hpc.schedulers.spec import ArraySpec, Dependency, JobSpec
from nsdf_hpc.schedulers.states import JobState

DATA = Path(__file__).parent / "data" / "slurmrestd"
V = "v0.0.38"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.e30.SECRET-SIGNATURE-abc123"   # a JWT with no claims


def rec(name: str) -> Dict[str, Any]:
    data: Dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return data


def response(name: str) -> api.Response:
    r = rec(name)
    body = r["body"]
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return api.Response(r["status"], raw, r["content_type"])


def ids(name: str) -> Dict[str, str]:
    note = rec(name)["note"]
    out: Dict[str, str] = json.JSONDecoder().raw_decode(note.split("ids: ", 1)[1])[0]
    return out


# ---------------------------------------------------------------------------- builders
def test_requests_are_data_and_commas_are_percent_encoded() -> None:
    assert api.jobs_request(V).target() == "/slurm/v0.0.38/jobs"
    # 22.05 answers "Unable to parse query." (400) for a raw comma
    assert api.db_jobs_request(V, ["12", "10_3", "12_1"]).target() == "/slurmdb/v0.0.38/jobs?step=10%2C12"
    assert api.cancel_request(V, "12_3").target() == "/slurm/v0.0.38/job/12_3"
    assert rec("slurmdb-jobs")["request"]["target"].startswith("/slurmdb/v0.0.38/jobs?step=")
    assert rec("slurmdb-jobs")["status"] == 200


def _spec(**kw: Any) -> JobSpec:
    base: Dict[str, Any] = dict(image="busybox", command=("echo", "hi"), job_name="job")
    base.update(kw)
    return JobSpec(**base)


def _inputs(tmp_path: Path, **kw: Any) -> ScriptInputs:
    base: Dict[str, Any] = dict(prefix=("/usr/bin/true", "RUNTIME"), fixed_env={"PATH": "/bin"},
                                job_dir=str(tmp_path / "job dir"),
                                script_path=str(tmp_path / "job dir" / "job.sh"), chdir=str(tmp_path),
                                output=str(tmp_path / "o %j.out"), error=str(tmp_path / "e.err"))
    base.update(kw)
    return ScriptInputs(**base)


HOSTILE = 'we"ird \\ name $(x) `y` ;#!'


def test_the_job_description_is_the_scripts_sbatch_lines(tmp_path: Path) -> None:
    spec = _spec(job_name=HOSTILE, nodes=2, ntasks_per_node=1, cpus_per_task=2, mem="2G",
                 time="1-02:03:04", partition="debug", account="acct", qos="normal",
                 constraint="a&b", exclusive=True,
                 dependencies=(Dependency(kind="afterok", job_ids=("5", "6")),))
    script = render_script(spec, _inputs(tmp_path))
    desc = api.job_description(script, V, environment={"PATH": "/bin"}, cwd="/elsewhere")
    assert desc == {
        "name": HOSTILE, "standard_output": str(tmp_path / "o %j.out"),
        "standard_error": str(tmp_path / "e.err"), "current_working_directory": str(tmp_path),
        "nodes": "2", "tasks_per_node": 1, "cpus_per_task": 2, "memory_per_node": 2048,
        "time_limit": 24 * 60 + 2 * 60 + 4, "partition": "debug", "account": "acct", "qos": "normal",
        "constraints": "a&b", "exclusive": "true", "dependency": "afterok:5:6",
        "kill_on_invalid_dependency": True, "environment": {"PATH": "/bin"}}
    # newer APIs take the environment as a list
    assert api.job_description(script, "v0.0.40", environment={"A": "1"})["environment"] == ["A=1"]


def test_an_array_chunks_option_wins_and_extra_directives_map_or_fail(tmp_path: Path) -> None:
    spec = _spec(array=ArraySpec(indices=(0, 1, 2)), extra_directives=("--comment=x y", "--requeue"))
    script = render_script(spec, _inputs(tmp_path, array_indices=(0, 1, 2)), array="0-2")
    desc = api.job_description(script, V, environment={}, options=["--array=0-1%1"])
    assert desc["array"] == "0-1%1" and desc["comment"] == "x y" and desc["requeue"] is True
    bad = render_script(_spec(extra_directives=("--gres-flags=enforce-binding",)), _inputs(tmp_path))
    with pytest.raises(SubmitError, match="--gres-flags=enforce-binding has no field"):
        api.job_description(bad, V, environment={})


def test_only_directives_before_the_first_command_count() -> None:
    script = "#!/bin/bash\n#SBATCH -J a -N 2\n# a comment\n#SBATCH --time=5\necho x\n#SBATCH --qos=late\n"
    assert api.script_directives(script) == [("-J", "a"), ("-N", "2"), ("--time", "5")]


@pytest.mark.parametrize("text,minutes", [("5", 5), ("5:30", 6), ("1:00:00", 60), ("2-0", 2880),
                                          ("0-0:0:1", 1), ("1-1:1", 1501)])
def test_time_limits_round_up_to_minutes(text: str, minutes: int) -> None:
    assert api.parse_time_minutes(text) == minutes


def test_memory_units() -> None:
    assert [api.parse_memory_mb(v) for v in ("100", "100M", "2G", "1T", "512K")] == [100, 100, 2048, 1 << 20, 1]


# ---------------------------------------------------------------------------- parsers (recorded)
def test_versions_from_the_openapi_document() -> None:
    body = rec("openapi-v3")["body"]
    assert api.parse_openapi_versions(body) == ["v0.0.38"]
    assert api.choose_version(["v0.0.38"]) == "v0.0.38" and api.db_available(body, "v0.0.38")
    assert api.choose_version(["v0.0.42", "v0.0.41"]) == "v0.0.42"
    assert api.choose_version(["v0.0.36"]) is None


def test_submit_answers() -> None:
    assert api.parse_submit(response("submit-ok")).isdigit()
    assert api.error_text(response("submit-bad-partition")) == "Invalid partition name specified (2000)"
    assert "environment must be set" in api.error_text(response("submit-no-environment"))
    assert response("submit-no-environment").status == 400


def test_slurmctld_exit_codes_are_wait_statuses() -> None:
    j = ids("jobs-final")
    table = api.parse_jobs(response("jobs-final").json(), V)
    assert (table[j["ok"]].state, table[j["ok"]].exit_code) == (JobState.COMPLETED, 0)
    # exit 7 is reported as 1792
    raw = {x["job_id"]: x for x in rec("jobs-final")["body"]["jobs"]}
    assert raw[int(j["exit7"])]["exit_code"] == 1792
    assert (table[j["exit7"]].state, table[j["exit7"]].exit_code) == (JobState.FAILED, 7)
    assert (table[j["killed"]].state, table[j["killed"]].signal) == (JobState.FAILED, 9)
    assert (table[j["sleeper"]].state, table[j["sleeper"]].signal) == (JobState.CANCELED, 15)
    assert table[j["ok"]].source == "slurmrestd"
    name = 'hostile name "q" $x `y` ;'
    assert table[j[name]].name == name
    assert {k for k in table if k.startswith(j["arr"] + "_")} == {f"{j['arr']}_{i}" for i in range(5)}
    assert api.decode_wait_status(1792) == (7, None) and api.decode_wait_status(9) == (0, 9)


def test_a_pending_array_range_is_one_record() -> None:
    j = ids("jobs-running")
    table = api.parse_jobs(response("jobs-running").json(), V)
    assert table[f"{j['arr']}_[2-5%1]"].state is JobState.QUEUED
    assert table[f"{j['arr']}_0"].state is JobState.COMPLETED
    assert table[j["sleeper"]].state is JobState.ACTIVE and table[j["sleeper"]].exit_code is None


def test_slurmdb_exit_codes_are_not_trusted_on_22_05() -> None:
    j = ids("slurmdb-jobs")
    raw = {str(x["job_id"]): x for x in rec("slurmdb-jobs")["body"]["jobs"]}
    assert raw[j["exit7"]]["exit_code"] == {"return_code": 0, "status": "SUCCESS"}   # the bug
    table = api.parse_db_jobs(response("slurmdb-jobs").json(), V)
    assert table[j["exit7"]].state is JobState.FAILED and table[j["exit7"]].exit_code is None
    assert table[j["killed"]].signal == 9 and table[j["sleeper"]].state is JobState.CANCELED
    assert table[j["ok"]].source == "slurmrestd-slurmdb"
    assert f"{j['arr']}_4" in table and f"{j['arr']}_0" in table
    assert api.parse_db_jobs(response("slurmdb-jobs-none").json(), V) == {}
    # a newer API's answer is believed
    newer = {"jobs": [{"job_id": 5, "state": {"current": ["FAILED"]},
                       "exit_code": {"status": ["EXITED"], "return_code": {"set": True, "number": 7}}}]}
    assert api.parse_db_jobs(newer, "v0.0.41")["5"].exit_code == 7


def test_error_answers() -> None:
    assert "Invalid job id specified" in api.error_text(response("cancel-unknown"))
    assert response("cancel-completed").status == 200
    assert api.error_text(response("job-multi-id-refused")) == "Unable to parse URL path."
    assert api.error_text(response("jobs-bad-token")) == "Unspecified error: Failed while looking for jobs (-1)"


# ---------------------------------------------------------------------------- the backend
class FakeDaemon:
    """Answers with recorded responses; records every request (headers included)."""

    def __init__(self, answers: Mapping[Tuple[str, str], Any]) -> None:
        self.answers = dict(answers)
        self.seen: List[Tuple[str, str, Dict[str, str], Optional[bytes]]] = []

    def __call__(self, method: str, url: str, headers: Mapping[str, str], body: Optional[bytes],
                 timeout: float) -> api.Response:
        path = url.split("6820", 1)[1]
        self.seen.append((method, path, dict(headers), body))
        ans = self.answers.get((method, path.split("?")[0])) or self.answers.get((method, path))
        if ans is None:
            return api.Response(404, b"not recorded")
        if isinstance(ans, BaseException):
            raise ans
        return ans if isinstance(ans, api.Response) else response(ans)


def backend(tmp_path: Path, daemon: FakeDaemon, token: str = TOKEN, **env: str) -> RestSlurm:
    e = {"SLURMRESTD_URL": "http://127.0.0.1:6820", "SLURM_JWT": token, **env}
    return RestSlurm(settings=SlurmSettings(work_dir=str(tmp_path), submit_retries=2), env=e,
                     transport=daemon, user="alice", sleep=lambda s: None)


BASE = {("GET", "/openapi/v3"): "openapi-v3", ("GET", "/slurm/v0.0.38/ping"): "ping"}


def test_submit_sends_the_script_and_its_mapped_options(tmp_path: Path) -> None:
    d = FakeDaemon({**BASE, ("POST", "/slurm/v0.0.38/job/submit"): "submit-ok"})
    rest = backend(tmp_path, d)
    script = tmp_path / "job.sh"
    script.write_text(render_script(_spec(job_name=HOSTILE, nodes=2), _inputs(tmp_path)))
    jid = rest.sbatch(str(script), ["1001"], ["--array=0-9"])
    assert jid == api.parse_submit(response("submit-ok"))
    method, path, headers, body = d.seen[-1]
    sent = json.loads(body or b"")
    assert sent["script"] == script.read_text()
    assert sent["job"]["name"] == HOSTILE and sent["job"]["nodes"] == "2" and sent["job"]["array"] == "0-9"
    # script arguments crash slurmrestd 22.05: the chunk offset goes in the environment
    assert "argv" not in sent["job"] and sent["job"]["environment"][api.OFFSET_VARIABLE] == "1001"
    assert headers["X-SLURM-USER-NAME"] == "alice" and headers["X-SLURM-USER-TOKEN"] == TOKEN
    assert TOKEN not in (body or b"").decode()


def test_status_is_one_request_and_accounting_fills_the_gone(tmp_path: Path) -> None:
    j = ids("slurmdb-jobs")
    gone = {"jobs": [x for x in rec("jobs-final")["body"]["jobs"] if str(x["job_id"]) != j["exit7"]]}
    d = FakeDaemon({**BASE, ("GET", "/slurm/v0.0.38/jobs"): api.Response(200, json.dumps(gone).encode()),
                    ("GET", "/slurmdb/v0.0.38/jobs"): "slurmdb-jobs"})
    rest = backend(tmp_path, d)
    job_dir = tmp_path / "j"
    (job_dir / "exit").mkdir(parents=True)
    (job_dir / "exit" / j["exit7"]).write_text("7\n")
    rest.dirs[j["exit7"]] = str(job_dir)
    table = rest.status([j["ok"], j["exit7"], j["killed"], f"{j['arr']}_3"])
    assert table[j["ok"]].source == "slurmrestd" and table[j["killed"]].signal == 9
    st = table[j["exit7"]]
    assert (st.state, st.exit_code, st.source) == (JobState.FAILED, 7, "slurmrestd-slurmdb")
    assert "exit-code file" in (st.reason or "")
    gets = [p for m, p, _, _ in d.seen if m == "GET" and "/jobs" in p]
    assert gets == ["/slurm/v0.0.38/jobs", f"/slurmdb/v0.0.38/jobs?step={j['exit7']}"]


def test_unreachable_daemon_is_transient_and_names_the_url(tmp_path: Path) -> None:
    d = FakeDaemon({("GET", "/openapi/v3"): ConnectionRefusedError(111, "Connection refused")})
    rest = backend(tmp_path, d)
    with pytest.raises(SchedulerError, match="127.0.0.1:6820.*is slurmrestd running") as info:
        rest.status(["1"])
    assert getattr(info.value, "transient", False) is True


def test_refused_tokens_are_clear_and_never_echoed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    d = FakeDaemon({**BASE, ("GET", "/slurm/v0.0.38/jobs"): api.Response(401, b"Authentication failure")})
    rest = backend(tmp_path, d)
    with pytest.raises(SchedulerError, match="refused the token for user alice.*scontrol token") as info:
        rest.status(["1"])
    assert not getattr(info.value, "transient", False)
    d.answers[("GET", "/slurm/v0.0.38/jobs")] = "jobs-bad-token"      # what 22.05 really does
    with pytest.raises(SchedulerError, match="rejected token") as info2:
        rest.status(["1"])
    for text in (str(info.value), str(info2.value), caplog.text, repr(rest)):
        assert TOKEN not in text and "SECRET" not in text


def test_submit_errors(tmp_path: Path) -> None:
    d = FakeDaemon({**BASE, ("POST", "/slurm/v0.0.38/job/submit"): "submit-bad-partition"})
    rest = backend(tmp_path, d)
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --partition=nope\ntrue\n")
    with pytest.raises(SubmitError, match="Invalid partition name") as info:
        rest.sbatch(str(script))
    assert info.value.transient is False
    d.answers[("POST", "/slurm/v0.0.38/job/submit")] = api.Response(
        503, b'{"errors": [{"error": "Slurm temporarily unable to accept job", "error_number": 2051}]}')
    with pytest.raises(SubmitError, match="failed 2 times") as info:
        rest.sbatch(str(script))
    assert info.value.transient is True


def test_cancel_ignores_ended_and_unknown_jobs(tmp_path: Path) -> None:
    d = FakeDaemon({**BASE, ("DELETE", "/slurm/v0.0.38/job/5"): "cancel-completed",
                    ("DELETE", "/slurm/v0.0.38/job/999999"): "cancel-unknown",
                    ("DELETE", "/slurm/v0.0.38/job/7_2"): "cancel-array-task"})
    backend(tmp_path, d).cancel(["5", "999999", "7_2"])
    assert [p for m, p, _, _ in d.seen if m == "DELETE"] == [
        "/slurm/v0.0.38/job/5", "/slurm/v0.0.38/job/999999", "/slurm/v0.0.38/job/7_2"]


def _jwt(claims: Dict[str, Any]) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{part}.sig"


def test_token_checks_before_any_request(tmp_path: Path) -> None:
    d = FakeDaemon(BASE)
    with pytest.raises(ConfigError, match="token for user 'bob'.*runs as 'alice'"):
        backend(tmp_path, d, token=_jwt({"sun": "bob", "exp": int(time.time()) + 60}))
    old = backend(tmp_path, d, token=_jwt({"sun": "alice", "exp": int(time.time()) - 60}))
    with pytest.raises(SchedulerError, match="SLURM_JWT expired"):
        old.status(["1"])
    assert d.seen == []
    with pytest.raises(ConfigError, match="SLURMRESTD_URL"):
        RestSlurm(settings=SlurmSettings(work_dir=str(tmp_path)), env={"SLURM_JWT": TOKEN})
    with pytest.raises(ConfigError, match="SLURM_JWT"):
        RestSlurm(settings=SlurmSettings(work_dir=str(tmp_path)), env={"SLURMRESTD_URL": "http://x:1"})


def test_the_backend_choice_is_explicit_and_explained(tmp_path: Path) -> None:
    env = {"NSDF_HPC_SLURM_BACKEND": "rest", "SLURMRESTD_URL": "http://127.0.0.1:6820",
           "SLURM_JWT": TOKEN, "HOME": str(tmp_path)}
    settings = load_slurm_settings(env, files=[])
    assert (settings.backend, settings.rest_url) == ("rest", "http://127.0.0.1:6820")
    chosen = get_backend(settings=settings, env=env)
    assert chosen.backend == "rest" and chosen.choice_reason == "backend = rest (from NSDF_HPC_SLURM_BACKEND)"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[slurm]\nbackend = "rest"\nrest_url = "http://h:6820"\n')
    s2 = load_slurm_settings({"HOME": str(tmp_path)}, files=[str(cfg)])
    assert (s2.backend, s2.rest_url, s2.source("backend")) == ("rest", "http://h:6820", f"config:{cfg}")
    plain = get_backend(settings=load_slurm_settings({"HOME": str(tmp_path), "NSDF_HPC_SLURM_BACKEND": "commands"},
                                                     files=[]), env={})
    assert plain.backend == "commands" and "NSDF_HPC_SLURM_BACKEND" in plain.choice_reason
    auto = get_backend(settings=load_slurm_settings({"HOME": str(tmp_path)}, files=[]), env={})
    assert auto.backend in ("commands", "pyslurm") and auto.choice_reason.startswith("auto")
    with pytest.raises(ConfigError, match="backend"):
        load_slurm_settings({"HOME": str(tmp_path), "NSDF_HPC_SLURM_BACKEND": "http"}, files=[])


def test_a_forced_pyslurm_that_cannot_be_used_is_an_error_not_a_fallback(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setitem(sys.modules, "pyslurm", None)        # "import pyslurm" fails
    settings = load_slurm_settings({"HOME": str(tmp_path), "NSDF_HPC_SLURM_BACKEND": "pyslurm"}, files=[])
    with pytest.raises(ConfigError, match="backend = pyslurm .from NSDF_HPC_SLURM_BACKEND.*cannot be imported"):
        get_backend(settings=settings, env={})
