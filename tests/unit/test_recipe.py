"""Recipes (pure): Dockerfile parsing, names and versions, FROM through the mirrors, and the
spython conversion with its refusals; the committed apptainer.def files must not drift."""
from __future__ import annotations

from pathlib import Path

import pytest

from nsdf_hpc.build import Mirrors, convert, read_recipe
from nsdf_hpc.config import Settings
from nsdf_hpc.errors import SpecError
from nsdf_hpc.recipe import (check_convertible, def_labels, image_name, labels, parse_dockerfile,
                             rewrite_def_from, rewrite_from, runscript, to_apptainer_def)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
RECIPE_DIRS = sorted(p.parent for p in RECIPES.rglob("Dockerfile"))

HELLO = """\
# syntax=docker/dockerfile:1
FROM docker.io/library/busybox:latest
LABEL org.opencontainers.image.title="nsdf/hello" \\
      org.opencontainers.image.version="v0.1.0"
ENV GREETING="hello world" B=2
COPY hello.sh /opt/hello.sh
RUN chmod 755 /opt/hello.sh \\
    # a comment inside a continuation is dropped
 && echo "$GREETING" > /opt/greeting
WORKDIR /work
ENTRYPOINT ["/opt/hello.sh"]
CMD ["a b", "c"]
"""


def test_parse_joins_continuations_and_keeps_line_numbers() -> None:
    ins = parse_dockerfile(HELLO)
    assert [(i.lineno, i.keyword) for i in ins] == [
        (2, "FROM"), (3, "LABEL"), (5, "ENV"), (6, "COPY"), (7, "RUN"), (10, "WORKDIR"),
        (11, "ENTRYPOINT"), (12, "CMD")]
    assert ins[4].args == 'chmod 755 /opt/hello.sh && echo "$GREETING" > /opt/greeting'
    assert labels(ins) == {"org.opencontainers.image.title": "nsdf/hello",
                           "org.opencontainers.image.version": "v0.1.0"}


@pytest.mark.parametrize("title,version,expected", [
    ("nsdf/python", "v1.0.0", "nsdf/python:v1.0.0"),
    ("python", "v10.20.30", "nsdf/python:v10.20.30"),
    ("nsdf/open-visus", "v0.0.1", "nsdf/open-visus:v0.0.1"),
])
def test_image_name(title: str, version: str, expected: str) -> None:
    assert image_name(title, version) == expected


@pytest.mark.parametrize("title,version", [
    ("nsdf/python", "1.0.0"), ("nsdf/python", "v1.0"), ("nsdf/python", "v1.0.0-rc1"),
    ("nsdf/python", "v01.0.0"), ("nsdf/python", "latest"), ("nsdf/Python", "v1.0.0"),
    ("nsdf/a b", "v1.0.0"), ("", "v1.0.0"),
])
def test_image_name_refuses(title: str, version: str) -> None:
    with pytest.raises(SpecError):
        image_name(title, version)


