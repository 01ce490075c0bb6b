"""A minimal OCI distribution client: resolve a tag to its manifest digest (and size).

Only what digest pinning needs: ``HEAD``/``GET /v2/<name>/manifests/<ref>`` with the usual
bearer-token dance (docker.io, ghcr.io, quay.io, Harbor) or basic auth. Credentials come from
``NSDF_HPC_REGISTRY_USER``/``NSDF_HPC_REGISTRY_PASSWORD`` or ``~/.docker/config.json``
(``auths``); they are never logged, written to scripts, or put in error messages.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from ._retry import TRANSIENT_STATUSES, RetryPolicy, parse_retry_after
from .errors import RegistryError
from .reference import DOCKER_HUB, ImageRef, Platform, host_platform

logger = logging.getLogger(__name__)

MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])
_INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
                "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class ManifestInfo:
    """What a reference stands for at the registry.

    ``digest`` is the reference's own manifest: an image index (multi-arch) or one image.
    For an index, ``platforms`` lists what it offers and ``image_digest`` is the entry chosen
    for the platform asked for (None: it offers none for it); for one image, ``image_digest``
    is ``digest``. ``platform`` is the chosen image's, when known (an index entry says it; a
    plain manifest's is read from its config, with ``with_size`` only).
    """

    digest: str
    media_type: str = ""
    size: Optional[int] = None          # compressed bytes of config + layers, when read
    requests: int = 0
    image_digest: Optional[str] = None
    platform: Optional[str] = None
    platforms: Tuple[str, ...] = ()

    @property
    def is_index(self) -> bool:
        return bool(self.platforms) or self.media_type in _INDEX_TYPES


_SSL_CONTEXTS: Dict[str, Any] = {}
#: hosts (the registry's, its token service's) the CA directory could not verify
_NEEDS_BUNDLE: Set[str] = set()


def _ssl_context(whole_bundle: bool = False) -> Any:
    """One TLS context per process (``ssl.SSLContext``).

    The first looks CA certificates up in OpenSSL's hashed certificate directory as a
    handshake needs them (``capath``: one certificate read instead of parsing the whole
    bundle's ~150, which took 28 ms and 0.8 MB of a cold run's peak memory).
    ``whole_bundle`` is the default context (the bundle file and the directory): what a
    registry the directory cannot verify gets (``RegistryClient._open``; a directory without
    hashed links, as on some distributions; a CA only in the bundle ``SSL_CERT_FILE`` names),
    and the only one when there is no directory. Both trust what the default context trusts
    (it reads the directory too), so the order changes the cost, not the trust: with
    ``SSL_CERT_FILE`` set (conda and pyenv set it to certifi's bundle), a registry the system
    trusts costs no bundle; one whose CA is only in the named bundle costs one failed
    handshake per process."""
    import ssl   # noqa: PLC0415
    paths = ssl.get_default_verify_paths()
    lazy = not whole_bundle and bool(paths.capath) and os.path.isdir(paths.capath or "")
    key = "directory" if lazy else "bundle"
    if key not in _SSL_CONTEXTS:
        _SSL_CONTEXTS[key] = ssl.create_default_context(capath=paths.capath) if lazy \
            else ssl.create_default_context()
    return _SSL_CONTEXTS[key]


def _untrusted_certificate(err: BaseException) -> Any:
    """The ``ssl.SSLCertVerificationError`` that ``err`` is or wraps (urllib's URLError), or
    None; only called for an https request, which imported ssl."""
    import ssl   # noqa: PLC0415
    reason = _cause(err)
    return reason if isinstance(reason, ssl.SSLCertVerificationError) else None


def _cause(err: BaseException) -> BaseException:
    """The failure itself: urllib's URLError carries it as ``reason`` (an ``ssl.SSLError``'s
    ``reason`` is OpenSSL's short text, not a cause)."""
    reason = getattr(err, "reason", None)
    return reason if isinstance(reason, BaseException) else err


def _untrusted_text(registry: str, reason: Any) -> str:
    if getattr(reason, "verify_code", None) in (62, 64):   # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_
        return (f"registry {registry} (https): its certificate is for another name ({reason}); "
                "use the name the certificate was made for")
    return (f"registry {registry} (https): its certificate is not trusted here ({reason}); for a "
            "site registry with its own CA, add the CA to the system's trust store "
            "(update-ca-certificates) or point SSL_CERT_FILE at a bundle that has it")


@dataclass(frozen=True)
class _Req:
    """One request as :meth:`RegistryClient._open` sends it (``urllib.request.Request`` is
    built only when urllib sends it)."""

    method: str
    full_url: str
    headers: Mapping[str, str] = field(default_factory=dict)

    def get_method(self) -> str:
        return self.method


#: a redirect (a blob on a CDN, a moved registry): the request goes again through urllib,
#: which follows it
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _proxied() -> bool:
    """Whether urllib would look for a proxy: any ``<scheme>_proxy`` variable with a value
    (``no_proxy`` alone changes nothing). Read from this process's environment, as urllib
    does."""
    return any(v and k[-6:].lower() == "_proxy" and k.lower() != "no_proxy"
               for k, v in os.environ.items())


def _ascii_host(host: str) -> Any:
    """An ASCII host name as bytes: ``getaddrinfo`` and the TLS handshake then skip the
    ``idna`` codec (with ``stringprep``'s tables: 0.3 MB of a cold run's peak); any other
    name as it is, for the codec to encode."""
    return host.encode("ascii") if host.isascii() else host


class _Connection(http.client.HTTPConnection):
    """http.client's connection to a registry, over TLS when given a context."""

    def __init__(self, host: str, port: int, timeout: float, tls: Any) -> None:
        super().__init__(host, port, timeout=timeout)
        self.tls = tls
        if tls is not None:
            self.default_port = 443   # the Host header without ":443", as https clients send it

    def connect(self) -> None:
        self.sock = socket.create_connection((_ascii_host(self.host), self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            self.sock = self.tls.wrap_socket(self.sock, server_hostname=_ascii_host(self.host))


def api_host(registry: str) -> str:
    return "registry-1.docker.io" if registry == DOCKER_HUB else registry


def _credentials(registry: str, env: Mapping[str, str]) -> Optional[Tuple[str, str]]:
    if env.get("NSDF_HPC_REGISTRY_USER") and env.get("NSDF_HPC_REGISTRY_PASSWORD") is not None:
        return env["NSDF_HPC_REGISTRY_USER"], env["NSDF_HPC_REGISTRY_PASSWORD"]
    home = env.get("HOME") or os.path.expanduser("~")
    path = env.get("DOCKER_CONFIG", os.path.join(home, ".docker")) + "/config.json"
    try:
        with open(path) as fh:
            auths = json.load(fh).get("auths", {})
    except (OSError, ValueError):
        return None
    keys = [registry, f"https://{registry}", f"http://{registry}"]
    if registry == DOCKER_HUB:
        keys += ["https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io"]
    for k in keys:
        entry = auths.get(k)
        if isinstance(entry, dict) and entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                return user, pw
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def _parse_challenge(header: str) -> Tuple[str, Dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryClient:
    """Resolves references against one registry; keeps its bearer token for the session."""

    def __init__(self, registry: str, *, insecure: bool = False, timeout: float = 30.0,
                 env: Optional[Mapping[str, str]] = None, retry: Optional[RetryPolicy] = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.registry = registry
        self.scheme = "http" if insecure else "https"
        self.timeout = timeout
        self.env = os.environ if env is None else env
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._auth: Optional[str] = None
        self.requests = 0
        #: attempts made by the last request (1 = no retry was needed)
        self.attempts = 0

    def _open(self, req: _Req) -> Any:
        """One exchange: the response, whatever its status (``status``, ``headers``,
        ``read()``, a context manager), or the network failure raised."""
        self.requests += 1
        if not req.full_url.startswith("https:"):
            return self._send(req, None)
        host = urllib.parse.urlsplit(req.full_url).netloc
        context = _ssl_context(whole_bundle=host in _NEEDS_BUNDLE)
        try:
            return self._send(req, context)
        except OSError as err:
            if _untrusted_certificate(err) is None:   # a network fault: the caller retries
                raise
            bundle = _ssl_context(whole_bundle=True)
            if bundle is context:
                raise
        # the certificate directory could not verify it: the whole bundle decides, from now
        # on for this host (one failed handshake per process, not per request)
        logger.debug("registry %s: not verified by the CA directory; trying the CA bundle", host)
        _NEEDS_BUNDLE.add(host)
        self.requests += 1
        return self._send(req, bundle)

    def _send(self, req: _Req, context: Any) -> Any:
        """Straight through http.client: urllib.request (0.3-0.5 MB of a cold run's peak
        memory) is imported only for what it does that this does not, a proxy from the
        environment and a redirect."""
        if _proxied():
            return self._via_urllib(req, context)
        parts = urllib.parse.urlsplit(req.full_url)
        https = context is not None
        conn = _Connection(parts.hostname or "", parts.port or (443 if https else 80),
                           self.timeout, context)
        try:
            conn.request(req.method, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                         headers={**req.headers, "Connection": "close"})
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status not in _REDIRECTS:
            return resp   # the connection closes with it ("Connection: close")
        resp.close()
        conn.close()
        return self._via_urllib(req, context)

    def _via_urllib(self, req: _Req, context: Any) -> Any:
        import urllib.error    # noqa: PLC0415
        import urllib.request  # noqa: PLC0415
        request = urllib.request.Request(req.full_url, method=req.method, headers=dict(req.headers))
        try:
            if context is None:
                return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310 - http only if insecure
            return urllib.request.urlopen(request, timeout=self.timeout, context=context)  # noqa: S310
        except urllib.error.HTTPError as err:
            return err   # a response as well: the status decides, in _request

    def _describe(self, err: BaseException) -> Tuple[str, bool]:
        """A short text for a network failure, and whether it was a timeout."""
        reason = _cause(err)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return f"no answer within {self.timeout:g} s", True
        if isinstance(reason, ConnectionResetError):
            return "connection reset by the registry", False
        if isinstance(reason, http.client.HTTPException):
            return f"connection dropped ({type(reason).__name__}: {reason or 'no response'})", False
        return str(reason), False

    def _request(self, method: str, url: str, headers: Dict[str, str], *,
                 use_auth: bool = True) -> Tuple[int, Dict[str, str], bytes]:
        """One HTTP request, tried again with backoff and jitter (:mod:`._retry`) on a
        transient status (429, 5xx) or a network failure (reset, refused, timeout); logs each
        failed attempt at INFO (``nsdf-run -v``); a clear RegistryError when none is left.
        ``use_auth=False`` (the token request itself): no session credentials, a 401 is
        returned as it is."""
        attempt = 0
        authenticated = False
        started = time.monotonic()
        path = urllib.parse.urlsplit(url).path
        while True:
            attempt += 1
            self.attempts = attempt
            h = dict(headers)
            if self._auth and use_auth:
                h["Authorization"] = self._auth
            req = _Req(method, url, h)
            retry_after: Optional[float] = None
            status: Optional[int] = None
            timed_out = False
            try:
                with self._open(req) as resp:
                    code = int(resp.status)
                    hdrs = {k.lower(): v for k, v in (resp.headers or {}).items()}
                    ok = 200 <= code < 300
                    body = resp.read() if ok and method == "GET" else b""
            except (OSError, http.client.HTTPException) as err:   # urllib's URLError is an OSError
                untrusted = _untrusted_certificate(err) if url.startswith("https:") else None
                if untrusted is not None:   # no retry: asking again does not make it trusted
                    raise RegistryError(_untrusted_text(self.registry, untrusted)) from None
                problem, timed_out = self._describe(err)
            else:
                if ok:
                    return code, hdrs, body
                if code == 401 and use_auth and not authenticated:
                    authenticated = True
                    attempt -= 1
                    self._authenticate(hdrs.get("www-authenticate", ""))
                    continue
                if code not in TRANSIENT_STATUSES:
                    return code, hdrs, b""
                status = code
                problem = f"HTTP {code}"
                retry_after = parse_retry_after(hdrs.get("retry-after"), time.time())
                if retry_after is not None:
                    problem += f" (Retry-After: {retry_after:g} s)"
            wait = self.retry.delay(attempt, retry_after)
            if wait is None:
                raise RegistryError(self._gave_up(status, problem, timed_out, attempt,
                                                  time.monotonic() - started, retry_after))
            logger.info("registry %s: %s for %s %s (attempt %d of %d); trying again in %.1f s",
                        self.registry, problem, method, path, attempt, self.retry.attempts, wait)
            self._sleep(wait)

    def _gave_up(self, status: Optional[int], problem: str, timed_out: bool, attempts: int,
                 elapsed: float, retry_after: Optional[float]) -> str:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s"
        if retry_after is not None and retry_after > self.retry.max_retry_after:
            return (f"registry {self.registry} rate-limited the request (HTTP {status}) and asks to "
                    f"retry after {retry_after:.0f} s, longer than nsdf-run waits "
                    f"({self.retry.max_retry_after:g} s); retry later or configure a site mirror "
                    "([mirrors] in the config)")
        if status == 429:
            return (f"registry {self.registry} rate-limited the request: HTTP 429 ({tries}); "
                    "retry later or configure a site mirror ([mirrors] in the config)")
        if status is not None:
            return (f"registry {self.registry} failed: {problem} ({tries}); the registry has a "
                    "problem, retry later")
        if timed_out:
            return (f"registry {self.registry} ({self.scheme}) accepted the connection but sent "
                    f"nothing within {self.timeout:g} s ({tries}); it hangs or a firewall drops "
                    "the traffic (registry_timeout in the config sets the limit)")
        proxy = ("; a proxy is set in the environment (https_proxy/http_proxy): check it, or "
                 "name this registry in no_proxy") if _proxied() else ""
        return f"cannot reach registry {self.registry} ({self.scheme}): {problem} ({tries}){proxy}"

    def _authenticate(self, challenge: str) -> None:
        scheme, params = _parse_challenge(challenge)
        creds = _credentials(self.registry, self.env)
        if scheme == "basic":
            if not creds:
                raise RegistryError(f"registry {self.registry} requires a login; set "
                                    "NSDF_HPC_REGISTRY_USER/NSDF_HPC_REGISTRY_PASSWORD or log in "
                                    "with `docker login`/`podman login`")
            self._auth = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryError(f"registry {self.registry}: unsupported authentication {scheme or '(none)'}")
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        url = params["realm"] + ("&" if "?" in params["realm"] else "?") + urllib.parse.urlencode(query)
        h = {}
        if creds:
            h["Authorization"] = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
        try:   # retried like every request (a token service throttles or fails too)
            status, _, body = self._request("GET", url, h, use_auth=False)
        except RegistryError as err:
            raise RegistryError(f"registry {self.registry}: its token service "
                                f"{urllib.parse.urlsplit(url).netloc} failed: {err}") from None
        if status != 200:
            raise RegistryError(f"registry {self.registry}: token request refused (HTTP {status})")
        try:
            data = json.loads(body or b"{}")
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            raise RegistryError(f"registry {self.registry}: token service returned no token") from None
        token = data.get("token") or data.get("access_token")
        if not token:
            raise RegistryError(f"registry {self.registry}: token service returned no token")
        self._auth = f"Bearer {token}"

    def manifest(self, ref: ImageRef, *, with_size: bool = False,
                 platform: Optional[Platform] = None) -> ManifestInfo:
        """What ``ref`` stands for (see :class:`ManifestInfo`): one HEAD request for a plain
        manifest; an index is read (GET) to choose ``platform``'s entry (default: this host's).
        ``with_size`` also reads the image manifest (its size) and a plain manifest's config
        (its platform)."""
        want = platform or host_platform()
        target = ref.digest or ref.tag or "latest"
        url = f"{self.scheme}://{api_host(self.registry)}/v2/{ref.repository}/manifests/{target}"
        headers = {"Accept": MANIFEST_TYPES}
        if not with_size:
            status, hdrs, _ = self._request("HEAD", url, headers)
            media = hdrs.get("content-type", "").split(";")[0].strip()
            if status == 200 and hdrs.get("docker-content-digest") and media not in _INDEX_TYPES:
                return ManifestInfo(hdrs["docker-content-digest"], media, None, self.requests,
                                    image_digest=hdrs["docker-content-digest"])
            if status not in (200, 405):
                self._raise(status, ref)
        status, hdrs, body = self._request("GET", url, headers)
        if status != 200:
            self._raise(status, ref)
        digest = hdrs.get("docker-content-digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest and digest != ref.digest:
            raise RegistryError(f"registry {self.registry} returned manifest {digest} for {ref}")
        media = hdrs.get("content-type", "").split(";")[0].strip()
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
        except ValueError:
            return ManifestInfo(digest, media, None, self.requests, image_digest=digest)
        media = str(doc.get("mediaType") or media)
        if media in _INDEX_TYPES or "manifests" in doc:
            offered = index_platforms(doc)
            chosen = pick_platform(doc, want)
            if chosen is None:
                return ManifestInfo(digest, media, None, self.requests, platforms=offered)
            sub, chosen_platform = chosen
            size = None
            if with_size:
                inner = self.manifest(ref.model_copy(update={"digest": sub, "tag": None}),
                                      with_size=True, platform=want)
                size = inner.size
            return ManifestInfo(digest, media, size, self.requests, image_digest=sub,
                                platform=chosen_platform, platforms=offered)
        total: Optional[int] = None
        try:
            total = sum(int(x.get("size", 0)) for x in [doc.get("config", {}), *doc.get("layers", [])])
        except (ValueError, AttributeError, TypeError):
            pass
        plat = self._config_platform(ref, doc) if with_size else None
        return ManifestInfo(digest, media, total, self.requests, image_digest=digest, platform=plat)

    def _config_platform(self, ref: ImageRef, manifest: Dict[str, Any]) -> Optional[str]:
        """``os/architecture[/variant]`` from a plain manifest's config blob; None when it
        cannot be read (the pull itself will tell what is wrong with the image)."""
        config = manifest.get("config")
        blob = config.get("digest") if isinstance(config, dict) else None
        if not isinstance(blob, str):
            return None
        url = f"{self.scheme}://{api_host(self.registry)}/v2/{ref.repository}/blobs/{blob}"
        try:
            status, _, body = self._request("GET", url, {})
            data = json.loads(body) if status == 200 else None
        except (RegistryError, ValueError) as err:
            logger.debug("no platform for %s: %s", ref, err)
            return None
        return platform_text(data) if isinstance(data, dict) else None

    def _raise(self, status: int, ref: ImageRef) -> None:
        if status == 404:
            raise RegistryError(f"image {ref} not found in registry {self.registry} (manifest unknown)")
        if status in (401, 403):
            raise RegistryError(f"registry {self.registry} denied access to {ref} (HTTP {status}); "
                                "for private images set NSDF_HPC_REGISTRY_USER/NSDF_HPC_REGISTRY_PASSWORD")
        if status == 429:
            raise RegistryError(f"registry {self.registry} rate-limited the request for {ref} (HTTP 429); "
                                "configure a site mirror ([mirrors] in the config) or retry later")
        raise RegistryError(f"registry {self.registry} answered HTTP {status} for {ref}")


def platform_text(p: Mapping[str, Any]) -> Optional[str]:
    """``os/architecture[/variant]`` of an index entry's ``platform`` or an image config;
    None without an architecture."""
    os_name, arch, variant = p.get("os"), p.get("architecture"), p.get("variant")
    if not isinstance(arch, str) or not arch:
        return None
    text = f"{os_name if isinstance(os_name, str) and os_name else 'linux'}/{arch}"
    return text + (f"/{variant}" if isinstance(variant, str) and variant else "")


def _entries(index: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    """``(digest, platform)`` of an index's image entries; attestation manifests that
    BuildKit adds as ``unknown/unknown`` are not images and are left out."""
    out: List[Tuple[str, Dict[str, Any]]] = []
    manifests = index.get("manifests")
    for m in manifests if isinstance(manifests, list) else []:
        if not isinstance(m, dict) or not isinstance(m.get("digest"), str):
            continue
        p = m.get("platform")
        p = p if isinstance(p, dict) else {}
        if p.get("os") == "unknown" or p.get("architecture") == "unknown":
            continue
        out.append((m["digest"], p))
    return out


def index_platforms(index: Mapping[str, Any]) -> Tuple[str, ...]:
    """The platforms an image index offers, in its order (``("linux/amd64", "linux/arm64")``)."""
    seen: List[str] = []
    for _, p in _entries(index):
        text = platform_text(p)
        if text and text not in seen:
            seen.append(text)
    return tuple(seen)


def pick_platform(index: Mapping[str, Any], platform: Platform) -> Optional[Tuple[str, str]]:
    """The ``(digest, "os/arch[/variant]")`` of the index entry for ``platform``, the first
    that matches (:meth:`Platform.matches`); None when the index has none for it."""
    for digest, p in _entries(index):
        if platform.matches(str(p.get("os", "")), str(p.get("architecture", "")),
                            p.get("variant") if isinstance(p.get("variant"), str) else None):
            return digest, platform_text(p) or str(platform)
    return None
