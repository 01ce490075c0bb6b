"""Build recipes (pure): Dockerfile instructions, the name and version a recipe declares, the
site's mirrors applied to ``FROM``, and the Dockerfile -> Apptainer definition conversion.

The conversion is spython's (``DockerParser`` + ``SingularityWriter``); what spython 0.3.x
cannot translate faithfully is refused first, naming the line (:func:`check_convertible`),
and three of its sections are rewritten from our own parse (see :func:`to_apptainer_def`).

=========================================  ==========================================
recipe declares (OCI labels)               the build tags
=========================================  ==========================================
``title="nsdf/python" version="v1.0.0"``   ``nsdf/python:v1.0.0``
``title="python" version="v1.0.0"``        ``nsdf/python:v1.0.0``
``version="1.0"``                          refused: the version must be ``vX.Y.Z``
=========================================  ==========================================
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import SpecError

TITLE_LABEL = "org.opencontainers.image.title"
VERSION_LABEL = "org.opencontainers.image.version"
VERSION_RE = re.compile(r"^v(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
_NAME_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
#: file names a recipe directory may hold, in the order they are looked for
DOCKERFILE_NAMES = ("Dockerfile", "Containerfile")
DEF_NAMES = ("apptainer.def", "Singularity.def", "Singularity")


@dataclass(frozen=True)
class Instruction:
    """One logical Dockerfile instruction (continuations joined), with its first line number."""

    lineno: int
    keyword: str          # upper case: FROM, RUN, ...
    args: str             # the rest, continuations joined with a space

    def flags(self) -> Dict[str, str]:
        """``--name=value`` options at the start of ``args`` (``COPY --from=x``)."""
        out: Dict[str, str] = {}
        for word in self.args.split():
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            out[name] = value
        return out


def parse_dockerfile(text: str) -> List[Instruction]:
    """The instructions of a Dockerfile; comment lines inside continuations are dropped, as
    Docker does. Parser directives (``# syntax=``) are comments here."""
    out: List[Instruction] = []
    buf: List[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(p for p in buf if p)
        buf = []
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    if buf:
        joined = " ".join(p for p in buf if p)
        keyword, _, args = joined.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


def _pairs(args: str, lineno: int) -> List[Tuple[str, str]]:
    """``k=v k2="v 2"`` (or the legacy ``k v``) as pairs, with shell-like quoting."""
    try:
        words = shlex.split(args)
    except ValueError as err:
        raise SpecError(f"line {lineno}: cannot read {args!r}: {err}") from None
    if words and "=" not in words[0]:
        return [(words[0], " ".join(words[1:]))]
    pairs = []
    for w in words:
        key, sep, value = w.partition("=")
        if not sep:
            raise SpecError(f"line {lineno}: expected KEY=VALUE, got {w!r}")
        pairs.append((key, value))
    return pairs


def labels(instructions: Sequence[Instruction]) -> Dict[str, str]:
    """Every LABEL of the (last) stage."""
    out: Dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            out = {}
        elif ins.keyword == "LABEL":
            out.update(_pairs(ins.args, ins.lineno))
    return out


def froms(instructions: Sequence[Instruction]) -> List[Instruction]:
    return [i for i in instructions if i.keyword == "FROM"]


def from_image(ins: Instruction) -> str:
    """The image of a FROM line (without ``--platform`` and ``AS name``)."""
    words = [w for w in ins.args.split() if not w.startswith("--")]
    if not words:
        raise SpecError(f"line {ins.lineno}: FROM without an image")
    return words[0]


def check_version(version: str) -> str:
    if not VERSION_RE.match(version or ""):
        raise SpecError(f"version {version!r} is not vX.Y.Z (e.g. v1.0.0): NSDF images are "
                        "tagged nsdf/NAME:vX.Y.Z")
    return version


def image_name(title: str, version: str) -> str:
    """``nsdf/NAME:vX.Y.Z`` from the recipe's title and version labels."""
    name = title[len("nsdf/"):] if title.startswith("nsdf/") else title
    if not _NAME_RE.match(name or ""):
        raise SpecError(f"image title {title!r} is not a valid name: use lowercase letters, "
                        "digits and . _ - (e.g. nsdf/python)")
    return f"nsdf/{name}:{check_version(version)}"


def tag_from_labels(found: Dict[str, str], *, where: str) -> str:
    """The tag a recipe declares, or a SpecError naming the missing label."""
    missing = [k for k in (TITLE_LABEL, VERSION_LABEL) if not found.get(k)]
    if missing:
        raise SpecError(f"{where} does not declare {' and '.join(missing)}: add "
                        f'LABEL {TITLE_LABEL}="nsdf/NAME" {VERSION_LABEL}="vX.Y.Z", or pass --tag')
    return image_name(found[TITLE_LABEL], found[VERSION_LABEL])


def def_labels(text: str) -> Dict[str, str]:
    """The ``%labels`` of an Apptainer definition (``KEY VALUE`` lines)."""
    out: Dict[str, str] = {}
    for name, body in def_sections(text):
        if name == "labels":
            for line in body:
                key, _, value = line.strip().partition(" ")
                if key:
                    out[key] = value.strip()
    return out


def def_sections(text: str) -> List[Tuple[str, List[str]]]:
    """``[("header", lines), ("post", lines), ...]`` of a definition file."""
    sections: List[Tuple[str, List[str]]] = [("header", [])]
    for line in text.splitlines():
        m = re.match(r"^%([A-Za-z]+)\b(.*)$", line)
        if m:
            sections.append((m.group(1).lower(), []))
        else:
            sections[-1][1].append(line)
    return sections


# ---------------------------------------------------------------- FROM through the mirrors
def rewrite_from(text: str, mapper: Callable[[str], str]) -> str:
    """``text`` with the image of every FROM line replaced by ``mapper(image)`` (other lines
    byte for byte). Stage names (``FROM x AS a`` ... ``FROM a``) and images with ``$`` are
    left alone."""
    stages: List[str] = []
    out: List[str] = []
    for line in text.splitlines(keepends=True):
        m = re.match(r"^(\s*FROM\s+(?:--\S+\s+)*)(\S+)(.*)$", line, re.I | re.S)
        if m:
            image = m.group(2)
            alias = re.search(r"\sAS\s+(\S+)", m.group(3), re.I)
            if "$" not in image and image.lower() not in stages and image != "scratch":
                line = m.group(1) + mapper(image) + m.group(3)
            if alias:
                stages.append(alias.group(1).lower())
        out.append(line)
    return "".join(out)


def rewrite_def_from(text: str, mapper: Callable[[str], str]) -> str:
    """A definition with ``Bootstrap: docker`` gets its ``From:`` mapped (other bootstraps
    are returned unchanged)."""
    boot = re.search(r"^\s*Bootstrap:\s*(\S+)", text, re.M | re.I)
    if not boot or boot.group(1).lower() != "docker":
        return text
    return re.sub(r"^(\s*From:\s*)(\S+)", lambda m: m.group(1) + mapper(m.group(2)), text,
                  count=1, flags=re.M | re.I)


# ---------------------------------------------------------------- Dockerfile -> Apptainer
#: instructions spython 0.3 cannot translate, and why (the refusal names the line)
_REFUSED: Dict[str, str] = {
    "USER": "Apptainer runs as the calling user and has no USER",
    "SHELL": "spython ignores SHELL: RUN would use /bin/sh instead",
    "ONBUILD": "Apptainer has no ONBUILD triggers",
    "HEALTHCHECK": "Apptainer has no health checks",
    "STOPSIGNAL": "Apptainer has no stop signal setting",
    "VOLUME": "Apptainer has no volumes (bind a host directory at run time instead)",
}
_ARCHIVE = re.compile(r"\.(tar|tgz|tbz2?|txz|tar\.(gz|bz2|xz|zst))$")


def check_convertible(instructions: Sequence[Instruction]) -> None:
    """Refuse what spython cannot convert faithfully, naming the first offending line."""
    def refuse(ins: Instruction, why: str) -> SpecError:
        return SpecError(f"line {ins.lineno}: `{ins.keyword} {ins.args}` cannot be converted to "
                         f"an Apptainer definition: {why}")
    seen_from = 0
    for ins in instructions:
        flags = ins.flags()
        if ins.keyword == "FROM":
            seen_from += 1
            if seen_from > 1:
                raise refuse(ins, "multi-stage builds are not supported (spython flattens the "
                                  "stages into one image)")
            if "$" in from_image(ins):
                raise refuse(ins, "an ARG used in FROM is not expanded by the conversion")
            if "platform" in flags:
                raise refuse(ins, "FROM --platform is not supported")
        elif ins.keyword in _REFUSED:
            raise refuse(ins, _REFUSED[ins.keyword])
        elif ins.keyword in ("COPY", "ADD"):
            if "from" in flags:
                raise refuse(ins, "COPY --from needs a multi-stage build")
            bad = [f for f in flags if f in ("chown", "chmod", "link", "parents", "exclude")]
            if bad:
                raise refuse(ins, f"--{bad[0]} has no %files equivalent")
            words = [w for w in ins.args.split() if not w.startswith("--")]
            if ins.args.lstrip().startswith("["):
                raise refuse(ins, "the JSON form of COPY/ADD is not supported by spython")
            if ins.keyword == "ADD" and any("://" in w or _ARCHIVE.search(w) for w in words[:-1]):
                raise refuse(ins, "ADD of a URL or an archive (which Docker unpacks) is not supported")
            if len(words) > 1 and not words[-1].startswith("/"):
                raise refuse(ins, "a relative destination depends on WORKDIR, which %files ignores")
        elif ins.keyword == "RUN":
            if flags:
                raise refuse(ins, f"RUN --{next(iter(flags))} has no Apptainer equivalent")
            if "<<" in ins.args and re.search(r"<<-?\s*['\"]?[A-Za-z_]+", ins.args):
                raise refuse(ins, "heredocs in RUN are not supported by spython")
            if ins.args.lstrip().startswith("["):
                raise refuse(ins, "the JSON (exec) form of RUN is not supported by spython")
        elif ins.keyword == "WORKDIR" and not ins.args.startswith("/"):
            raise refuse(ins, "a relative WORKDIR is not supported")
        elif ins.keyword == "ENV" and "$" in ins.args:
            raise refuse(ins, "ENV values that refer to other variables are not expanded the "
                              "same way in %environment")
        elif ins.keyword not in ("LABEL", "ENV", "ARG", "CMD", "ENTRYPOINT", "EXPOSE",
                                 "MAINTAINER", "WORKDIR"):
            raise refuse(ins, "unknown instruction")
    if not seen_from:
        raise SpecError("the Dockerfile has no FROM")


def _exec_words(args: str, ins: Instruction) -> List[str]:
    """CMD/ENTRYPOINT as argv: the JSON (exec) form as is, the shell form via /bin/sh -c."""
    text = args.strip()
    if text.startswith("["):
        try:
            words = json.loads(text)
        except ValueError:
            raise SpecError(f"line {ins.lineno}: {ins.keyword} is not valid JSON: {text}") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise SpecError(f"line {ins.lineno}: {ins.keyword} must be a JSON list of strings")
        return list(words)
    return ["/bin/sh", "-c", text]


def runscript(instructions: Sequence[Instruction]) -> List[str]:
    """Docker's start semantics as a runscript: arguments replace CMD, ENTRYPOINT stays."""
    entry: List[str] = []
    cmd: List[str] = []
    workdir = None
    for ins in instructions:
        if ins.keyword == "ENTRYPOINT":
            entry = _exec_words(ins.args, ins)
            cmd = []   # Docker: an ENTRYPOINT resets an inherited CMD
        elif ins.keyword == "CMD":
            cmd = _exec_words(ins.args, ins)
        elif ins.keyword == "WORKDIR":
            workdir = ins.args.strip()
    lines = [f"cd {shlex.quote(workdir)}"] if workdir else []
    if cmd:
        lines.append(f'if [ "$#" -eq 0 ]; then set -- {shlex.join(cmd)}; fi')
    lines.append(f'exec {shlex.join(entry) + " " if entry else ""}"$@"')
    return lines


@contextlib.contextmanager
def _quiet_spython() -> Iterator[None]:
    """spython's logger prints (and exits on errors): silence it while we call it."""
    from spython.logger import bot   # noqa: PLC0415 (spython is needed only to convert)
    level = bot.level
    bot.level = -10   # below ABORT (-5): nothing is emitted
    try:
        yield
    finally:
        bot.level = level


def spython_convert(text: str) -> str:
    """spython's own translation of ``text`` (a Dockerfile), with no file access."""
    from spython.main.parse.parsers import DockerParser   # noqa: PLC0415
    from spython.main.parse.writers import SingularityWriter   # noqa: PLC0415
    with _quiet_spython():
        try:
            parser = DockerParser(None, load=False)
            parser.lines = text.splitlines(keepends=True)
            parser.parse()
            return str(SingularityWriter(parser.recipe).convert(runscript="/bin/sh"))
        except SystemExit as err:   # spython's bot.exit on an error
            raise SpecError(f"spython could not convert the Dockerfile (status {err.code})") from None


def to_apptainer_def(text: str, *, source: str = "Dockerfile") -> str:
    """An Apptainer definition equivalent to the Dockerfile ``text``.

    spython 0.3.14 translates FROM, RUN, ENV, COPY/ADD and WORKDIR; three of its sections are
    replaced from our own parse, because it gets them wrong:

    * ``%labels``: it writes ``key="value"``, which Apptainer reads as a key with no value;
    * ``%runscript``: it prepends its default program to CMD (``exec /bin/bash python3``) and
      appends arguments to CMD where Docker replaces it; ``%startscript`` is dropped (Docker
      has none);
    * ``%post``: ENV assignments are written unexported, so RUN commands after them would not
      see them; they are exported, as Docker does.
    """
    instructions = parse_dockerfile(text)
    check_convertible(instructions)
    converted = spython_convert(text)
    env_lines = set()
    for ins in instructions:
        if ins.keyword == "ENV":
            for k, v in _pairs(ins.args, ins.lineno):
                env_lines |= {f"{k}={v}", f'{k}="{v}"', f"{k}='{v}'"}
    out: List[str] = [f"# generated by nsdf-run recipe convert from {source}: do not edit"]
    for name, body in def_sections(converted):
        if name in ("labels", "runscript", "startscript"):
            continue
        if name == "header":
            out += [ln for ln in body if ln.strip()]
            out.append("")
            continue
        out.append(f"%{name}")
        for line in body:
            if not line.strip():
                continue
            if name == "post" and line.strip() in env_lines:
                line = f"export {line.strip()}"
            out.append(f"    {line.strip()}")
        out.append("")
    found = labels(instructions)
    if found:
        out.append("%labels")
        out += [f"    {k} {v}" for k, v in found.items()]
        out.append("")
    out.append("%runscript")
    out += [f"    {ln}" for ln in runscript(instructions)]
    return "\n".join(out) + "\n"


def find_recipe(path: str) -> Tuple[Optional[str], Optional[str]]:
    """``(dockerfile, definition)`` for a recipe directory or one file (either may be None)."""
    if os.path.isdir(path):
        dockerfile = next((os.path.join(path, n) for n in DOCKERFILE_NAMES
                           if os.path.isfile(os.path.join(path, n))), None)
        definition = next((os.path.join(path, n) for n in DEF_NAMES
                           if os.path.isfile(os.path.join(path, n))), None)
        if not dockerfile and not definition:
            raise SpecError(f"{path} holds no recipe (looked for "
                            f"{', '.join(DOCKERFILE_NAMES + DEF_NAMES)})")
        return dockerfile, definition
    if not os.path.isfile(path):
        raise SpecError(f"{path}: no such recipe file or directory")
    if path.endswith(".def") or os.path.basename(path).startswith("Singularity"):
        return None, path
    return path, None
