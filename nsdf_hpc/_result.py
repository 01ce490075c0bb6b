"""The outcome of a run, without pydantic.

``nsdf_hpc.run()`` in a new process is served by a launch record when one holds (``_launch``),
and importing pydantic and the models would cost more than the rest of that call (issue 11:
a research script's ``import nsdf_hpc; run()`` within 80 ms of the runtime alone). So the
result is a small frozen class of its own; its ``image`` is built on first use from the
record's copy when the run came from one.
"""
from __future__ import annotations

# not `from typing import TYPE_CHECKING`: typing costs more than the rest of this path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Sequence, Tuple

    from .models import NativeImage

_FIELDS = ("returncode", "stdout", "stderr", "argv", "runtime", "image")


class RunResult:
    """The outcome of ``run``: the command's exit code and, when captured, its output.

    Frozen and compared by value, as the models are; ``model_dump()`` gives its fields as a
    dict (``image`` as the image's own dump)."""

    __slots__ = ("returncode", "stdout", "stderr", "argv", "runtime", "_image", "_image_data")

    returncode: int
    stdout: str
    stderr: str
    argv: Tuple[str, ...]
    runtime: str
    _image: Optional[NativeImage]
    _image_data: Optional[Dict[str, Any]]

    def __init__(self, *, returncode: int, stdout: str = "", stderr: str = "", argv: Sequence[str] = (),
                 runtime: str = "", image: Optional[NativeImage] = None,
                 image_data: Optional[Dict[str, Any]] = None) -> None:
        """``image_data``: the image's fields (a launch record's copy), made a ``NativeImage``
        when ``image`` is first read."""
        put = object.__setattr__
        put(self, "returncode", int(returncode))
        put(self, "stdout", str(stdout))
        put(self, "stderr", str(stderr))
        put(self, "argv", tuple(str(a) for a in argv))
        put(self, "runtime", str(runtime))
        put(self, "_image", image)
        put(self, "_image_data", None if image is not None else image_data)

    @property
    def image(self) -> Optional[NativeImage]:
        """The native image the command ran in (None when not known)."""
        if self._image is None and self._image_data is not None:
            from .models import NativeImage   # noqa: PLC0415 (pydantic only when asked)
            object.__setattr__(self, "_image", NativeImage(**self._image_data))
            object.__setattr__(self, "_image_data", None)
        return self._image

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def model_dump(self) -> Dict[str, Any]:
        """The fields as a dict, as the models' ``model_dump()`` gives them."""
        image = self.image
        return {"returncode": self.returncode, "stdout": self.stdout, "stderr": self.stderr,
                "argv": self.argv, "runtime": self.runtime,
                "image": None if image is None else image.model_dump()}

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunResult):
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.returncode, self.stdout, self.stderr, self.argv, self.runtime))

    def __repr__(self) -> str:
        return "RunResult(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS) + ")"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"RunResult is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"RunResult is frozen: cannot delete {name!r}")

    def __reduce__(self) -> Any:   # pickling (an Executor returns results across processes)
        return (_rebuild, (self._values(),))


def _rebuild(values: Tuple[Any, ...]) -> RunResult:
    return RunResult(**dict(zip(_FIELDS, values)))
