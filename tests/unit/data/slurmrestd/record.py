"""Re-record the slurmrestd answers in this directory from the testbed (as root):

    python3 tests/unit/data/slurmrestd/record.py

It submits a few tiny jobs (one held array, one sleeper it cancels), records what
slurmrestd answers, and asserts that the token appears in no file it writes.
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from nsdf_hpc.config import SlurmSettings  # noqa: E402
from nsdf_hpc.schedulers import rest_api as api  # noqa: E402
from nsdf_hpc.schedulers.rest import RestSlurm  # noqa: E402

OUT = str(Path(__file__).resolve().parent)
tok = open("/var/tmp/slurm-ci/restd-token.env").read().split("SLURM_JWT=", 1)[1].strip()
env = {"SLURMRESTD_URL": "http://127.0.0.1:6820", "SLURM_JWT": tok}
W = "/var/tmp/nsdf-scratch/rest-record"; os.makedirs(W, exist_ok=True)
r = RestSlurm(settings=SlurmSettings(work_dir=W), env=env)
V = r.api_version

def save(name, req, resp, note=""):
    body = resp.json()
    if body is None:
        body = resp.body.decode("utf-8", "replace")
    if name.startswith("jobs-") and isinstance(body, dict) and "jobs" in body:
        keep = {int(v) for v in ids.values()}
        all_jobs = body["jobs"]
        body = {**body, "jobs": [j for j in all_jobs
                                 if j["job_id"] in keep or j["array_job_id"] == int(ids["arr"])]}
        note += f"; trimmed to the recorded jobs ({len(body['jobs'])} of {len(all_jobs)})"
    if name == "openapi-v3":
        body = {"openapi": body.get("openapi"), "info": body.get("info"), "paths": {p: {} for p in body["paths"]}}
    rec = {"recorded_with": "slurmrestd 22.05.8 (Debian 12 slurmrestd 22.05.8-4+deb12u3), nsdf-hpc testbed",
           "note": note, "request": {"method": req.method, "target": req.target(), "body": req.body},
           "status": resp.status, "content_type": resp.content_type, "body": body}
    text = json.dumps(rec, indent=1, sort_keys=True)
    assert tok not in text
    open(f"{OUT}/{name}.json", "w").write(text + "\n")

def submit(name, script, **job):
    desc = {"name": name, "current_working_directory": W, "standard_output": f"{W}/%j.out",
            "environment": {"PATH": "/usr/bin:/bin"}, **job}
    req = api.submit_request(V, desc, "#!/bin/bash\n" + script + "\n")
    resp = r.send(req, submit=True)
    return req, resp

req = api.openapi_request(); save("openapi-v3", req, r.send(req), "paths only")
req = api.ping_request(V); save("ping", req, r.send(req))
ids = {}
for name, script, extra in [("ok", "true", {}), ("exit7", "exit 7", {}), ("killed", "kill -9 $$", {}),
                            ("sleeper", "sleep 300", {}), ("arr", "sleep 2", {"array": "0-5%1"}),
                            ("hostile name \"q\" $x `y` ;", "true", {})]:
    req, resp = submit(name, script, **extra)
    if name == "ok":
        save("submit-ok", req, resp)
    ids[name] = api.parse_submit(resp)
req, resp = submit("bad", "true", partition="nope"); save("submit-bad-partition", req, resp)
req = api.Request("POST", f"/slurm/{V}/job/submit", body={"script": "#!/bin/bash\ntrue\n", "job": {"name": "noenv", "current_working_directory": W}})
save("submit-no-environment", req, r.send(req, submit=True))
time.sleep(4)
req = api.jobs_request(V); save("jobs-running", req, r.send(req), f"ids: {json.dumps(ids)}; arr 0-5%1 running/pending, sleeper running")
req = api.cancel_request(V, ids["sleeper"]); save("cancel-running", req, r.send(req))
req = api.cancel_request(V, f"{ids['arr']}_5"); save("cancel-array-task", req, r.send(req), "pending task 5 of the array")
time.sleep(3)
req = api.cancel_request(V, ids["ok"]); save("cancel-completed", req, r.send(req))
req = api.cancel_request(V, "999999"); save("cancel-unknown", req, r.send(req))
time.sleep(12)
req = api.jobs_request(V); save("jobs-final", req, r.send(req), f"ids: {json.dumps(ids)}; ok exits 0, exit7 exits 7, killed is SIGKILLed, sleeper cancelled, arr task 5 cancelled")
req = api.db_jobs_request(V, list(ids.values())); save("slurmdb-jobs", req, r.send(req), f"ids: {json.dumps(ids)} (the exit7 job exited 7)")
req = api.db_jobs_request(V, ["999999"]); save("slurmdb-jobs-none", req, r.send(req))
req = api.Request("GET", f"/slurm/{V}/job/{ids['ok']},{ids['exit7']}"); save("job-multi-id-refused", req, r.send(req))
bad = RestSlurm(settings=SlurmSettings(work_dir=W), env={**env, "SLURM_JWT": "not-a-token"})
bad._version = V
req = api.jobs_request(V); save("jobs-bad-token", req, bad.send(req), "token 'not-a-token'")
print(json.dumps(ids))
