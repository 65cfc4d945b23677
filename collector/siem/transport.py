"""A syslog client over TCP (RFC 6587) or TLS (RFC 5425) that knows when the receiver has the bytes.

Plain syslog has no application-level acknowledgement. The strongest confirmation it allows is the
receiver's TCP stack acknowledging every byte: `send` writes a batch of frames, then waits until the
socket's send queue is empty (SIOCOUTQ: bytes not yet acknowledged by the peer) while the connection
is still established. A reset, a timeout or a receiver that stops reading is a DeliveryError and
the caller sends the batch again on a new connection. What TCP cannot tell: a receiver that crashes
after its kernel acknowledged the bytes but before it stored them loses them (docs/siem.md).

Blocking sockets with timeouts, called from the exporter's own thread: sendall returns only once
every byte is in the kernel, which is what the send-queue check needs to mean "acknowledged".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import ssl
import struct
import termios
import time
from collections.abc import Callable
from typing import NamedTuple

from collector.siem import DeliveryError
from collector.siem.config import SyslogTarget

# linux/tcp_states.h: CLOSE_WAIT is a receiver that closed after acknowledging what it got.
TCP_ESTABLISHED = 1
TCP_CLOSE_WAIT = 8
_ALIVE = (TCP_ESTABLISHED, TCP_CLOSE_WAIT)


class Delivery(NamedTuple):
    messages: int
    bytes: int
    ack_ms: float  # from the last byte handed to the kernel to the peer's acknowledgement of it


def unacknowledged_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue: not sent yet, or sent and not acknowledged by the peer."""
    # SIOCOUTQ has TIOCOUTQ's number on Linux; termios exports only the latter.
    value = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", value)[0])


def tcp_state(sock: socket.socket) -> int:
    """The connection's state (tcpi_state, the first byte of struct tcp_info)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verify the receiver's certificate and name (RFC 5425 §5.2), TLS 1.2 at least."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(f"cannot load the CA certificates {ca_file}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class SyslogClient:
    """One connection to a receiver, opened on demand and reopened after any failure."""

    def __init__(
        self,
        target: SyslogTarget,
        *,
        timeout_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self._timeout_s = timeout_s
        self._clock = clock
        self._sleep = sleep
        self._context = (
            tls_context(str(target.ca_file) if target.ca_file else None) if target.scheme == "tls" else None
        )
        self._sock: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def send(self, frames: list[bytes]) -> Delivery:
        """Write the frames and wait for the receiver's TCP acknowledgement of all of them."""
        data = b"".join(frames)
        sock = self._sock if self._sock is not None and self._alive(self._sock) else self._connect()
        try:
            sock.sendall(data)
            written = self._clock()
            self._await_ack(sock, len(data))
        except DeliveryError:
            self.close()
            raise
        except (OSError, ValueError) as exc:  # ValueError: the socket was closed under us (abort)
            self.close()
            raise DeliveryError(f"{self.target.url}: sending failed: {_reason(exc)}") from exc
        return Delivery(len(frames), len(data), (self._clock() - written) * 1000)

    def _connect(self) -> socket.socket:
        self.close()
        url = self.target.url
        try:
            raw = socket.create_connection((self.target.host, self.target.port), timeout=self._timeout_s)
        except OSError as exc:
            raise DeliveryError(f"{url}: cannot connect: {_reason(exc)}") from exc
        if self._context is None:
            self._sock = raw
            return raw
        try:
            sock = self._context.wrap_socket(raw, server_hostname=self.target.host)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise DeliveryError(f"{url}: TLS handshake failed: {_reason(exc)}") from exc
        self._sock = sock
        return sock

    def _alive(self, sock: socket.socket) -> bool:
        """Still worth writing to: a receiver that closed an idle connection gets a new one first."""
        try:
            return tcp_state(sock) == TCP_ESTABLISHED and not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ERROR
            )
        except OSError:
            return False

    def _await_ack(self, sock: socket.socket, size: int) -> None:
        deadline = self._clock() + self._timeout_s
        pause = 0.0005
        while True:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            state = tcp_state(sock)
            pending = unacknowledged_bytes(sock)
            if error:
                raise DeliveryError(f"{self.target.url}: {_reason(OSError(error, os.strerror(error)))}")
            # A reset empties the send queue: an empty queue counts on a live connection only.
            if state not in _ALIVE:
                raise DeliveryError(
                    f"{self.target.url}: the receiver closed the connection before acknowledging "
                    f"{pending or size} of {size} bytes"
                )
            if pending == 0:
                return
            if self._clock() >= deadline:
                raise DeliveryError(
                    f"{self.target.url}: {pending} of {size} bytes not acknowledged within "
                    f"{self._timeout_s:g} s (the receiver is not reading)"
                )
            self._sleep(pause)
            pause = min(pause * 2, 0.02)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def abort(self) -> None:
        """From another thread: make a blocked send fail now (the collector is stopping)."""
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the TCP socket under TLS as well


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
