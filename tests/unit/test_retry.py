"""The retry policy (backoff, jitter, Retry-After) and the registry client's use of it, without
a network: ``RegistryClient._open`` is replaced by a scripted fake and ``sleep`` is recorded."""
from __future__ import annotations

import email.utils
import http.server
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import urllib.error
from typing import Any, Iterator, List, Optional, Sequence, Union

import pytest

from _fakes import FakeResponse

from nsdf_hpc._retry import TRANSIENT_STATUSES, RetryPolicy, parse_retry_after
from nsdf_hpc.errors import ImageError, RegistryError
from nsdf_hpc.reference import parse_reference
from nsdf_hpc.registry import RegistryClient

NOW = 1_800_000_000.0


# ---------------------------------------------------------------- Retry-After
@pytest.mark.parametrize("value, expected", [
    ("120", 120.0), ("0", 0.0), (" 7 ", 7.0),
    (email.utils.formatdate(NOW + 30, usegmt=True), 30.0),
    (email.utils.formatdate(NOW - 300, usegmt=True), 0.0),      # a date in the past: now
    (None, None), ("", None), ("soon", None), ("-5", None), ("1.5", None),
    ("Wed, 99 Foo 2015 07:28:00 GMT", None),
])
def test_parse_retry_after(value: Optional[str], expected: Optional[float]) -> None:
    got = parse_retry_after(value, NOW)
    assert got == (pytest.approx(expected) if expected is not None else None)


# ---------------------------------------------------------------- backoff and jitter
def test_backoff_is_bounded_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(attempts=6, base=1.0, cap=5.0)
    rng = random.Random(1)
    for attempt in range(1, 6):
        ceiling = min(5.0, 2.0 ** (attempt - 1))
        waits = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(w is not None and 0.0 <= w <= ceiling for w in waits)
        assert len({round(w or 0, 6) for w in waits}) > 150, "jitter: the waits differ"
        assert max(w or 0 for w in waits) > 0.8 * ceiling, "the whole range is used"
    assert policy.delay(6) is None, "no attempt left after the last one"
    assert policy.max_total_wait() == 1 + 2 + 4 + 5 + 5


def test_one_attempt_means_no_retry() -> None:
    assert RetryPolicy(attempts=1).delay(1) is None


def test_retry_after_is_a_floor_and_too_long_gives_up() -> None:
    policy = RetryPolicy(attempts=4, base=0.1, max_retry_after=60)
    assert policy.delay(1, retry_after=3.0) == 3.0
    assert policy.delay(1, retry_after=61.0) is None
    assert policy.delay(4, retry_after=1.0) is None


def test_transient_statuses() -> None:
    assert {429, 500, 502, 503, 504} <= TRANSIENT_STATUSES
    assert not {400, 401, 403, 404, 405} & TRANSIENT_STATUSES


# ---------------------------------------------------------------- the registry client
Script = Sequence[Union[int, BaseException, tuple]]


def _client(script: Script, attempts: int = 4) -> "tuple[RegistryClient, List[float]]":
    sleeps: List[float] = []
    client = RegistryClient("reg.example:5000", insecure=True, timeout=2,
                            retry=RetryPolicy(attempts=attempts, base=0.5), sleep=sleeps.append, env={})
    answers = list(script)

    def fake_open(req: Any) -> FakeResponse:
        client.requests += 1
        item = answers.pop(0)
        if isinstance(item, BaseException):
            raise item
        status, headers, body = (item + (b"",))[:3] if isinstance(item, tuple) else (item, {}, b"")
        if status >= 400:   # _open answers every status (urllib's HTTPError included)
            return FakeResponse(status, headers, b"error page")
        return FakeResponse(status, {"Docker-Content-Digest": "sha256:" + "a" * 64, **headers}, body)

    client._open = fake_open  # type: ignore[method-assign]
    return client, sleeps


REF = parse_reference("reg.example:5000/hpc/busybox:latest")


def test_503_then_ok_is_retried_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    client, sleeps = _client([503, 500, 200])
    with caplog.at_level(logging.INFO, logger="nsdf_hpc.registry"):
        info = client.manifest(REF)
    assert info.digest == "sha256:" + "a" * 64
    assert client.attempts == 3 and len(sleeps) == 2
    assert 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0
    text = caplog.text
    assert "HTTP 503" in text and "attempt 1 of 4" in text and "attempt 2 of 4" in text


