"""Test doubles for the pure-logic tests: a fake runner, host facts and an HTTP response."""
from __future__ import annotations

import os
from email.message import Message
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from nsdf_hpc._exec import CompletedCommand
from nsdf_hpc.errors import CommandTimeoutError
from nsdf_hpc.host import HostFacts

Answer = Union[CompletedCommand, Exception]


class FakeRunner:
    """Answers probes by executable basename; records every call (``run_many`` batches too)."""

    def __init__(self, answers: Optional[Mapping[str, Tuple[int, str, str]]] = None,
                 hung: Sequence[str] = ()) -> None:
        self.answers = dict(answers or {})
        self.hung = set(hung)
        self.batches: List[List[Tuple[str, ...]]] = []
        self.envs: List[Optional[Mapping[str, str]]] = []
        self.calls: List[Tuple[str, ...]] = []

    def _answer(self, argv: Sequence[str], timeout: float) -> Answer:
        name = os.path.basename(argv[0])
        if name in self.hung:
            return CommandTimeoutError(tuple(argv), timeout)
        rc, out, err = self.answers.get(name, (127, "", f"{name}: not answering\n"))
        return CompletedCommand(tuple(argv), rc, out, err)

    def run_many(self, argvs: Sequence[Sequence[str]], *, timeout: float = 10.0,
                 envs: Optional[Sequence[Optional[Mapping[str, str]]]] = None) -> List[Answer]:
        self.batches.append([tuple(a) for a in argvs])
        self.envs.extend(envs or [None] * len(argvs))
        return [self._answer(a, timeout) for a in argvs]

    def run(self, argv: Sequence[str], **kwargs: object) -> CompletedCommand:
        self.calls.append(tuple(argv))
        res = self._answer(argv, float(kwargs.get("timeout") or 10.0))  # type: ignore[arg-type]
        if isinstance(res, Exception):
            raise res
        return res

    @property
    def probed(self) -> List[str]:
        return [os.path.basename(a[0]) for batch in self.batches for a in batch]


def make_host(**overrides: object) -> HostFacts:
    """An unprivileged user on a host with user namespaces, FUSE and subuids."""
    values: Dict[str, object] = dict(
        uid=1000, user="alice", max_user_namespaces=63000, unprivileged_userns_clone=None,
        apparmor_restricts_userns=False, fuse_access=True, subuid=True, subgid=True,
        squashfuse=True, nvidia=False, amd_gpu=False, in_slurm_allocation=False)
    values.update(overrides)
    return HostFacts(**values)  # type: ignore[arg-type]


class FakeResponse:
    """What ``urllib.request.urlopen`` returns, for the registry client's tests."""

    def __init__(self, status: int = 200, headers: Optional[Mapping[str, str]] = None,
                 body: bytes = b"") -> None:
        self.status = status
        self.headers = Message()
        for k, v in (headers or {}).items():
            self.headers[k] = v
        self._body = body

    def read(self) -> bytes:
        return self._body

    def __enter__(self) -> "FakeResponse":
        return self

    def __exit__(self, *a: object) -> None:
        pass
