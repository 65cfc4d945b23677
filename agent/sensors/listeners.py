"""Listening sockets and the programs behind them: a new listener is how a backdoor, a forgotten
debug server or a tunnel shows up; one that goes away is how a service was stopped.

Read from the kernel's socket tables, /proc/net/tcp, tcp6, udp and udp6: a TCP socket in state
LISTEN (0A), and a UDP socket bound but not connected (state 07 with an all-zero remote
address). The tables list every socket, established ones too: a line is split only as far as
its state until it is known to be a listener, so a host with 100,000 connections costs about
0.1 s a poll, not a full parse.

Which process owns a socket is found by its inode in /proc/[pid]/fd, the expensive part (a
readlink per open file of every process): it is done only when an inode not seen before appears,
stops as soon as every new inode is found, and remembers the answer for as long as the listener
lives. A steady host costs four file reads a poll. Processes and files that vanish mid-scan are
skipped; a socket whose owner cannot be found (gone, or in another PID namespace) is reported
without a process.

``poll()`` returns every listener as "present" the first time, then what "opened" and "closed"
since the previous call. A listener is one socket (protocol, address, port, inode): a service
restarted between two polls shows as closed and opened.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from agent.aggregate.flows import ProcessRef, describe_process
from agent.errors import SensorError

TCP_LISTEN, UDP_UNCONNECTED = "0A", "07"
# (file, protocol, family): the IPv6 tables are absent when the kernel runs without IPv6.
TABLES = (("tcp", "tcp", 4), ("tcp6", "tcp", 6), ("udp", "udp", 4), ("udp6", "udp", 6))


class Listener(NamedTuple):
    protocol: str  # "tcp" | "udp"
    local_addr: str  # normalized; "0.0.0.0" / "::" for every address
    local_port: int
    inode: int


class ListenerEvent(NamedTuple):
    change: str  # "present" (first poll), "opened", "closed"
    protocol: str
    local_addr: str
    local_port: int
    inode: int
    process: ProcessRef | None  # None when the owner could not be found


class ListenerSensor:
    def __init__(
        self,
        proc: Path = Path("/proc"),
        describe: Callable[[int], ProcessRef | None] = describe_process,
    ) -> None:
        self._proc = proc
        self._describe = describe
        self._known: dict[Listener, ProcessRef | None] | None = None
        self.scans = 0  # /proc/[pid]/fd scans done: the cost that happens only on change

    def poll(self) -> list[ListenerEvent]:
        """Every listener ("present") on the first call; then what opened and closed since."""
        current = self.listeners()
        known = self._known
        first = known is None
        old: dict[Listener, ProcessRef | None] = known or {}
        new_inodes = {listener.inode for listener in current if listener not in old}
        owners = self._owners(new_inodes) if new_inodes else {}
        now: dict[Listener, ProcessRef | None] = {}
        events = []
        for listener in current:
            if listener in old:
                now[listener] = old[listener]
                continue
            now[listener] = process = owners.get(listener.inode)
            events.append(ListenerEvent("present" if first else "opened", *listener, process))
        events += [
            ListenerEvent("closed", *listener, process)
            for listener, process in old.items()
            if listener not in now
        ]
        self._known = now
        return events

    def listeners(self) -> list[Listener]:
        """The listening sockets now, in table order."""
        found: list[Listener] = []
        seen: set[Listener] = set()
        for name, protocol, family in TABLES:
            path = self._proc / "net" / name
            try:
                text = path.read_text(encoding="ascii", errors="replace")
            except FileNotFoundError:
                if family == 6:
                    continue  # IPv6 disabled in this kernel
                raise SensorError(f"cannot read {path}: no such file") from None
            except OSError as exc:
                raise SensorError(f"cannot read {path}: {exc.strerror or exc}") from exc
            for listener in _parse(text, protocol, family):
                if listener not in seen:  # a table can list a socket twice while it changes
                    seen.add(listener)
                    found.append(listener)
        return found

    def _owners(self, inodes: set[int]) -> dict[int, ProcessRef | None]:
        """The process holding each inode, scanning /proc/[pid]/fd until all are found."""
        self.scans += 1
        wanted = {f"socket:[{inode}]": inode for inode in inodes}
        pids: dict[int, int] = {}
        try:
            entries = sorted(int(e) for e in os.listdir(self._proc) if e.isdigit())
        except OSError as exc:
            raise SensorError(f"cannot list {self._proc}: {exc.strerror or exc}") from exc
        for pid in entries:
            fd_dir = f"{self._proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:
                continue  # gone, or not ours to see
            for fd in fds:
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue  # closed meanwhile
                inode = wanted.pop(target, None)
                if inode is not None:
                    pids[inode] = pid
            if not wanted:
                break
        described: dict[int, ProcessRef | None] = {}
        owners: dict[int, ProcessRef | None] = {}
        for inode, pid in pids.items():
            if pid not in described:
                described[pid] = self._describe(pid)
            owners[inode] = described[pid]
        return owners


def _parse(text: str, protocol: str, family: int) -> list[Listener]:
    listening = TCP_LISTEN if protocol == "tcp" else UDP_UNCONNECTED
    out = []
    for line in text.splitlines()[1:]:
        head = line.split(None, 4)
        if len(head) < 5 or head[3] != listening:
            continue
        local, remote = head[1], head[2]
        if protocol == "udp" and remote.strip("0:") != "":
            continue  # connected: a client socket, not a listener
        fields = line.split()
        try:
            address_hex, port_hex = local.split(":")
            inode = int(fields[9])
            address = _address(address_hex, family)
            port = int(port_hex, 16)
        except (ValueError, IndexError):
            continue  # a line cut by a concurrent change
        if inode:
            out.append(Listener(protocol, address, port, inode))
    return out


def _address(hex_text: str, family: int) -> str:
    """The kernel prints each 32-bit word of the address in host byte order."""
    raw = b"".join(
        int(hex_text[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_text), 8)
    )
    return socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, raw)
