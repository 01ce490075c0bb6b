"""Check the pure runtime vocabulary against recorded command contracts (data files).

* ``argv/<runtime>/<case>.json``: a RunSpec (or an image source) and the argv, environment or
  image plan nsdf_hpc must produce. For Shifter, SingularityCE/legacy Singularity and
  podman-hpc (not installable on the testbed) each case names the documentation or source file
  it was taken from (``source``); for the real runtimes the files are golden data, so any argv
  change shows up as a JSON diff.
* ``cassettes/<tool>/<case>.json``: what a tool prints for its version probe, and the
  ``(flavour, version)`` the parser must read from it (or that it must refuse it).

``pytest --update-contracts`` rewrites the ``expected`` blocks from the current code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from nsdf_hpc import errors
from nsdf_hpc.models import Bind, NativeImage, RunSpec
from nsdf_hpc.reference import parse_reference, parse_source
from nsdf_hpc.runtimes import runtime_class
from nsdf_hpc.runtimes.base import RuntimeContext

HERE = Path(__file__).resolve().parent


def load(path: Path) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def save(path: Path, data: Dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

ARGV_CASES = sorted((HERE / "argv").glob("*/*.json"))
CASSETTES = sorted((HERE / "cassettes").glob("*/*.json"))
REQUIRED = ("id", "runtime", "kind", "input", "expected", "source", "recorded_with")


def _ids(paths: List[Path]) -> List[str]:
    return [f"{p.parent.name}/{p.stem}" for p in paths]


def _spec(data: Dict[str, Any]) -> RunSpec:
    data = dict(data)
    data["binds"] = tuple(Bind(**b) for b in data.get("binds", ()))
    data["command"] = tuple(data["command"])
    data.setdefault("bind_cwd", False)
    return RunSpec(**data)


def build(case: Dict[str, Any]) -> Dict[str, Any]:
    inp = case["input"]
    cls = runtime_class(case["runtime"])
    # the host facts the builders read are passed in: uid, user, and "helper tools are not on
    # PATH" (Charliecloud/Shifter then find them next to the detected binary)
    uid = int(inp.get("uid", 1000))
    ctx = RuntimeContext(uid, uid, inp.get("user", "alice"), which=lambda name: None)
    rt = cls(inp.get("path"), inp.get("flavour"), inp.get("version"), ctx)
    kind = case["kind"]
    try:
        if kind == "run":
            inv = rt.run_invocation(_spec(inp["spec"]), NativeImage(**inp["native"]),
                                    inp.get("container_env", {}), inp.get("host_env", {}))
            out: Dict[str, Any] = {"argv": list(inv.argv), "env": dict(sorted(inv.env.items()))}
            if inv.mkdirs:
                out["mkdirs"] = list(inv.mkdirs)
            return out
        if kind == "image_plan":
            source = parse_source(inp["source"])
            ref = None
            if inp.get("ref"):
                ref = parse_reference(inp["ref"])
                if inp.get("digest"):
                    ref = ref.pinned(inp["digest"])
            plan = rt.image_plan(source, ref, inp.get("key", "0" * 64), inp.get("insecure", False))
            return {"steps": [{"argv": list(s.argv), **({"env": dict(s.env)} if s.env else {}),
                               **({} if s.check else {"check": False})} for s in plan.steps],
                    "artifact": plan.artifact, "location": plan.location,
                    "pre_extract": plan.pre_extract}
    except errors.NsdfError as err:
        return {"error": type(err).__name__, "message": str(err)}
    raise AssertionError(f"unknown contract kind {kind!r}")


def _updated(old: Dict[str, Any], actual: Dict[str, Any]) -> Dict[str, Any]:
    """The new ``expected`` block: the keys the file already checks, with today's values."""
    if "error" in actual:
        match = old.get("match", "")
        if not match or match not in actual["message"] or old.get("error") != actual["error"]:
            match = actual["message"].splitlines()[0][:60]
        return {"error": actual["error"], "match": match}
    keys = [k for k in old if k in actual] if old and "error" not in old else list(actual)
    return {k: actual[k] for k in keys}


def test_contract_files_exist() -> None:
    runtimes = {p.parent.name for p in ARGV_CASES}
    assert {"apptainer", "singularity", "charliecloud", "shifter", "podman", "podman-hpc",
            "udocker"} <= runtimes
    tools = {p.parent.name for p in CASSETTES}
    assert {"apptainer", "singularity", "podman", "podman-hpc", "ch-run", "udocker",
            "shifter"} <= tools


@pytest.mark.parametrize("path", ARGV_CASES, ids=_ids(ARGV_CASES))
def test_argv_contract(path: Path, update_contracts: bool) -> None:
    case = load(path)
    missing = [k for k in REQUIRED if k not in case]
    assert not missing, f"{path.name} lacks {missing}"
    assert case["runtime"] == path.parent.name
    assert {"tool_version", "source", "date"} <= set(case["recorded_with"])
    actual = build(case)
    if update_contracts:
        case["expected"] = _updated(case.get("expected") or {}, actual)
        save(path, case)
        return
    expected = case["expected"]
    if "error" in expected:
        assert actual.get("error") == expected["error"], actual
        assert expected["match"] in actual["message"], actual["message"]
        return
    for key, value in expected.items():
        assert actual.get(key) == value, f"{case['id']}: {key} differs from {case['source']}"
    assert set(actual) <= set(expected) | {"env", "mkdirs"}, actual


@pytest.mark.parametrize("path", CASSETTES, ids=_ids(CASSETTES))
def test_version_cassette(path: Path, update_contracts: bool) -> None:
    cas = load(path)
    assert {"argv", "returncode", "stdout", "stderr", "recorded_with", "parser", "expected",
            "source"} <= set(cas), path.name
    assert {"tool_version", "source", "date"} <= set(cas["recorded_with"])
    cls = runtime_class(cas["parser"])
    rt = cls(cas["argv"][0])
    if cas.get("probe", True):
        # the probe nsdf_hpc sends is the argv this output answers
        probe = rt.version_argv(cas["argv"][0])
        assert [a for a in probe if a != "--allow-root"] == [a for a in cas["argv"] if a != "--allow-root"]
    try:
        flavour, version = rt.parse_version(cas["stdout"], cas["stderr"])
        actual: Dict[str, Any] = {"flavour": flavour, "version": version}
    except errors.UnexpectedOutputError as err:
        actual = {"error": "UnexpectedOutputError", "message": str(err)}
    if update_contracts:
        if "error" in actual:
            cas["expected"] = {"error": actual["error"], "match": cas["expected"].get("match", "")}
        else:
            cas["expected"] = actual
        save(path, cas)
        return
    expected = cas["expected"]
    if "error" in expected:
        assert actual.get("error") == expected["error"], actual
        assert expected.get("match", "") in actual["message"]
    else:
        assert actual == expected, f"{path.name}: from {cas['source']}"


def test_singularity_flavours_never_cross() -> None:
    """A `singularity` that prints 'apptainer version' is Apptainer, never SingularityCE."""
    apptainer_out = load(HERE / "cassettes" / "apptainer" / "singularity-symlink-to-apptainer.json")
    with pytest.raises(errors.UnexpectedOutputError, match="Apptainer"):
        runtime_class("singularity")("singularity").parse_version(apptainer_out["stdout"])
    ce = load(HERE / "cassettes" / "singularity" / "singularity-ce-4.1.1.json")
    with pytest.raises(errors.UnexpectedOutputError, match="SingularityCE"):
        runtime_class("apptainer")("singularity").parse_version(ce["stdout"])