def test_429_waits_at_least_retry_after() -> None:
    client, sleeps = _client([(429, {"Retry-After": "3"}), 200])
    client.manifest(REF)
    assert sleeps == [3.0]


def test_retry_after_beyond_the_limit_fails_at_once() -> None:
    client, sleeps = _client([(429, {"Retry-After": "86400"})])
    with pytest.raises(RegistryError, match=r"asks to retry after 86400 s.*mirror"):
        client.manifest(REF)
    assert sleeps == []


@pytest.mark.parametrize("status, words", [(500, "HTTP 500"), (503, "HTTP 503"), (429, "rate-limited")])
def test_a_persistent_failure_ends_in_a_clear_error_naming_the_attempts(status: int, words: str) -> None:
    client, sleeps = _client([status] * 4)
    with pytest.raises(RegistryError) as exc:
        client.manifest(REF)
    msg = str(exc.value)
    assert "registry reg.example:5000" in msg and words in msg and "4 attempts" in msg
    assert len(sleeps) == 3
    assert isinstance(exc.value, ImageError)


def test_resets_are_retried_then_reported() -> None:
    reset = urllib.error.URLError(ConnectionResetError(104, "Connection reset by peer"))
    client, sleeps = _client([reset, ConnectionResetError(104, "reset"), 200])
    client.manifest(REF)
    assert len(sleeps) == 2
    client, _ = _client([reset] * 3, attempts=3)
    with pytest.raises(RegistryError, match=r"cannot reach registry reg.example:5000 \(http\): "
                                            r"connection reset by the registry \(3 attempts"):
        client.manifest(REF)


def test_a_silent_registry_is_a_timeout_with_a_clear_error() -> None:
    client, sleeps = _client([urllib.error.URLError(socket.timeout("timed out")), TimeoutError("read")],
                             attempts=2)
    with pytest.raises(RegistryError, match=r"accepted the connection but sent nothing within 2 s "
                                            r"\(2 attempts.*registry_timeout"):
        client.manifest(REF)
    assert len(sleeps) == 1


def test_the_token_request_is_retried_too() -> None:
    challenge = {"WWW-Authenticate": 'Bearer realm="http://auth.example/token",service="reg"'}
    client, sleeps = _client([(401, challenge), 503, (200, {}, b'{"token": "t0k"}'), 200])
    assert client.manifest(REF).digest == "sha256:" + "a" * 64
    assert len(sleeps) == 1
    client, _ = _client([(401, challenge), 503, 503, 503, 503])
    with pytest.raises(RegistryError, match=r"registry reg.example:5000: its token service auth.example "
                                            r"failed: .*HTTP 503 \(4 attempts"):
        client.manifest(REF)


def test_not_found_is_not_retried() -> None:
    client, sleeps = _client([404, 404])
    with pytest.raises(RegistryError, match="not found"):
        client.manifest(REF)
    assert sleeps == [] and client.requests == 1


# ---------------------------------------------------------------- a runtime's own pull step
def test_disk_full_words() -> None:
    from nsdf_hpc.images import disk_full_text
    assert disk_full_text("write /x: no space left on device")
    assert disk_full_text("error: can't extract layer 2: No space left on device")
    assert disk_full_text("OSError: [Errno 122] Disk quota exceeded")
    assert not disk_full_text("unexpected EOF")


def test_registry_pull_steps_are_retried_and_conversions_are_not() -> None:
    from nsdf_hpc.reference import parse_source
    from nsdf_hpc.runtimes.apptainer import Apptainer
    rt = Apptainer("/usr/bin/apptainer")
    src = parse_source("reg.example:5000/hpc/busybox:latest")
    plan = rt.image_plan(src, REF.pinned("sha256:" + "a" * 64), "a" * 64)
    assert [s.retry for s in plan.steps] == [True]


# ---------------------------------------------------------------- the stall watchdog
def test_a_command_that_does_no_io_is_stopped_as_stalled() -> None:
    import time

    from nsdf_hpc._exec import SubprocessRunner
    from nsdf_hpc.errors import CommandTimeoutError
    t0 = time.monotonic()
    with pytest.raises(CommandTimeoutError) as exc:
        SubprocessRunner().run(["sleep", "30"], stall_timeout=0.5)
    assert exc.value.stalled and "made no progress" in str(exc.value)
    assert time.monotonic() - t0 < 10


def test_a_command_that_keeps_writing_is_not_stalled() -> None:
    from nsdf_hpc._exec import SubprocessRunner
    res = SubprocessRunner().run(["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do echo x; sleep 0.15; done"],
                                 stall_timeout=0.5)
    assert res.stdout.count("x") == 8


