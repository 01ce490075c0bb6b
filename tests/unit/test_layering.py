"""Architecture rules, checked on the source: one subprocess site, no shell strings, and only
the CLI prints or exits."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

PKG = Path(__file__).resolve().parents[2] / "nsdf_hpc"
MODULES = sorted(PKG.rglob("*.py"))
#: programs of their own that ship in the package and that a runtime puts in front of its tool
#: (run through _exec.py or the launch exec, never imported): they exit, write to stderr and
#: start the one tool they stand in front of
SCRIPTS = {PKG / "runtimes" / "_udocker_relay.py", PKG / "_pyworker.py"}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    return path.relative_to(PKG.parent).as_posix()


def _calls(tree: ast.AST) -> Iterator[ast.Call]:
    return (n for n in ast.walk(tree) if isinstance(n, ast.Call))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_the_package_is_scanned():
    assert PKG.joinpath("_exec.py") in MODULES and len(MODULES) > 15


def test_only_exec_imports_subprocess():
    offenders: List[Tuple[str, int]] = []
    for path in MODULES:
        if path.name == "_exec.py" and path.parent == PKG:
            continue
        for node in ast.walk(_tree(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and _dotted(node.func) in ("__import__", "importlib.import_module"):
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if any(n == "subprocess" or n.startswith("subprocess.") for n in names):
                offenders.append((_rel(path), node.lineno))
            if any(n in ("os.system", "os.popen", "pty") for n in names):
                offenders.append((_rel(path), node.lineno))
    assert offenders == [], "only nsdf_hpc/_exec.py may start processes"


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_no_shell_strings(path):
    for call in _calls(_tree(path)):
        for kw in call.keywords:
            assert not (kw.arg == "shell" and isinstance(kw.value, ast.Constant) and kw.value.value is True), \
                f"{_rel(path)}:{call.lineno} uses shell=True"
        assert _dotted(call.func) not in ("os.system", "os.popen", "os.execvp", "os.spawnlp"), \
            f"{_rel(path)}:{call.lineno} starts a process outside _exec.py"


def _is_cli(path: Path) -> bool:
    """The command-line layer: the nsdf_hpc/cli/ package (the group and its command modules)."""
    return path.parent == PKG / "cli"


@pytest.mark.parametrize("path", [p for p in MODULES if not _is_cli(p) and p not in SCRIPTS], ids=_rel)
def test_library_never_prints_or_exits(path):
    for call in _calls(_tree(path)):
        name = _dotted(call.func)
        assert name != "print", f"{_rel(path)}:{call.lineno} prints (only nsdf_hpc/cli/ talks to the user)"
        assert name not in ("sys.exit", "exit", "quit", "os._exit"), \
            f"{_rel(path)}:{call.lineno} exits (raise an NsdfError instead)"


def test_only_the_launch_fast_path_replaces_the_process():
    """_exec.py starts every child process; _launch.py alone may exec (replace nsdf-run with
    the runtime it already planned)."""
    offenders = []
    for path in MODULES:
        for call in _calls(_tree(path)):
            name = _dotted(call.func)
            if (name.startswith("os.exec") or name.startswith("os.spawn") or name == "os.fork"
                    or name.startswith("os.posix_spawn")):
                if path.name != "_launch.py" and path not in SCRIPTS:
                    offenders.append((_rel(path), call.lineno))
    assert offenders == []


@pytest.mark.parametrize("path", sorted(SCRIPTS), ids=_rel)
def test_helper_scripts_stand_alone(path):
    """A helper script runs as `python -I -S script.py`: the standard library only, and
    nothing in the package imports it."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("nsdf_hpc"), \
                f"{_rel(path)}:{node.lineno} imports from the package"
    for other in MODULES:
        for node in ast.walk(_tree(other)):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if isinstance(node, ast.ImportFrom):
                names.append(node.module or "")
            assert not any(path.stem in n for n in names), f"{_rel(other)}:{node.lineno} imports {path.stem}"
