"""Bind.parse, parse_env and RunSpec: hostile values pass through untouched, malformed ones
get a clear SpecError."""
from __future__ import annotations

import os

import pytest

from nsdf_hpc.errors import SpecError
from nsdf_hpc.models import Bind, RunSpec, parse_env

HOSTILE = [
    "with space", "quote'd", 'dq"x', "$(id)", "`uname`", "semi;colon", "a=b", "com,ma",
    "new\nline", "tab\there", "ünïcødé-日本", "back\\slash", "*glob?[x]", "$HOME", "-leading-dash",
]


@pytest.mark.parametrize("word", HOSTILE)
def test_bind_keeps_hostile_paths_byte_for_byte(word):
    b = Bind.parse(f"/data/{word}:/mnt/{word}")
    assert (b.source, b.target, b.read_only) == (f"/data/{word}", f"/mnt/{word}", False)


@pytest.mark.parametrize("word", [w for w in HOSTILE if "=" not in w])
def test_env_keeps_hostile_values_byte_for_byte(word):
    assert parse_env(f"NAME={word}") == ("NAME", word)


def test_env_value_may_contain_equals_and_be_empty():
    assert parse_env("A=b=c==") == ("A", "b=c==")
    assert parse_env("A=") == ("A", "")
    assert parse_env("_x9=1") == ("_x9", "1")


@pytest.mark.parametrize("text,expected", [
    ("/a:/b", ("/a", "/b", False)),
    ("/a:/b:ro", ("/a", "/b", True)),
    ("/a:/b:rw", ("/a", "/b", False)),
    ("/a", ("/a", "/a", False)),
    ("/a/../b:/c/./d", ("/b", "/c/d", False)),
    ("/:/host", ("/", "/host", False)),
])
def test_bind_forms(text, expected):
    b = Bind.parse(text)
    assert (b.source, b.target, b.read_only) == expected
    assert Bind.parse(str(b)) == b


def test_bind_relative_source_is_made_absolute():
    b = Bind.parse("rel/dir:/x")
    assert b.source == os.path.join(os.getcwd(), "rel/dir")
    assert Bind.parse("~/x:/y").source == os.path.expanduser("~/x")


@pytest.mark.parametrize("text,message", [
    ("", "empty --bind"),
    (":/x", "empty source"),
    ("/a:rel", "must be absolute"),
    ("/a:/b:rx", "must be 'ro' or 'rw'"),
    ("/a:/b:ro:x", "expected SRC[:DST[:ro|rw]]"),
    ("/a:b:c:d", "expected SRC[:DST[:ro|rw]]"),
    ("/a\0b:/c", "NUL"),
])
def test_bind_malformed(text, message):
    with pytest.raises(SpecError) as exc:
        Bind.parse(text)
    assert message in str(exc.value)
    if text:
        assert repr(text) in str(exc.value)


@pytest.mark.parametrize("text,message", [
    ("NOEQUALS", "expected NAME=VALUE"),
    ("=value", "invalid environment variable name ''"),
    ("1ABC=x", "not starting with a digit"),
    ("A B=x", "invalid environment variable name 'A B'"),
    ("A-B=x", "invalid environment variable name"),
    ("É=x", "invalid environment variable name"),
    ("A;B=x", "invalid environment variable name"),
    ("A=\0", "NUL"),
])
def test_env_malformed(text, message):
    with pytest.raises(SpecError, match=None) as exc:
        parse_env(text)
    assert message in str(exc.value)


def test_runspec_validation():
    spec = RunSpec(image="ubuntu", command=("echo", "$(id)", ""), env={"A": "x\ny"})
    assert spec.command == ("echo", "$(id)", "")
    assert spec.bind_cwd and spec.network and not spec.gpu
    with pytest.raises(ValueError, match="command is empty"):
        RunSpec(image="ubuntu", command=())
    with pytest.raises(ValueError, match="NUL"):
        RunSpec(image="ubuntu", command=("a\0b",))
    with pytest.raises(ValueError, match="absolute"):
        RunSpec(image="ubuntu", command=("true",), workdir="rel")
    with pytest.raises(ValueError, match="invalid environment variable name"):
        RunSpec(image="ubuntu", command=("true",), env={"1X": "y"})
    with pytest.raises(ValueError):
        RunSpec(image="ubuntu", command=("true",), unknown_field=1)   # extra="forbid"
    with pytest.raises(ValueError):
        spec.image = "other"                                         # frozen
