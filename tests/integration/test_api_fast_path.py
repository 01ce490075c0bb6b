"""``nsdf_hpc.run()`` in a new process, served by a launch record (issue 11 goal 2), against
every real runtime: the result a planned call gives, without importing pydantic; and Ctrl-C
(or a SIGINT to the Python process alone) leaves no process and no container behind, from
the record and on the planned path.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from .helpers import BUSYBOX, RUNTIME_PARAMS, root_env
from .test_runtimes import HOSTILE, _pinned

pytestmark = [pytest.mark.integration, pytest.mark.registry]

#: a research script's call: prints the result as JSON, and whether pydantic was imported
#: before the result's image was read (the image is built from the record on first use)
SCRIPT = """
import json, sys
import nsdf_hpc
a = json.loads(sys.argv[1])
r = nsdf_hpc.run(a["image"], a["command"], runtime=a["runtime"], cwd=a["cwd"], env=a.get("env"),
                 binds=a.get("binds"))
pydantic = "pydantic" in sys.modules
print(json.dumps({"pydantic": pydantic, "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                  "argv": list(r.argv), "runtime": r.runtime, "ok": r.ok,
                  "image": None if r.image is None else r.image.model_dump()}))
"""

#: the same call, interrupted: KeyboardInterrupt ends it with 130
INTERRUPTED = """
import json, signal, sys
import nsdf_hpc
signal.signal(signal.SIGINT, signal.default_int_handler)
a = json.loads(sys.argv[1])
try:
    nsdf_hpc.run(a["image"], a["command"], runtime=a["runtime"], cwd=a["cwd"])
except KeyboardInterrupt:
    print("KeyboardInterrupt", "pydantic" in sys.modules)
    sys.exit(130)
