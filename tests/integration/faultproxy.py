"""A fault-injecting TCP proxy of the tests' own, put in front of the testbed's real registry.

The registry itself stays real and is never stopped: the proxy listens on a port of its own,
forwards to the registry, and injects the faults a test asks for:

* ``cut_after=N``: a connection that has sent N bytes to the client is cut (a TCP reset) and
  the proxy then behaves as a registry that went away (``down``);
* ``stall_after=N``: a connection that has sent N bytes to the client sends nothing more
  and stays open (a registry that hangs mid-blob);
* ``down``: every new connection is accepted and reset at once (connection refused/reset);
* ``silent``: connections are accepted and read, and nothing is ever sent back;
* ``inject``: statuses the proxy answers itself, one per request, before forwarding again
  (plain HTTP only: put it in front of the HTTP registry), e.g. ``[(429, {"Retry-After": "1"})]``;
  ``always`` answers every request with one status;
* ``reset_next=N``: the next N connections are reset as soon as they are accepted.

For TLS the proxy forwards raw TCP (the client still verifies the registry's certificate,
which names 127.0.0.1, whatever the port). In HTTP mode each connection carries one request
(the proxy adds ``Connection: close``), so that every request can be seen and counted.
Threads, not asyncio: resets need ``SO_LINGER`` on the raw socket.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
from typing import Dict, List, Optional, Tuple

Status = Tuple[int, Dict[str, str]]
_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashed peer or a dropped route does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """``with FaultProxy(("127.0.0.1", 5000), http=True) as p: ...`` -> ``p.address``."""

    def __init__(self, upstream: Tuple[str, int], *, http: bool = False) -> None:
        self.upstream = upstream
        self.http = http
        self.cut_after: Optional[int] = None
        self.stall_after: Optional[int] = None
        self.down = False
        self.silent = False
        self.reset_next = 0
        self.inject: List[Status] = []
        self.always: Optional[Status] = None
        #: what happened: connections accepted, requests seen (HTTP), answered by the proxy, cut
        self.connections = 0
        self.requests: List[str] = []
        self.injected = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._held: List[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, name="faultproxy", daemon=True)

    # -- control -----------------------------------------------------------------------------
    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heal(self) -> None:
        """Back to a healthy registry (the restart after an outage)."""
        with self._lock:
            self.cut_after = None
            self.stall_after = None
            self.down = self.silent = False
            self.reset_next = 0
            self.inject = []
            self.always = None

    def close(self) -> None:
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        for s in self._held:
            try:
                s.close()
            except OSError:
                pass
        self._thread.join(timeout=5)

    # -- the proxy -----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self._listener], [], [], 0.2)
            if not r:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            if self.down or self.reset_next > 0:
                self.reset_next = max(0, self.reset_next - 1)
                _reset(client)
                return
            silent = self.silent
        if silent:
            self._held.append(client)      # read and never answer; closed with the proxy
            return
        head = b""
        if self.http:
            head = self._read_head(client)
            if head is None:
                client.close()
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            with self._lock:
                self.requests.append(line)
                status = self.inject.pop(0) if self.inject else self.always
                if status is not None:
                    self.injected += 1
            if status is not None:
                self._answer(client, status, head_only=line.startswith("HEAD "))
                return
            head = self._close_after(head)
        try:
            up = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _reset(client)
            return
        up.settimeout(None)
        if head:
            up.sendall(head)
        self._pump(client, up)

    @staticmethod
    def _read_head(client: socket.socket) -> Optional[bytes]:
        data = b""
        client.settimeout(30)
        while b"\r\n\r\n" not in data:
            try:
                chunk = client.recv(65536)
            except OSError:
                return None
            if not chunk:
                return None
            data += chunk
        client.settimeout(None)
        return data

    @staticmethod
    def _close_after(head: bytes) -> bytes:
        """One request per connection: drop the client's Connection header, add ``close``."""
        top, _, rest = head.partition(b"\r\n\r\n")
        lines = [ln for ln in top.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + rest

    def _answer(self, client: socket.socket, status: Status, head_only: bool) -> None:
        code, headers = status
        body = b"" if head_only else (b'{"errors":[{"code":"UNAVAILABLE","message":"injected by faultproxy"}]}')
        lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}", "Content-Type: application/json",
                 f"Content-Length: {len(body) if not head_only else 0}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        try:
            client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        except OSError:
            pass
        client.close()

    def _pump(self, client: socket.socket, up: socket.socket) -> None:
        sent = 0
        socks = [client, up]
        try:
            while not self._stop.is_set():
                r, _, _ = select.select(socks, [], [], 0.5)
                for s in r:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    if s is up:
                        with self._lock:
                            limit = self.cut_after
                            stall = self.stall_after
                        if stall is not None and sent + len(data) > stall:
                            client.sendall(data[:max(0, stall - sent)])
                            self._stop.wait()     # hold it open, silent, until the proxy closes
                            return
                        if limit is not None and sent + len(data) > limit:
                            client.sendall(data[:max(0, limit - sent)])
                            with self._lock:
                                self.cuts += 1
                                self.down = True      # the registry went away
                            _reset(client)
                            return
                        sent += len(data)
                        client.sendall(data)
                    else:
                        up.sendall(data)
        except OSError:
            pass
        finally:
            for s in (client, up):
                try:
                    s.close()
                except OSError:
                    pass