# ---------------------------------------------------------------- the image service's retry loop
class _PullRunner:
    """``apptainer pull`` fails ``failures`` times (leaving a partial file), then writes the SIF."""

    def __init__(self, failures: int, stderr: str) -> None:
        self.failures = failures
        self.stderr = stderr
        self.pulls: List[List[str]] = []     # what the work dir held when each pull started

    def run(self, argv: Sequence[str], **kw: Any) -> Any:
        import os

        from nsdf_hpc._exec import CompletedCommand
        from nsdf_hpc.errors import CommandError
        if "pull" in argv:
            cwd = str(kw["cwd"])
            self.pulls.append(sorted(os.listdir(cwd)))
            if len(self.pulls) <= self.failures:
                open(os.path.join(cwd, "partial.tmp"), "w").close()
                raise CommandError(tuple(argv), 255, "", self.stderr)
            open(os.path.join(cwd, "image.sif"), "wb").write(b"SIF")
        return CompletedCommand(tuple(argv), 0, "", "")


def _service(tmp_path: Any, runner: Any, monkeypatch: pytest.MonkeyPatch) -> "tuple[Any, Any, List[float]]":
    from nsdf_hpc import images
    from nsdf_hpc.client import Client
    from nsdf_hpc.config import load_settings
    from nsdf_hpc.runtimes.apptainer import Apptainer
    from nsdf_hpc.runtimes.base import RuntimeContext
    env = {"PATH": "/usr/bin", "HOME": str(tmp_path), "NSDF_HPC_CACHE": str(tmp_path / "cache")}
    settings = load_settings(env=env, files=[], registry_attempts=3, registry_backoff=0.5)
    client = Client(settings=settings, runner=runner, env=env)
    sleeps: List[float] = []
    monkeypatch.setattr(images.time, "sleep", sleeps.append)
    monkeypatch.setattr(client.images, "_describe", lambda *a: None)
    rt = Apptainer("/usr/bin/apptainer", "apptainer", "1.4.5",
                   RuntimeContext(1000, 1000, "alice", which=lambda n: f"/usr/bin/{n}"))
    return client, rt, sleeps


PINNED = "reg.example:5000/hpc/busybox@sha256:" + "b" * 64


def test_a_failed_registry_pull_step_is_run_again_in_an_emptied_work_dir(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    runner = _PullRunner(2, "read: connection reset by peer")
    client, rt, sleeps = _service(tmp_path, runner, monkeypatch)
    with caplog.at_level(logging.INFO, logger="nsdf_hpc.images"):
        native = client.images.pull(PINNED, rt)
    assert native.location.endswith("image.sif") and not native.cached
    assert runner.pulls == [[], [], []], "each attempt starts in an emptied work directory"
    assert len(sleeps) == 2 and 0 <= sleeps[0] <= 0.5 and 0 <= sleeps[1] <= 1.0
    assert "attempt 1 of 3, exit 255: read: connection reset by peer" in caplog.text


def test_the_last_failure_names_the_registry_and_the_attempts(tmp_path: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    client, rt, sleeps = _service(tmp_path, _PullRunner(9, "unexpected EOF"), monkeypatch)
    with pytest.raises(ImageError, match=r"from registry reg.example:5000 \(3 attempts\) failed") as exc:
        client.images.pull(PINNED, rt)
    assert "unexpected EOF" in str(exc.value) and len(sleeps) == 2
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    assert not (tmp_path / "cache" / "entries" / "apptainer").exists() or \
        not list((tmp_path / "cache" / "entries" / "apptainer").iterdir())


def test_a_full_disk_is_not_retried_and_names_nsdf_hpc_cache(tmp_path: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from nsdf_hpc.errors import DiskFullError
    runner = _PullRunner(9, "FATAL: write /x/tmp/layer: no space left on device")
    client, rt, sleeps = _service(tmp_path, runner, monkeypatch)
    with pytest.raises(DiskFullError) as exc:
        client.images.pull(PINNED, rt)
    err = exc.value
    assert err.variable == "NSDF_HPC_CACHE" and err.path == str(tmp_path / "cache")
    assert f"NSDF_HPC_CACHE={tmp_path / 'cache'}" in str(err) and "no space left on device" in str(err)
    assert len(runner.pulls) == 1 and sleeps == []
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_a_network_fault_over_tls_does_not_parse_the_ca_bundle(monkeypatch, tmp_path):
    """Only a certificate the CA directory could not verify brings in the whole bundle; a
    reset (retried by the caller) leaves the directory's context alone."""
    from nsdf_hpc import registry

    monkeypatch.setattr(registry, "_SSL_CONTEXTS", {})
    monkeypatch.setattr(registry, "_NEEDS_BUNDLE", set())
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))   # a CA directory on any machine
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)

    def reset(conn: Any) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(registry._Connection, "connect", reset)
    client = registry.RegistryClient("registry.example:443")
    with pytest.raises(ConnectionResetError):
        client._open(registry._Req("HEAD", "https://registry.example:443/v2/"))
    assert "bundle" not in registry._SSL_CONTEXTS and not registry._NEEDS_BUNDLE
    assert client.requests == 1


