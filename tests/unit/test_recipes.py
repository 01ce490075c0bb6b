"""Recipes are data: a light lint so that every one stays buildable and versioned."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DOCKERFILES = sorted(RECIPES.rglob("Dockerfile"))
DEFS = sorted(RECIPES.rglob("*.def"))


def test_there_are_recipes() -> None:
    assert DOCKERFILES and DEFS


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_dockerfile(path: Path) -> None:
    text = path.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms, "a Dockerfile needs FROM"
    for image in froms:
        assert ":" in image.split("/")[-1] and not image.endswith(":latest"), f"pin the base image: {image}"
    assert "org.opencontainers.image.version" in text
    assert not re.search(r"^ENTRYPOINT", text, re.M), "HPC runtimes run commands directly: no ENTRYPOINT"


@pytest.mark.parametrize("path", DEFS, ids=lambda p: str(p.relative_to(RECIPES)))
def test_apptainer_def(path: Path) -> None:
    text = path.read_text()
    assert re.search(r"^Bootstrap:\s*\S+", text, re.M)
    frm = re.search(r"^From:\s*(\S+)", text, re.M)
    assert frm and ":" in frm.group(1) and not frm.group(1).endswith(":latest")
    assert "%post" in text