def test_read_recipe_takes_the_labels_or_a_checked_tag(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(HELLO)
    assert read_recipe(str(tmp_path)).tag == "nsdf/hello:v0.1.0"
    assert read_recipe(str(tmp_path), tag="nsdf/hello:v0.2.0").tag == "nsdf/hello:v0.2.0"
    with pytest.raises(SpecError, match="vX.Y.Z"):
        read_recipe(str(tmp_path), tag="nsdf/hello:0.2")
    (tmp_path / "Dockerfile").write_text("FROM busybox:1.36\nRUN true\n")
    with pytest.raises(SpecError, match="org.opencontainers.image.title and .*version"):
        read_recipe(str(tmp_path))


def test_read_recipe_from_a_definition(tmp_path: Path) -> None:
    d = tmp_path / "x.def"
    d.write_text("Bootstrap: docker\nFrom: busybox:1.36\n%labels\n"
                 "    org.opencontainers.image.title nsdf/x\n    org.opencontainers.image.version v2.0.1\n")
    assert def_labels(d.read_text())["org.opencontainers.image.version"] == "v2.0.1"
    r = read_recipe(str(d))
    assert (r.tag, r.dockerfile, r.definition) == ("nsdf/x:v2.0.1", None, str(d))


def test_rewrite_from_applies_mirrors_and_nsdf_registry() -> None:
    settings = Settings(mirrors={"docker.io": "127.0.0.1:5443"}, nsdf_registry="ghcr.io",
                        insecure_registries=["127.0.0.1:5443"])
    m = Mirrors(settings)
    text = ("FROM --platform=linux/amd64 busybox:1.36 AS base\nRUN echo FROM x\n"
            "FROM base\nFROM nsdf/python:v1.0.0\nARG V=1\nFROM quay.io/a/b:$V\n")
    out = rewrite_from(text, m)
    assert out.splitlines() == [
        "FROM --platform=linux/amd64 127.0.0.1:5443/library/busybox:1.36 AS base",
        "RUN echo FROM x", "FROM base", "FROM ghcr.io/nsdf/python:v1.0.0",
        "ARG V=1", "FROM quay.io/a/b:$V"]
    assert m.insecure and m.mapped[0] == ("busybox:1.36", "127.0.0.1:5443/library/busybox:1.36")
    d = rewrite_def_from("Bootstrap: docker\nFrom: debian:12-slim\n%post\n  echo From: x\n", m)
    assert d.splitlines()[:2] == ["Bootstrap: docker", "From: 127.0.0.1:5443/library/debian:12-slim"]
    assert rewrite_def_from("Bootstrap: localimage\nFrom: /x.sif\n", m).endswith("From: /x.sif\n")


@pytest.mark.parametrize("snippet,line,word", [
    ("FROM a:1 AS build\nRUN make\nFROM b:1\nCOPY --from=build /x /x\n", 3, "multi-stage"),
    ("ARG BASE=debian:12\nFROM $BASE\n", 2, "ARG used in FROM"),
    ("FROM a:1\nUSER nobody\n", 2, "USER"),
    ('FROM a:1\nSHELL ["/bin/bash", "-c"]\n', 2, "SHELL"),
    ("FROM a:1\nONBUILD RUN x\n", 2, "ONBUILD"),
    ("FROM a:1\nHEALTHCHECK CMD true\n", 2, "health"),
    ("FROM a:1\nSTOPSIGNAL SIGINT\n", 2, "stop signal"),
    ("FROM a:1\nVOLUME /data\n", 2, "volumes"),
    ("FROM a:1\nCOPY --chown=1:1 a /a\n", 2, "--chown"),
    ("FROM a:1\nADD https://x.org/f.tgz /opt/\n", 2, "URL or an archive"),
    ("FROM a:1\nADD data.tar.gz /opt/\n", 2, "URL or an archive"),
    ("FROM a:1\nWORKDIR /w\nCOPY a rel/\n", 3, "relative destination"),
    ("FROM a:1\nRUN --mount=type=cache,target=/c make\n", 2, "--mount"),
    ("FROM a:1\nRUN <<EOF\necho hi\nEOF\n", 2, "heredocs"),
    ('FROM a:1\nRUN ["/bin/echo", "x"]\n', 2, "JSON"),
    ("FROM a:1\nWORKDIR work\n", 2, "relative WORKDIR"),
    ("FROM a:1\nENV PATH=/opt/bin:$PATH\n", 2, "refer to other variables"),
    ("RUN true\n", None, "no FROM"),
])
def test_refusals_name_the_line(snippet: str, line: int, word: str) -> None:
    with pytest.raises(SpecError, match=word) as err:
        to_apptainer_def(snippet)
    if line:
        assert str(err.value).startswith(f"line {line}: ")


def test_conversion_fixes_what_spython_gets_wrong() -> None:
    text = to_apptainer_def(HELLO)
    sections = text.split("\n%")
    assert "Bootstrap: docker\nFrom: docker.io/library/busybox:latest" in sections[0]
    assert "files\n    hello.sh /opt/hello.sh" in text
    # ENV is exported for the RUN lines after it, and in %environment for run time
    assert '    export GREETING="hello world"\n    export B=2\n    chmod 755' in text
    assert "%environment\n    export GREETING=\"hello world\"\n    export B=2\n" in text
    assert "%labels\n    org.opencontainers.image.title nsdf/hello\n" in text
    # arguments replace CMD and keep ENTRYPOINT, as `docker run` does; no %startscript
    assert text.endswith("%runscript\n    cd /work\n    if [ \"$#\" -eq 0 ]; then set -- 'a b' c; fi\n"
                         "    exec /opt/hello.sh \"$@\"\n")
    assert "%startscript" not in text and "/bin/bash" not in text


def test_runscript_shell_form_and_no_cmd() -> None:
    assert runscript(parse_dockerfile("FROM a:1\nCMD echo $HOME\n")) == [
        "if [ \"$#\" -eq 0 ]; then set -- /bin/sh -c 'echo $HOME'; fi", 'exec "$@"']
    assert runscript(parse_dockerfile("FROM a:1\n")) == ['exec "$@"']


def test_check_convertible_accepts_the_usual() -> None:
    check_convertible(parse_dockerfile(HELLO + "EXPOSE 80\nARG X=1\nRUN echo $X\n"))


def test_conversion_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    to_apptainer_def("FROM a:1\nCOPY missing-file /x\n")   # spython would warn on stdout
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("recipe", RECIPE_DIRS, ids=lambda p: p.name)
def test_committed_definition_is_generated_from_the_dockerfile(recipe: Path) -> None:
    """Each recipe's apptainer.def is `nsdf-run recipe convert RECIPE` of its Dockerfile;
    regenerate it with `nsdf-run recipe convert recipes/NAME -o recipes/NAME/apptainer.def`."""
    assert (recipe / "apptainer.def").read_text() == convert(str(recipe)), \
        f"{recipe.name}/apptainer.def drifted from its Dockerfile"


def test_cli_recipe_convert(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nsdf_hpc.cli import cli
    (tmp_path / "Dockerfile").write_text(HELLO)
    res = CliRunner().invoke(cli, ["recipe", "convert", str(tmp_path)])
    assert res.exit_code == 0 and res.output == convert(str(tmp_path))
    out = tmp_path / "x.def"
    assert CliRunner().invoke(cli, ["recipe", "convert", str(tmp_path), "-o", str(out)]).exit_code == 0
    assert out.read_text() == res.output
    (tmp_path / "Dockerfile").write_text("FROM a:1\nRUN true\nUSER nobody\n")
    res = CliRunner().invoke(cli, ["recipe", "convert", str(tmp_path / "Dockerfile")])
    assert res.exit_code == 2
    assert "line 3: `USER nobody` cannot be converted to an Apptainer definition" in res.output
