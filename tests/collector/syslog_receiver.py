"""A syslog receiver for tests: RFC 6587 octet counting over TCP or TLS, every message parsed strictly
by RFC 5424's ABNF (written from the RFC, independent of collector/siem/format.py); and a test CA with
a server certificate for 127.0.0.1, made with `cryptography`."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

# --- RFC 5424 §6, strictly ------------------------------------------------------------------------

_HEADER = re.compile(rb"<(\d{1,3})>([1-9]\d{0,2}) ")
_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})")
BOM = b"\xef\xbb\xbf"


def _printusascii(token: bytes, most: int, what: str) -> str:
    assert 1 <= len(token) <= most, f"{what}: {len(token)} characters, 1-{most} allowed"
    assert all(33 <= b <= 126 for b in token), f"{what} {token!r}: not PRINTUSASCII"
    return token.decode("ascii")


def _sd_name(data: bytes, pos: int, what: str) -> tuple[str, int]:
    end = pos
    while end < len(data) and 33 <= data[end] <= 126 and data[end] not in b'= ]"':
        end += 1
    return _printusascii(data[pos:end], 32, what), end


def parse_syslog(data: bytes) -> dict[str, Any]:
    """SYSLOG-MSG = HEADER SP STRUCTURED-DATA [SP MSG]; AssertionError on any departure from the ABNF."""
    m = _HEADER.match(data)
    assert m, f"no PRI/VERSION: {data[:40]!r}"
    prival = int(m.group(1))
    assert 0 <= prival <= 191, f"PRIVAL {prival} out of range"
    pos = m.end()
    tokens = []
    for what, most in (
        ("TIMESTAMP", 64),
        ("HOSTNAME", 255),
        ("APP-NAME", 48),
        ("PROCID", 128),
        ("MSGID", 32),
    ):
        end = data.index(b" ", pos)
        tokens.append(_printusascii(data[pos:end], most, what))
        pos = end + 1
    timestamp = tokens[0]
    if timestamp != "-":
        assert _TIMESTAMP.fullmatch(timestamp), f"TIMESTAMP {timestamp!r}"
        datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))  # a real date and time
    sd: dict[str, dict[str, str]] = {}
    if data[pos : pos + 1] == b"-":
        pos += 1
    else:
        assert data[pos : pos + 1] == b"[", "STRUCTURED-DATA is neither - nor an SD-ELEMENT"
        while data[pos : pos + 1] == b"[":
            sd_id, pos = _sd_name(data, pos + 1, "SD-ID")
            assert sd_id not in sd, f"SD-ID {sd_id} twice"
            params: dict[str, str] = {}
            while data[pos : pos + 1] == b" ":
                name, pos = _sd_name(data, pos + 1, "PARAM-NAME")
                assert data[pos : pos + 2] == b'="', f'PARAM {name}: no ="'
                pos += 2
                value = bytearray()
                while data[pos : pos + 1] != b'"':
                    assert pos < len(data), "PARAM-VALUE not closed"
                    byte = data[pos : pos + 1]
                    assert byte != b"]", f"PARAM {name}: ']' not escaped"
                    if byte == b"\\" and data[pos + 1 : pos + 2] in (b'"', b"\\", b"]"):
                        pos += 1
                        byte = data[pos : pos + 1]
                    value += byte
                    pos += 1
                params[name] = value.decode("utf-8")  # UTF-8-STRING: strict
                pos += 1
            assert data[pos : pos + 1] == b"]", f"SD-ELEMENT {sd_id} not closed"
            sd[sd_id] = params
            pos += 1
    msg = None
    if pos < len(data):
        assert data[pos : pos + 1] == b" ", "no SP before MSG"
        body = data[pos + 1 :]
        assert body.startswith(BOM), "MSG-UTF8 starts with a BOM (ours always are UTF-8)"
        msg = body[len(BOM) :].decode("utf-8")
    return {
        "facility": prival // 8, "severity": prival % 8, "version": int(m.group(2)), "timestamp": timestamp,
        "hostname": tokens[1], "app": tokens[2], "procid": tokens[3], "msgid": tokens[4], "sd": sd,
        "msg": msg, "size": len(data),
    }  # fmt: skip


# --- a syslog receiver: RFC 6587 octet counting over TCP or TLS ------------------------------------


class _Connection(asyncio.Protocol):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver, self.buffer, self.frames = receiver, b"", 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.receiver.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.receiver.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (space := self.buffer.find(b" ")) > 0:
            length = self.buffer[:space]
            if not re.fullmatch(rb"[1-9][0-9]*", length):
                self.receiver.errors.append(f"bad MSG-LEN {self.buffer[:20]!r}")
                self.transport.close()  # type: ignore[attr-defined]
                return
            end = space + 1 + int(length)
            if len(self.buffer) < end:
                return
            message, self.buffer = self.buffer[space + 1 : end], self.buffer[end:]
            try:
                self.receiver.received(parse_syslog(message))
            except (AssertionError, ValueError) as exc:
                self.receiver.errors.append(f"{exc}: {message[:120]!r}")
            self.frames += 1
            if self.receiver.stall_after and self.frames >= self.receiver.stall_after:
                self.transport.pause_reading()  # type: ignore[attr-defined]
                self.receiver.stalled.set()
                return


class Receiver:
    """A syslog receiver on 127.0.0.1 in a thread of its own. stall_after: stop reading after that many
    frames, with a small receive buffer, so the sender's later bytes stay unacknowledged."""

    def __init__(self, port: int = 0, *, tls: ssl.SSLContext | None = None, stall_after: int = 0) -> None:
        self.messages: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.transports: set[asyncio.BaseTransport] = set()
        self.stall_after = stall_after
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if stall_after:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # inherited by accepted sockets
        sock.bind(("127.0.0.1", port))
        sock.listen()
        self.port = sock.getsockname()[1]

        async def serve() -> asyncio.Server:
            return await self._loop.create_server(lambda: _Connection(self), sock=sock, ssl=tls)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(5)

    def received(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.messages.append(message)

    def incidents(self) -> list[dict[str, str]]:
        """The zonewatch SD of every incident message so far, in arrival order."""
        with self._lock:
            return [m["sd"]["zonewatch@32473"] for m in self.messages if m["msgid"] != "test"]

    def stop(self) -> None:
        """Stop as a crashed receiver does: connections reset, unread bytes lost."""

        async def close() -> None:
            self._server.close()
            for transport in list(self.transports):
                transport.abort()  # type: ignore[attr-defined]
            await self._server.wait_closed()

        if not self.running:
            return
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def make_pki(directory: Path, name: str) -> tuple[Path, ssl.SSLContext]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (the CA's PEM, the server's context)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: Any, issuer: str, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = certificate(f"{name} CA", ca_key, f"{name} CA", ca_key, True)
    server_cert = certificate("syslog.test", server_key, f"{name} CA", ca_key, False)
    pem = serialization.Encoding.PEM
    ca_file, cert_file, key_file = (
        directory / f"{name}-ca.pem",
        directory / f"{name}.pem",
        directory / f"{name}.key",
    )
    ca_file.write_bytes(ca_cert.public_bytes(pem))
    cert_file.write_bytes(server_cert.public_bytes(pem) + ca_cert.public_bytes(pem))
    key_file.write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return ca_file, context
