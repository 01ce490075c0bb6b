"""Progress on a terminal for pulls and conversions (rich), phases with elapsed time: the CLI's
rendering of the library's progress events.

Runtimes do not report bytes in a machine-readable way (apptainer, ch-image and podman
print human progress, udocker nothing), so the bar shows the phases of the plan and the
elapsed time; ``--json`` gives the same events to scripts.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Optional


class TerminalProgress:
    """Callable progress sink rendering events on stderr with rich."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Optional[int] = None
        self._start = time.monotonic()

    def _ensure(self, total: int) -> None:
        if self._progress is None:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task("preparing", total=total)

    def __call__(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "step":
            total = int(event.get("total") or 1)
            self._ensure(total)
            idx = int(event.get("index") or 1)
            self._progress.update(self._task, total=total, completed=idx - 1,
                                  description=f"{event.get('runtime', '')}: {event.get('step')}")
        elif kind == "wait":
            self._ensure(1)
            self._progress.update(self._task, description=f"waiting for {event.get('owner')} "
                                                          "to finish converting this image")
        elif kind == "done" and self._progress is not None:
            self._progress.update(self._task, completed=self._progress.tasks[0].total)
            self._progress.stop()
            self._progress = None
