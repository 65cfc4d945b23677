"""This network namespace's sockets and the processes that own them, read lean: what the flow
table's attribution needs (agent.aggregate.flows.SocketOwners), without psutil's cost.

psutil.net_connections maps every socket inode of every process on the host (a readlink per open
file of every process, all kept in dicts) before it matches the first one. On a busy host that
is a lot of short-lived Python objects (20,000 open sockets: 15 MB at its peak, measured), and
the agent's RSS kept 2-4 MB of them for good: pymalloc arenas stay pinned by the few objects that
outlive the call. Here the socket tables are read first (/proc/net/tcp, tcp6, udp, udp6: the
agent's own namespace only), then /proc/[pid]/fd is walked one directory entry at a time, only
for inodes whose owner is not known yet, stopping as soon as every one is found. An owner is
remembered while its socket lives, so a steady host costs four file reads a refresh. A socket
whose owner cannot be seen (another PID namespace, or gone) is remembered as ownerless.

Rows have the shape SocketOwners reads from psutil (``type``, ``laddr.ip``/``laddr.port``,
``raddr``, ``pid``, ``status``), so a test can still hand it psutil-like rows.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NamedTuple

TCP_LISTEN = "0A"
LISTEN = "LISTEN"  # == psutil.CONN_LISTEN
# (file, socket type, family); the IPv6 tables are absent when the kernel runs without IPv6.
TABLES = (
    ("tcp", 1, socket.AF_INET),
    ("tcp6", 1, socket.AF_INET6),
    ("udp", 2, socket.AF_INET),
    ("udp6", 2, socket.AF_INET6),
)


# Reading /proc/[pid]/fd of another user's process takes ptrace's read check (CAP_SYS_PTRACE) and
# passing the directory's 0500 mode (CAP_DAC_READ_SEARCH); bit numbers from linux/capability.h.
ATTRIBUTION_CAPS = (("CAP_SYS_PTRACE", 19), ("CAP_DAC_READ_SEARCH", 2))


def attribution_note(status_path: str = "/proc/self/status") -> str:
    """What the sensors that name a socket's program cannot see, from this process's effective
    capabilities (not its uid: root in a unit or container may have them dropped); "" when nothing."""
    try:
        with open(status_path, encoding="ascii") as fh:
            line = next((row for row in fh if row.startswith("CapEff:")), "")
        effective = int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return ""  # cannot tell: say nothing rather than guess
    missing = [name for name, bit in ATTRIBUTION_CAPS if not effective >> bit & 1]
    return f"programs of other users' sockets unknown (no {', '.join(missing)})" if missing else ""


class Address(NamedTuple):
    ip: str
    port: int


class Connection(NamedTuple):
    type: int  # socket.SOCK_STREAM (1) or SOCK_DGRAM (2)
    laddr: Address | tuple[()]  # () when unbound (port 0), as psutil gives it
    raddr: Address | tuple[()]  # () when not connected
    pid: int | None
    status: str  # "LISTEN" for a listening TCP socket, else "" (psutil says more; nothing here reads it)
    inode: int


class SocketTable:
    """Read the namespace's sockets with their owners; remembers owners between reads."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._owners: dict[int, int | None] = {}  # inode -> pid (None: not found)
        self.scans = 0  # /proc/[pid]/fd walks done: the cost that happens only for new sockets

    def __call__(self) -> list[Connection]:
        rows = self.read()
        live = {row.inode for row in rows}
        self._owners = {inode: pid for inode, pid in self._owners.items() if inode in live}
        new = live - self._owners.keys()
        if new:
            self._owners.update(self._find(new))
        return [row._replace(pid=self._owners.get(row.inode)) for row in rows]

    def read(self) -> list[Connection]:
        """The sockets in this namespace's tables (owners not looked up); inode 0 (TIME_WAIT) left out."""
        rows: list[Connection] = []
        for name, kind, family in TABLES:
            try:
                with open(f"{self._proc}/net/{name}", encoding="ascii", errors="replace") as fh:
                    next(fh, None)  # the header
                    for line in fh:
                        row = _parse(line, kind, family)
                        if row is not None:
                            rows.append(row)
            except OSError:
                continue  # IPv6 off in this kernel, or /proc not mounted: nothing to attribute
        return rows

    def _find(self, inodes: set[int]) -> dict[int, int | None]:
        """The process holding each inode, walking /proc/[pid]/fd until all are found."""
        self.scans += 1
        wanted = {f"socket:[{inode}]": inode for inode in inodes}
        found: dict[int, int | None] = dict.fromkeys(inodes)
        try:
            pids = sorted(int(e) for e in os.listdir(self._proc) if e.isdigit())
        except OSError:
            return found
        for pid in pids:
            try:
                with os.scandir(f"{self._proc}/{pid}/fd") as entries:  # one entry at a time, no list
                    for entry in entries:
                        try:
                            inode = wanted.pop(os.readlink(entry.path), None)
                        except OSError:
                            continue  # closed meanwhile
                        if inode is not None:
                            found[inode] = pid
            except OSError:
                continue  # gone, or not ours to see
            if not wanted:
                break
        return found


def _parse(line: str, kind: int, family: int) -> Connection | None:
    fields = line.split()
    try:
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        laddr, raddr = _address(local, family), _address(remote, family)
    except (ValueError, IndexError):
        return None  # a line cut by a concurrent change
    if not inode:
        return None
    status = LISTEN if kind == 1 and state == TCP_LISTEN else ""
    return Connection(kind, laddr, raddr, None, status, inode)


def _address(text: str, family: int) -> Address | tuple[()]:
    """ "0100007F:1F90" -> ("127.0.0.1", 8080); port 0 -> (). The kernel prints each 32-bit word of
    the address in host byte order."""
    address_hex, port_hex = text.split(":")
    port = int(port_hex, 16)
    if not port:
        return ()
    raw = b"".join(
        int(address_hex[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(address_hex), 8)
    )
    return Address(socket.inet_ntop(family, raw), port)
