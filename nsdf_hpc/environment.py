"""The container environment contract, identical on every runtime (pure).

The container starts clean; it gets the host variables that match the allowlist and none
that match the denylist, then the explicit ``--env`` values (which win over both). The image's
own ENV (PATH, LANG, ...) is applied by the runtime underneath.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Dict, Mapping, Sequence


def matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def container_env(host_env: Mapping[str, str], explicit: Mapping[str, str],
                  allow: Sequence[str], deny: Sequence[str]) -> Dict[str, str]:
    """The variables the container sees (before the image's ENV)."""
    env = {k: v for k, v in host_env.items()
           if matches(k, allow) and not matches(k, deny) and "\0" not in v}
    env.update(explicit)
    return env
