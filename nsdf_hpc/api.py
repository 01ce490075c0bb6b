"""One-line shortcuts over a default :class:`~nsdf_hpc.client.Client`."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from .client import Client
from .models import NativeImage, RunResult, RuntimeInfo


def detect(refresh: bool = False) -> List[RuntimeInfo]:
    """Every known runtime with version, capabilities and why it is (un)usable."""
    return Client().detect(refresh=refresh)


def pull(image: str, runtime: Optional[str] = None) -> NativeImage:
    """Prepare ``image`` for ``runtime`` (default: the chosen one); cached by digest."""
    return Client().pull(image, runtime)


def run(image: str, command: Sequence[str], runtime: Optional[str] = None, **options: Any) -> RunResult:
    """Run ``command`` in ``image``; see :meth:`Client.run` for the options."""
    return Client().run(image, command, runtime=runtime, **options)