print("not interrupted")
"""


def _api(payload: Dict[str, Any], cache: Path, cwd: str, **extra: str) -> Dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(payload)], env=root_env(cache, **extra),
                       cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _same_run(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    """Two results of one call, but for how they were made; a guarded runtime (podman) names
    each run's container and scratch files anew."""
    def norm(argv: List[str]) -> List[str]:
        return [re.sub(r"nsdf-run-[0-9a-f]+", "SCRATCH", re.sub(r"nsdf-\d+-[0-9a-f]+", "NAME", w)) for w in argv]
    def fields(r: Dict[str, Any]) -> Dict[str, Any]:   # "cached": whether this call converted the image
        return {**{k: r[k] for k in ("returncode", "stdout", "stderr", "runtime", "ok")},
                "image": {k: v for k, v in r["image"].items() if k != "cached"}}
    assert fields(a) == fields(b)
    assert norm(a["argv"]) == norm(b["argv"])


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_run_in_a_new_process_is_served_by_its_record(runtime: str, shared_cache: Path, tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    work = tmp_path / "sp ace ü"
    work.mkdir()
    image = _pinned(BUSYBOX)
    data = [tmp_path / "data-1", tmp_path / "data 2"]
    for i, d in enumerate(data):
        d.mkdir()
        (d / "f").write_text(f"file {i}")
        os.chmod(d, 0o755)
    script = 'printf "[%s][%s][%s][%s][%s]" "$1" "$(pwd)" "$#" "$H" "$(cat /mnt/f)"; echo "to stderr $2" >&2; exit 3'
    call = {"image": image, "command": ["sh", "-c", script, "sh", HOSTILE[4], HOSTILE[9]], "runtime": runtime,
            "cwd": str(work), "env": {"H": "value one"}, "binds": [f"{data[0]}:/mnt"]}
    # another command, value and bind directory
    other = {**call, "command": ["sh", "-c", 'printf "<%s>" "$@" "$H" "$(cat /mnt/f)"; exit 0', "sh", HOSTILE[3],
                                 HOSTILE[11]], "env": {"H": HOSTILE[1] + " ü"}, "binds": [f"{data[1]}:/mnt"]}
    launch = shared_cache / "launch"
    before = set(launch.glob("*.rec"))
    planned = _api(call, shared_cache, "/tmp", NSDF_HPC_NO_FAST_PATH="1")
    assert planned["pydantic"] and planned["returncode"] == 3 and not planned["ok"]
    assert planned["stdout"] == f"[{HOSTILE[4]}][{work}][2][value one][file 0]"
    assert planned["stderr"].endswith(f"to stderr {HOSTILE[9]}\n")
    assert set(launch.glob("*.rec")) == before, "NSDF_HPC_NO_FAST_PATH writes no record"
    first = _api(call, shared_cache, "/tmp")
    assert first["pydantic"], "the first call plans"
    records = set(launch.glob("*.rec")) - before
    assert len(records) == 1, "and keeps its plan"
    stamp = [p.stat().st_mtime_ns for p in records]
    _same_run(first, planned)
    again = _api(call, shared_cache, "/tmp")
    assert not again["pydantic"], "the record serves the call without pydantic"
    assert again["image"]["cached"], "a run from the record converts nothing"
    _same_run(again, planned)
    # any command, value and bind directory (the record's slots), in another process
    served = _api(other, shared_cache, "/tmp")
    assert not served["pydantic"]
    assert (served["returncode"], served["stdout"]) == (0, f"<{HOSTILE[3]}><{HOSTILE[11]}><{HOSTILE[1]} ü><file 1>")
    _same_run(served, _api(other, shared_cache, "/tmp", NSDF_HPC_NO_FAST_PATH="1"))
    assert [p.stat().st_mtime_ns for p in records] == stamp, "the record was reused as it was"
    # another working directory of the call, or of the process, is another record
    moved = _api(call, shared_cache, str(work))
    assert moved["pydantic"] and moved["stdout"] == planned["stdout"]


def _left(runtime: str, marker: str, pid: int) -> List[str]:
    """Processes of the interrupted call, and containers named after its process."""
    procs = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    left = [f"process {p}" for p in procs]
    if runtime in ("podman", "podman-hpc"):
        names = subprocess.run([runtime, "ps", "-a", "--format", "{{.Names}}"], capture_output=True,
                               text=True).stdout.split()
        left += [f"container {n}" for n in names if n.startswith(f"nsdf-{pid}-")]
    return left


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_ctrl_c_leaves_nothing_behind_from_the_record_and_planned(runtime: str, shared_cache: Path,
                                                                  tmp_path: Path) -> None:
    """SIGINT to the process group (a terminal's Ctrl-C) or to Python alone, at several points
    of a running command: KeyboardInterrupt (exit 130), and no process (UDocker's relay ran
    the command in a child that outlived a killed udocker) or container (podman's, which
    outlived a killed podman client) left, from the record and on the planned path."""
    image = _pinned(BUSYBOX)
    seconds = 86000 + os.getpid() % 400   # a sleep no other test runs
    marker = f"sleep {seconds}"
    call = {"image": image, "command": ["sleep", str(seconds)], "runtime": runtime, "cwd": str(tmp_path)}
    _api({**call, "command": ["true"]}, shared_cache, "/tmp")    # the record
    failures = []
    trials = 0
    for planned in ("", "1"):
        for delay in (0.5, 1.0, 2.0):
            for group in (True, False):
                extra = {"NSDF_HPC_NO_FAST_PATH": "1"} if planned else {}
                p = subprocess.Popen([sys.executable, "-c", INTERRUPTED, json.dumps(call)], env=root_env(shared_cache, **extra),
                                     cwd="/tmp", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
                time.sleep(delay)
                (os.killpg if group else os.kill)(p.pid, signal.SIGINT)
                out, err = p.communicate(timeout=120)
                trials += 1
                what = f"{'planned' if planned else 'record'}, SIGINT to {'the group' if group else 'Python'} at {delay} s"
                if p.returncode != 130 or not out.startswith("KeyboardInterrupt"):
                    failures.append(f"{what}: exit {p.returncode}: {out.strip()} {err.strip()[-300:]}")
                elif out.strip() != f"KeyboardInterrupt {bool(planned)}":
                    failures.append(f"{what}: {out.strip()} (pydantic imported on the record's path?)")
                deadline = time.monotonic() + 10
                while _left(runtime, marker, p.pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                left = _left(runtime, marker, p.pid)
                if left:
                    failures.append(f"{what}: left {left}")
                    subprocess.run(["pkill", "-9", "-f", marker])
    assert trials == 12
    assert not failures, "\n".join(failures)