# ------------------------------------------ the transport, against a real local HTTP server
class _Registry(http.server.BaseHTTPRequestHandler):
    """Answers like a registry: a digest for /v2/...; /moved redirects (307) there; every
    request line is noted (a proxy gets the absolute URL)."""

    lines: List[str] = []

    def _answer(self, body: bytes) -> None:
        type(self).lines.append(self.requestline)
        if self.path.endswith("/moved"):
            self.send_response(307)
            self.send_header("Location", "/v2/hpc/a/manifests/latest")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Docker-Content-Digest", "sha256:" + "b" * 64)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._answer(b"{}")

    def do_GET(self) -> None:
        self._answer(b'{"schemaVersion": 2}')

    def log_message(self, *a: Any) -> None:
        pass


@pytest.fixture
def local_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    _Registry.lines = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_request_goes_straight_through_http_client(local_registry: str) -> None:
    """Neither urllib.request nor the idna codec (for an ASCII host) is imported: a new
    process asks the local registry for a manifest, HEAD then GET."""
    code = ("import sys; from nsdf_hpc.registry import RegistryClient; "
            "from nsdf_hpc.reference import parse_reference; "
            f"c = RegistryClient({local_registry!r}, insecure=True, env={{}}); "
            f"ref = parse_reference({local_registry + '/hpc/a:latest'!r}); "
            "print(c.manifest(ref).digest, c.requests, "
            "'urllib.request' in sys.modules, 'encodings.idna' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["sha256:" + "b" * 64, "1", "False", "False"]
    assert _Registry.lines == ["HEAD /v2/hpc/a/manifests/latest HTTP/1.1"]


def test_a_redirect_is_followed_through_urllib(local_registry: str) -> None:
    client = RegistryClient(local_registry, insecure=True, env={})
    status, headers, body = client._request("GET", f"http://{local_registry}/v2/hpc/a/moved", {})
    assert (status, headers["docker-content-digest"], body) == (200, "sha256:" + "b" * 64,
                                                                b'{"schemaVersion": 2}')
    assert _Registry.lines == ["GET /v2/hpc/a/moved HTTP/1.1",            # http.client: a 307
                               "GET /v2/hpc/a/moved HTTP/1.1",            # again, with urllib
                               "GET /v2/hpc/a/manifests/latest HTTP/1.1"]  # which follows it
    assert client.requests == 1


def test_a_proxy_from_the_environment_is_used(local_registry: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With http_proxy set the request goes through urllib to the proxy (here the local
    server, which sees the absolute URL a proxy gets)."""
    import urllib.request
    monkeypatch.setattr(urllib.request, "_opener", None)   # urllib reads proxies once per opener
    monkeypatch.setenv("http_proxy", f"http://{local_registry}")
    client = RegistryClient("registry.invalid:5000", insecure=True, env={})
    info = client.manifest(parse_reference("registry.invalid:5000/hpc/a:latest"))
    assert info.digest == "sha256:" + "b" * 64
    assert _Registry.lines == ["HEAD http://registry.invalid:5000/v2/hpc/a/manifests/latest HTTP/1.1"]
    monkeypatch.setattr(urllib.request, "_opener", None)
    monkeypatch.setenv("no_proxy", "registry.invalid")
    with pytest.raises(RegistryError, match="cannot reach registry registry.invalid:5000") as exc:
        RegistryClient("registry.invalid:5000", insecure=True, env={},
                       retry=RetryPolicy(attempts=1)).manifest(
            parse_reference("registry.invalid:5000/hpc/a:latest"))
    assert "a proxy is set in the environment" in str(exc.value)
