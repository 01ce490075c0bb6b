"""Image references and sources, parsed by the OCI distribution grammar (pure).

=====================================  ==================================================
input                                  result
=====================================  ==================================================
``ubuntu``                             registry docker.io, ``library/ubuntu:latest``
``docker://ghcr.io/o/i:1.2``           registry ghcr.io, ``o/i:1.2``
``localhost:5000/a/b@sha256:<64 hex>`` pinned by digest (a tag, if any, is kept as a label)
``nsdf/name:v1.0.0``                   NSDF's naming; registry from ``nsdf_registry``
``docker-archive:/p/x.tar``            an offline docker-archive (``docker save``)
``oci-archive:/p/x.tar``               an offline OCI archive
``oci:/p/layout[:ref]``                an OCI image layout directory
``/p/x.sif``, ``x.sqfs``, a directory  an already-native artifact, used as is
=====================================  ==================================================
"""
from __future__ import annotations

import os
import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

from .errors import SpecError

DOCKER_HUB = "docker.io"
_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
# distribution/reference grammar (reference.go)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
# ASCII: the grammar's \w is [A-Za-z0-9_]; Python's would accept "vé" or "٣", which registries refuse
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_DIGEST_RE = re.compile(r"^(?P<alg>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]{32,})$")
_HEX = {"sha256": 64, "sha512": 128}
NATIVE_SUFFIXES = (".sif", ".simg", ".sqfs", ".squashfs", ".squash")

