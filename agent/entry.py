"""The ``zonewatch-agent`` executable (and ``python -m agent``): light start-up, then agent.cli.

``run`` never uses Python's OpenSSL bindings: TLS is grpc's own (BoringSSL, inside its
extension), and hashlib has built-in SHA-2. Yet ``asyncio`` imports ``ssl`` and ``hashlib``
loads ``_hashlib``, which map libssl and libcrypto into the process: 4.8 MB of a running
agent's RSS, measured (50.9 -> 46.1 MB). So for ``run`` those modules are marked absent before
anything imports them (both fall back cleanly: asyncio without TLS support, hashlib to its
built-in hashes). ``enroll`` needs ``ssl`` (it reads the chain the collector presents) and is
left alone, as is every other command.
"""

from __future__ import annotations

import sys

OPENSSL_BINDINGS = ("ssl", "_ssl", "_hashlib")


def forgo_openssl() -> None:
    for name in OPENSSL_BINDINGS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main() -> int:
    if sys.argv[1:2] == ["run"]:
        forgo_openssl()
    from agent.cli import main as cli_main

    return cli_main()
