"""``nsdf-run runtimes``: the kept answer (``_runtimes_answer.py``) is printed only while
everything detection and the assessments were made from holds; any change sends the command
back to the click path. Pure logic on files made here (nothing is probed); the real runtimes:
``tests/integration/test_runtimes.py``."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

from nsdf_hpc import _runtimes_answer as answer
from nsdf_hpc.host import probe_host
from nsdf_hpc.models import RuntimeInfo
from nsdf_hpc.runtimes import detection_inputs

LOOKUPS: List[Tuple[Optional[str], List[str], List[str]]] = [
    (None, [], ["apptainer", "singularity"]), (None, [], ["ch-run"]), (None, [], ["podman"])]


@pytest.fixture
def bed(tmp_path: Path) -> Dict[str, Any]:
    """A PATH with two 'runtimes' (files, never run), settings files, an engine config that
    an assessment reads, and a detection cache file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("ch-run", "podman"):
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    (tmp_path / "user.toml").write_text("")
    (tmp_path / "detect.json").write_text("{}")
    env = {"HOME": str(tmp_path / "home"), "PATH": str(bindir), "NSDF_HPC_CONFIG": str(tmp_path / "user.toml"),
           "NSDF_HPC_SITE_CONFIG": str(tmp_path / "site.toml")}
    return {"env": env, "bin": bindir, "conf": tmp_path / "engine.conf", "cache": tmp_path / "detect.json"}


def made_from(bed: Dict[str, Any], env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    env = env or bed["env"]
    return answer.inputs(LOOKUPS, env["PATH"], dataclasses.asdict(probe_host(env)), [str(bed["conf"])],
                         ["UDOCKER_TARBALL"], env, str(bed["cache"]))


def test_the_kept_answer_is_printed_for_its_own_command_line(bed: Dict[str, Any]) -> None:
    env = bed["env"]
    assert answer.fast_runtimes(["runtimes"], env) is None          # nothing kept yet
    answer.remember_answer(env, "", "TABLE\n", made_from(bed))
    assert answer.fast_runtimes(["runtimes"], env) == "TABLE\n"
    assert answer.fast_runtimes(["runtimes", "--json"], env) is None
    answer.remember_answer(env, "--json", "{}\n", made_from(bed))
    assert answer.fast_runtimes(["runtimes", "--json"], env) == "{}\n"
    assert answer.fast_runtimes(["runtimes"], env) == "TABLE\n"    # both kept while the inputs hold
    for args in (["runtimes", "--refresh"], ["runtimes", "--json", "--refresh"], ["doctor"]):
        assert answer.fast_runtimes(args, env) is None


def _touch(p: Path) -> None:
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


CHANGES: Dict[str, Callable[[Dict[str, Any]], Optional[Dict[str, str]]]] = {
    "a runtime binary replaced": lambda b: _touch(b["bin"] / "ch-run"),
    "a runtime gone": lambda b: (b["bin"] / "podman").unlink(),
    "a runtime installed": lambda b: ((b["bin"] / "apptainer").write_text(""), (b["bin"] / "apptainer").chmod(0o755)),
    "a runtime no longer executable": lambda b: (b["bin"] / "podman").chmod(0o644),
    "another PATH": lambda b: {**b["env"], "PATH": f"{b['bin']}:/nonexistent"},
    "inside a Slurm allocation (a host fact)": lambda b: {**b["env"], "SLURM_JOB_ID": "7"},
    "an engine config made (an assessment input)": lambda b: b["conf"].write_text("tarball = x\n"),
    "a variable an assessment reads": lambda b: {**b["env"], "UDOCKER_TARBALL": "/x.tgz"},
    "the detection cache rewritten": lambda b: (b["cache"].unlink(), b["cache"].write_text("{}")),
    "the detection cache removed": lambda b: b["cache"].unlink(),
    "a config file edited": lambda b: Path(b["env"]["NSDF_HPC_CONFIG"]).write_text('runtime = "podman"\n'),
    "an NSDF_HPC_ variable": lambda b: {**b["env"], "NSDF_HPC_RUNTIME": "podman"},
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_of_what_it_was_made_from_goes_to_the_click_command(change: str, bed: Dict[str, Any]) -> None:
    answer.remember_answer(bed["env"], "", "TABLE\n", made_from(bed))
    assert answer.fast_runtimes(["runtimes"], bed["env"]) == "TABLE\n"
    new_env = CHANGES[change](bed)
    env = new_env if isinstance(new_env, dict) else bed["env"]
    assert answer.fast_runtimes(["runtimes"], env) is None


def test_a_new_answer_drops_the_other_command_lines_answer_made_from_other_inputs(bed: Dict[str, Any]) -> None:
    env = bed["env"]
    answer.remember_answer(env, "--json", "{}\n", made_from(bed))
    (bed["bin"] / "podman").unlink()
    answer.remember_answer(env, "", "TABLE\n", made_from(bed))
    assert answer.fast_runtimes(["runtimes"], env) == "TABLE\n"
    assert answer.fast_runtimes(["runtimes", "--json"], env) is None


def test_a_broken_stamp_goes_to_the_click_command(bed: Dict[str, Any]) -> None:
    env = bed["env"]
    answer.remember_answer(env, "", "TABLE\n", made_from(bed))
    stamp = Path(env["HOME"]) / ".cache" / "nsdf-hpc" / "runtimes-valid"
    stamp.write_text(stamp.read_text()[:-20])
    assert answer.fast_runtimes(["runtimes"], env) is None


def test_candidates_are_found_as_detection_finds_them(bed: Dict[str, Any], tmp_path: Path) -> None:
    mine = tmp_path / "venv-udocker"
    mine.write_text("")
    path = str(bed["bin"])
    assert answer.find_candidates(None, [str(mine)], ["podman"], path) == ([str(bed["bin"] / "podman")], [])
    mine.chmod(0o755)
    found, notes = answer.find_candidates(None, [str(mine)], ["podman"], path)
    assert found == [str(mine)] and notes == [f"{mine} (installed with this Python) is used, not "
                                              f"{bed['bin'] / 'podman'} on PATH"]
    assert answer.find_candidates(str(tmp_path / "nope"), [], ["podman"], path) == (
        [], [f"configured path {tmp_path / 'nope'} is not an executable file"])


def test_a_runtime_that_cannot_name_its_assessments_inputs_is_never_kept(bed: Dict[str, Any]) -> None:
    host = probe_host(bed["env"])
    charlie = RuntimeInfo(name="charliecloud", found=True, usable=True, path=str(bed["bin"] / "ch-run"))
    assert detection_inputs([charlie], env=bed["env"], runtime_paths={}, host=host,
                            cache_file=str(bed["cache"])) is not None
    shifter = RuntimeInfo(name="shifter", found=True, usable=True, path=str(bed["bin"] / "ch-run"))
    assert detection_inputs([charlie, shifter], env=bed["env"], runtime_paths={}, host=host,
                            cache_file=str(bed["cache"])) is None