SourceKind = Literal["registry", "docker-archive", "oci-archive", "oci-dir", "native"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class ImageRef(_Frozen):
    """A normalised registry reference: ``registry/repository[:tag][@digest]``."""

    registry: str = DOCKER_HUB
    repository: str
    tag: Optional[str] = "latest"
    digest: Optional[str] = None

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def by_digest(self) -> str:
        """``registry/repository@digest`` (tools refuse a tag and a digest together)."""
        return f"{self.name}@{self.digest}" if self.digest else str(self)

    def pinned(self, digest: str) -> "ImageRef":
        """The same reference, pinned to ``digest``."""
        return self.model_copy(update={"digest": validate_digest(digest)})

    def on(self, registry: str) -> "ImageRef":
        """The same repository on another registry (a mirror)."""
        return self.model_copy(update={"registry": registry})

    def slug(self) -> str:
        """A filesystem-safe name: ``docker.io_library_busybox_latest``."""
        text = f"{self.name}_{self.tag or 'none'}"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


#: source kind -> the transport prefix the runtimes (and containers-image) use for it
TRANSPORTS = {"docker-archive": "docker-archive", "oci-archive": "oci-archive", "oci-dir": "oci",
              "registry": "docker", "native": ""}


class ImageSource(_Frozen):
    """Where an image comes from: a registry reference, an offline file or a native artifact."""

    kind: SourceKind
    ref: Optional[ImageRef] = None   # kind == "registry"
    path: Optional[str] = None       # every other kind: absolute path
    layout_ref: Optional[str] = None  # oci-dir: the ref inside the layout
    text: str                         # what the user wrote

    @property
    def transport(self) -> str:
        """The containers-image transport name of an offline source (``oci`` for a layout)."""
        return TRANSPORTS[self.kind]

    def __str__(self) -> str:
        if self.kind == "registry":
            return str(self.ref)
        prefix = f"{self.transport}:" if self.kind != "native" else ""
        return f"{prefix}{self.path}" + (f":{self.layout_ref}" if self.layout_ref else "")


def validate_digest(digest: str) -> str:
    """Check ``alg:hex``; sha256 must have 64 lowercase hex digits."""
    m = _DIGEST_RE.match(digest or "")
    if not m:
        raise SpecError(f"invalid digest {digest!r}: expected 'sha256:<64 hex digits>'")
    want = _HEX.get(m["alg"])
    if want and (len(m["hex"]) != want or not re.fullmatch(r"[0-9a-f]+", m["hex"])):
        raise SpecError(f"invalid {m['alg']} digest {digest!r}: expected {want} lowercase hex digits")
    return digest


def parse_reference(text: str, *, nsdf_registry: str = DOCKER_HUB) -> ImageRef:
    """Parse a Docker/OCI reference; raises :class:`SpecError` with the reason when malformed."""
    raw = text
    if not isinstance(text, str) or not text.strip():
        raise SpecError("empty image reference")
    if any(c.isspace() for c in text) or any(ord(c) < 32 for c in text):
        raise SpecError(f"invalid image reference {raw!r}: whitespace or control characters")
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    elif "://" in text:
        raise SpecError(f"invalid image reference {raw!r}: unsupported transport "
                        f"{text.split('://')[0]!r} (use docker://, docker-archive:, oci-archive: or oci:)")
    if re.fullmatch(r"(sha256:)?[a-f0-9]{64}", text):
        # Docker and the Go reference grammar refuse a bare image id as a name: it would mean
        # docker.io/library/<hex>:latest, never what was meant
        raise SpecError(f"invalid image reference {raw!r}: a bare image id is not a reference "
                        "(use NAME@sha256:<digest>)")
    text = text.lstrip("/") if text.startswith("//") else text
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        validate_digest(digest)
    registry = DOCKER_HUB
    first, sep, rest = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        if not _DOMAIN_RE.match(first):
            raise SpecError(f"invalid image reference {raw!r}: bad registry {first!r}")
        registry, text = first, rest
        explicit_registry = True
    else:
        explicit_registry = False
    tag: Optional[str] = None
    if ":" in text:
        text, tag = text.rsplit(":", 1)
        if not _TAG_RE.match(tag):
            raise SpecError(f"invalid image reference {raw!r}: bad tag {tag!r}")
    if not text:
        raise SpecError(f"invalid image reference {raw!r}: no repository name")
    if not _PATH_RE.match(text):
        hint = " (repository names are lowercase)" if text.lower() != text else ""
        raise SpecError(f"invalid image reference {raw!r}: bad repository {text!r}{hint}")
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if not explicit_registry and text.startswith("nsdf/"):
        registry = nsdf_registry
    if registry == DOCKER_HUB and "/" not in text:
        text = f"library/{text}"
    if len(f"{registry}/{text}") > 255:
        raise SpecError(f"invalid image reference {raw!r}: name longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry=registry, repository=text, tag=tag, digest=digest)


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def parse_source(text: str, *, nsdf_registry: str = DOCKER_HUB) -> ImageSource:
    """Tell a registry reference from an offline archive, a layout or a native artifact."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError("empty image reference")
    if "\x00" in text:   # no path or reference holds one (and "~\x00" made expanduser raise ValueError)
        raise SpecError(f"an image reference cannot contain a NUL byte: {text!r}")
    for prefix, kind in (("docker-archive:", "docker-archive"), ("oci-archive:", "oci-archive")):
        if text.startswith(prefix):
            path = text[len(prefix):]
            if not path:
                raise SpecError(f"{prefix} needs a path: {text!r}")
            return ImageSource(kind=kind, path=_abs(path), text=text)
    if text.startswith("oci:"):
        body = text[len("oci:"):]
        if not body:
            raise SpecError(f"oci: needs a layout directory: {text!r}")
        layout_ref = None
        if not os.path.isdir(_abs(body)) and ":" in body:
            body, layout_ref = body.rsplit(":", 1)
        return ImageSource(kind="oci-dir", path=_abs(body), layout_ref=layout_ref, text=text)
    # an existing relative directory with a "/" in it ("arch/rootdir") is a directory image;
    # a bare name ("busybox") stays a reference even when such a directory exists here
    looks_like_path = (text.startswith(("/", "./", "../", "~")) or text.endswith(NATIVE_SUFFIXES)
                       or ("/" in text and os.path.isdir(text)))
    if looks_like_path:
        path = _abs(text)
        if os.path.isdir(os.path.join(path, "index.json")) is False and os.path.isfile(
                os.path.join(path, "oci-layout")):
            return ImageSource(kind="oci-dir", path=path, text=text)
        return ImageSource(kind="native", path=path, text=text)
    return ImageSource(kind="registry", ref=parse_reference(text, nsdf_registry=nsdf_registry), text=text)


# ---------------------------------------------------------------- platforms
#: `uname -m` -> (GOARCH, variant), the names OCI image indexes use (image-spec's
#: image-index.md "platform" follows Go's GOOS/GOARCH)
_MACHINES = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None), "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
}
_PLATFORM_PART = re.compile(r"^[a-z0-9_]+$")


class Platform(_Frozen):
    """An OCI platform, ``os/architecture[/variant]`` (``linux/arm64``, ``linux/arm/v7``)."""

    os: str = "linux"
    architecture: str
    variant: Optional[str] = None

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``linux/arm64``, ``linux/arm/v7``, or an architecture alone (``arm64``, ``aarch64``:
        Linux). Raises SpecError naming the expected form."""
        parts = text.strip().lower().split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) not in (2, 3) or not all(_PLATFORM_PART.match(p) for p in parts):
            raise SpecError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. "
                            "linux/amd64 or linux/arm64")
        arch, variant = _MACHINES.get(parts[1], (parts[1], None))
        return cls(os=parts[0], architecture=arch, variant=parts[2] if len(parts) == 3 else variant)

    @classmethod
    def from_machine(cls, machine: str, system: str = "linux") -> "Platform":
        """The platform of a host from ``uname -m`` (``x86_64`` -> linux/amd64)."""
        arch, variant = _MACHINES.get(machine.lower(), (machine.lower(), None))
        return cls(os=system.lower(), architecture=arch, variant=variant)

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    def matches(self, os_name: str, architecture: str, variant: Optional[str] = None) -> bool:
        """Whether an index entry's platform serves this one: same OS and architecture, and the
        same variant when both say one (arm64's "v8" is its only variant: missing = v8)."""
        if (os_name, architecture) != (self.os, self.architecture):
            return False
        mine = self.variant or ("v8" if self.architecture == "arm64" else None)
        theirs = variant or ("v8" if architecture == "arm64" else None)
        return mine is None or theirs is None or mine == theirs

    def slug(self) -> str:
        """Filesystem-safe: ``linux-arm64``."""
        return str(self).replace("/", "-")


def host_platform() -> Platform:
    """This host's platform (``os.uname``)."""
    u = os.uname()
    return Platform.from_machine(u.machine, u.sysname)
