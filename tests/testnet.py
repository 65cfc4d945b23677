"""Real test hosts for pytest: network namespaces joined by veth pairs to bridges in a router namespace.

    with TestNetwork() as net:
        web = net.add_host("web", "extranet")
        db = net.add_host("db", "dedicated")
        assert web.ping(db.addr4["dedicated"])
        result = iperf3(db, web, "dedicated", seconds=1)

Every namespace is named `<prefix>-<host>`, where the prefix is FAMILY, the owning process id and six random
hex digits; a namespace of this family whose owner process is gone is a leftover of a crashed run and is
swept when the next TestNetwork starts. Nothing here ever talks to the outside: the router has no uplink.

The file doubles as the helper program run inside the namespaces (`python testnet.py ping|sink|source ...`),
so it imports only the standard library at module level.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

ROOT = Path(__file__).resolve().parent.parent
NETNS_DIR = Path("/run/netns")
FAMILY = "zwtn"
_OWNED = re.compile(rf"^{FAMILY}(\d+)-[0-9a-f]{{6}}-")

SUBNETS: dict[str, tuple[IPv4Network, IPv6Network]] = {
    "extranet": (IPv4Network("10.250.1.0/24"), IPv6Network("fd00:250:1::/64")),
    "dedicated": (IPv4Network("10.250.2.0/24"), IPv6Network("fd00:250:2::/64")),
    "internet": (IPv4Network("198.51.100.0/24"), IPv6Network("2001:db8:100::/64")),
}
# Subnets a network builds only when asked (TestNetwork(extra_subnets=[...])), so the networks every other
# test builds stay as they were: the province platform, the far end of the vertical extranet link.
EXTRA_SUBNETS: dict[str, tuple[IPv4Network, IPv6Network]] = {
    "province": (IPv4Network("10.250.3.0/24"), IPv6Network("fd00:250:3::/64")),
}
# A zone catalog of this network, as a collector would serve it: the extranet subnet, the
# dedicated one (owned by 市公安局), and everything else as the internet.
ZONE_CATALOG = f"""\
zones:
  - name: 市级横向外网
    kind: extranet
    direction: horizontal
    cidrs: [{SUBNETS["extranet"][0]}, "{SUBNETS["extranet"][1]}"]
    capacity: 10G
  - name: 公安专网
    kind: dedicated
    department: 市公安局
    cidrs: [{SUBNETS["dedicated"][0]}, "{SUBNETS["dedicated"][1]}"]
  - name: 互联网
    kind: internet
    cidrs: [0.0.0.0/0, "::/0"]
"""
ROUTER_NUMBER = 1  # the router is .1 / ::1 on every subnet
FIRST_HOST_NUMBER = 10  # hosts get .10 / ::10, .11 / ::11, ... in the order they join a subnet
_HOST_NAME = re.compile(r"^[a-z][a-z0-9-]{0,19}$")
_COUNTERS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")
# A veth port is created with no DAD so addresses are usable at once; the router forwards both families.
_HOST_SYSCTLS = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")
_ROUTER_SYSCTLS = (*_HOST_SYSCTLS, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")


def addresses(subnet: str, number: int) -> tuple[IPv4Address, IPv6Address]:
    """Host `number` of `subnet` in both families, written with the same digits: 10 -> (.10, ::10)."""
    net4, net6 = (SUBNETS | EXTRA_SUBNETS)[subnet]
    if not 0 < number < net4.num_addresses - 1:
        raise ValueError(f"no host number {number} in {net4}")
    return net4[number], net6[int(str(number), 16)]


class TestNetError(Exception):
    """A test network could not be built, used or torn down."""

    __test__ = False


class CommandFailed(TestNetError, subprocess.CalledProcessError):
    """A command exited non-zero; unlike CalledProcessError, its message carries the command's stderr."""

    def __str__(self) -> str:
        stderr = (self.stderr or "").strip()
        return super().__str__() + (f"\n{stderr[-2000:]}" if stderr else "")


class TransferResult(NamedTuple):
    bytes_sent: int
    bytes_received: int
    seconds: float

    @property
    def bits_per_second(self) -> float:
        return self.bytes_received * 8 / self.seconds if self.seconds else 0.0


IperfResult = TransferResult  # iperf3() and tcp_transfer() report the same three figures


class Route(NamedTuple):
    dev: str
    gateway: str | None
    source: str | None


def _run(args: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 30) -> str:
    result = subprocess.run(list(args), input=input, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, list(args), result.stdout, result.stderr)
    return result.stdout


def _ip_batch(lines: Sequence[str], ns: str | None = None, *, force: bool = False) -> str:
    """One `ip` process for many commands: setup stays fast however many hosts a test builds.

    With `force`, a failing line does not stop the rest and no error is raised (teardown wants that).
    """
    args = ["ip", *(["-n", ns] if ns else []), *(["-force"] if force else []), "-batch", "-"]
    return _run(args, input="\n".join(lines) + "\n", check=not force)


def _namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Sequence[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL for whatever is still running after `grace` seconds (not our children)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        pids = [p for p in pids if _pid_alive(p) and not _zombie(p)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = [p for p in pids if _pid_alive(p) and not _zombie(p)]


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _stop(procs: Sequence[subprocess.Popen[Any]], grace: float = 3.0) -> None:
    """Stop our own children by PID: SIGTERM to all, then SIGKILL to those not gone within `grace`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _remove_namespaces(names: Sequence[str]) -> list[str]:
    """Stop every process left inside the namespaces, delete them; return the names that survived."""
    if not names:
        return []
    pids = _ip_batch([f"netns pids {ns}" for ns in names], force=True).split()
    _kill_pids([int(p) for p in pids])
    _ip_batch([f"netns del {ns}" for ns in names], force=True)  # some may be gone already: fine
    existing = set(_namespaces())
    return [ns for ns in names if ns in existing]


def sweep_stale_namespaces() -> list[str]:
    """Delete this family's namespaces whose owning process has died (a crashed run); return their names."""
    stale = [ns for ns in _namespaces() if (m := _OWNED.match(ns)) and not _pid_alive(int(m[1]))]
    _remove_namespaces(stale)
    return stale


def require_root_netns(*, iperf3: bool = True) -> None:
    """Skip the calling test (or module) unless this process can build test networks."""
    import pytest

    reason = missing_capability(iperf3)
    if reason:
        raise pytest.skip.Exception(reason, allow_module_level=True)


def missing_capability(iperf3: bool = True) -> str | None:
    """Why this process cannot build test networks (None: it can); for scripts that are not tests."""
    if not sys.platform.startswith("linux"):
        return "network-namespace tests need Linux"
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns add); run as root or deselect with -m 'not netns'"
    if shutil.which("ip") is None:
        return "network-namespace tests need the `ip` command (iproute2)"
    if iperf3 and shutil.which("iperf3") is None:
        return "network-namespace tests need iperf3"
    return _namespace_refused()


@functools.cache
def _namespace_refused() -> str | None:
    """Root in a container may still lack CAP_SYS_ADMIN: try once per process."""
    probe = f"{FAMILY}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        _ip_batch([f"netns add {probe}"])
    except (CommandFailed, OSError) as e:
        return f"cannot create a network namespace here: {str(e).strip()}"
    finally:
        _remove_namespaces([probe])
    return None


@dataclass(eq=False)
class Host:
    """One namespace: a test host (or the router). Processes it starts are stopped at teardown."""

    name: str
    ns: str
    interfaces: dict[str, str]  # subnet -> interface name
    addr4: dict[str, str]  # subnet -> address
    addr6: dict[str, str]
    _processes: list[subprocess.Popen[Any]] = field(default_factory=list, repr=False)

    def address(self, subnet: str, ipv6: bool = False) -> str:
        return (self.addr6 if ipv6 else self.addr4)[subnet]

    def exec_args(self, *cmd: object) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, cmd)]

    def run(
        self, *cmd: object, check: bool = True, timeout: float = 30, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = self.exec_args(*cmd)
        result = subprocess.run(
            args, input=input, capture_output=True, text=True, timeout=timeout, env=_python_env()
        )
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, args, result.stdout, result.stderr)
        return result

    def popen(self, *cmd: object, **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace; `ip netns exec` execs it, so proc.pid is the program itself."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("env", _python_env())
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_args(*cmd), **kw)
        self._processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> int:
        """Stop one process started by popen() (SIGTERM, then SIGKILL) and forget it; return its status."""
        _stop([proc], grace)
        if proc in self._processes:
            self._processes.remove(proc)
        return proc.returncode

    def python(
        self, *args: object, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run this interpreter in the namespace with the repo on PYTHONPATH.

        `python("print(1)")` runs code with -c (further arguments become sys.argv[1:]);
        `python("-m", "agent.cli", ...)` or `python("script.py", ...)` passes the arguments as they are.
        """
        return self.run(sys.executable, *_python_args(args), check=check, timeout=timeout)

    def python_popen(self, *args: object, **kw: Any) -> subprocess.Popen[Any]:
        return self.popen(sys.executable, *_python_args(args), **kw)

    def iface_counters(self, ifname: str) -> dict[str, int]:
        # /sys shows the namespace of the reader, so read it from inside (ip netns exec remounts /sys).
        paths = [f"/sys/class/net/{ifname}/statistics/{c}" for c in _COUNTERS]
        values = self.run("cat", *paths).stdout.split()
        return dict(zip(_COUNTERS, map(int, values), strict=True))

    def route(self, address: str) -> Route:
        """The route this host's kernel picks for `address` (`ip route get`)."""
        (entry,) = json.loads(_run(["ip", "-n", self.ns, "-j", "route", "get", address]))
        return Route(entry["dev"], entry.get("gateway"), entry.get("prefsrc"))

    def ping(self, address: str, count: int = 1, timeout: float = 2.0) -> int:
        """Send ICMP echo requests to `address`; return how many replies came back (0 = unreachable)."""
        result = self.python(__file__, "ping", address, count, timeout, timeout=count * timeout + 15)
        return int(result.stdout)


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _python_args(args: Sequence[object]) -> list[str]:
    argv = [str(a) for a in args]
    if argv and not argv[0].startswith("-") and not argv[0].endswith(".py"):
        return ["-c", *argv]
    return argv


class TestNetwork:
    """A router namespace with one bridge per subnet in SUBNETS (and each of `extra_subnets`, names from
    EXTRA_SUBNETS), and hosts added with add_host()."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, extra_subnets: Sequence[str] = ()) -> None:
        unknown = [s for s in extra_subnets if s not in EXTRA_SUBNETS]
        if unknown:
            raise ValueError(f"extra subnets must be names from {list(EXTRA_SUBNETS)}, got {unknown}")
        self.subnets = SUBNETS | {s: EXTRA_SUBNETS[s] for s in extra_subnets}
        self.prefix = f"{FAMILY}{os.getpid()}-{secrets.token_hex(3)}"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self._processes: list[subprocess.Popen[Any]] = []
        self._joined = dict.fromkeys(self.subnets, 0)
        self._added = 0  # numbers the router's veth ends; a failed add_host still uses its number
        self._router: Host | None = None

    @property
    def router(self) -> Host:
        if self._router is None:
            raise TestNetError("the network is not started: use `with TestNetwork() as net`")
        return self._router

    def __enter__(self) -> TestNetwork:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        sweep_stale_namespaces()
        ns = f"{self.prefix}-router"
        self.namespaces.append(ns)
        try:
            _ip_batch([f"netns add {ns}", f"netns exec {ns} sysctl -qw {' '.join(_ROUTER_SYSCTLS)}"])
            lines = ["link set lo up"]
            for subnet, (net4, net6) in self.subnets.items():
                bridge, (ip4, ip6) = f"br-{subnet}", addresses(subnet, ROUTER_NUMBER)
                lines += [
                    f"link add {bridge} type bridge forward_delay 0 mcast_snooping 0",
                    f"addr add {ip4}/{net4.prefixlen} dev {bridge}",
                    f"addr add {ip6}/{net6.prefixlen} dev {bridge} nodad",
                    f"link set {bridge} up",
                ]
            _ip_batch(lines, ns)
        except BaseException:
            self.close()
            raise
        self._router = Host(
            "router",
            ns,
            {s: f"br-{s}" for s in self.subnets},
            {s: str(addresses(s, ROUTER_NUMBER)[0]) for s in self.subnets},
            {s: str(addresses(s, ROUTER_NUMBER)[1]) for s in self.subnets},
            self._processes,
        )

    def add_host(self, name: str, *subnets: str) -> Host:
        """A namespace with eth0, eth1, ... on `subnets` in order; its default routes go via eth0's router."""
        router = self.router
        if not _HOST_NAME.match(name) or name == "router" or name in self.hosts:
            raise ValueError(f"host name {name!r} is taken or not of the form {_HOST_NAME.pattern}")
        unknown = [s for s in subnets if s not in self.subnets]
        if not subnets or unknown or len(set(subnets)) != len(subnets):
            raise ValueError(f"subnets must be distinct names from {list(self.subnets)}, got {list(subnets)}")
        number, self._added = self._added, self._added + 1
        ns = f"{self.prefix}-{name}"
        host = Host(name, ns, {}, {}, {}, self._processes)
        router_lines: list[str] = []
        host_lines = ["link set lo up"]
        for i, subnet in enumerate(subnets):
            net4, net6 = self.subnets[subnet]
            ip4, ip6 = addresses(subnet, FIRST_HOST_NUMBER + self._joined[subnet])
            self._joined[subnet] += 1
            ifname, port = f"eth{i}", f"h{number}e{i}"  # the router's side: unique within its namespace
            host.interfaces[subnet], host.addr4[subnet], host.addr6[subnet] = ifname, str(ip4), str(ip6)
            router_lines += [
                f"link add {port} type veth peer name {ifname} netns {ns}",
                f'link set {port} master br-{subnet} alias "{name} {ifname}" up',
            ]
            host_lines += [
                f"addr add {ip4}/{net4.prefixlen} dev {ifname}",
                f"addr add {ip6}/{net6.prefixlen} dev {ifname} nodad",
                f"link set {ifname} up",
            ]
        gateway4, gateway6 = router.addr4[subnets[0]], router.addr6[subnets[0]]
        host_lines += [
            f"route add default via {gateway4} dev eth0",
            f"route add default via {gateway6} dev eth0",
        ]
        self.namespaces.append(ns)
        _ip_batch([f"netns add {ns}", f"netns exec {ns} sysctl -qw {' '.join(_HOST_SYSCTLS)}"])
        _ip_batch(router_lines, router.ns)
        _ip_batch(host_lines, ns)
        self.hosts[name] = host
        return host

    def iperf3(self, server: Host, client: Host, subnet: str, **options: Any) -> TransferResult:
        """The module's iperf3(), for callers that hold the network rather than the function."""
        return iperf3(server, client, subnet, **options)

    def tcp_transfer(
        self, server: Host, client: Host, subnet: str, nbytes: int, ipv6: bool = False
    ) -> TransferResult:
        return tcp_transfer(server, client, subnet, nbytes, ipv6)

    def close(self) -> None:
        """Stop every process started here, delete every namespace; raise if one survives. Idempotent."""
        _stop(self._processes)
        self._processes.clear()
        survivors = _remove_namespaces(self.namespaces)
        self.namespaces = survivors
        self._router = None
        if survivors:
            raise TestNetError(f"could not delete network namespaces {survivors}")


_next_port = iter(range(5201, 65535))


def iperf3(
    server: Host,
    client: Host,
    subnet: str,
    seconds: float = 3,
    ipv6: bool = False,
    reverse: bool = False,
    port: int | None = None,
) -> TransferResult:
    """Measure TCP from `client` to `server`'s address on `subnet` (from server to client if `reverse`)."""
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"iperf3 runs whole seconds (its -t takes an integer), got {seconds}")
    address, family = server.address(subnet, ipv6), "-6" if ipv6 else "-4"
    port = port or next(_next_port)
    daemon = server.popen(
        "iperf3", "-s", "-1", family, "-B", address, "-p", port, "--forceflush",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        _wait_for_output(daemon, b"Server listening", timeout=10)
        flags = [family, "-J", *(["-R"] if reverse else [])]
        result = client.run("iperf3", "-c", address, "-p", port, "-t", int(seconds), *flags,
                            check=False, timeout=seconds + 30)  # fmt: skip
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError:
            raise CommandFailed(result.returncode, "iperf3 -c", result.stdout, result.stderr) from None
        if "error" in report:
            raise TestNetError(f"iperf3 {client.name} -> {server.name} {address}: {report['error']}")
        sent, received = report["end"]["sum_sent"], report["end"]["sum_received"]
        return TransferResult(int(sent["bytes"]), int(received["bytes"]), float(received["seconds"]))
    finally:
        server.stop(daemon)


def tcp_transfer(server: Host, client: Host, subnet: str, nbytes: int, ipv6: bool = False) -> TransferResult:
    """Send `nbytes` over one plain TCP connection from `client` to `server`'s address on `subnet`."""
    address = server.address(subnet, ipv6)
    sink = server.python_popen(__file__, "sink", address, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        port = int(_wait_for_output(sink, b"\n", timeout=10).split()[-1])
        sent = int(client.python(__file__, "source", address, port, nbytes, timeout=60).stdout)
        out, _ = sink.communicate(timeout=30)
        received, seconds = out.split()
        return TransferResult(sent, int(received), float(seconds))
    finally:
        server.stop(sink)


def _wait_for_output(proc: subprocess.Popen[Any], needle: bytes, timeout: float) -> bytes:
    """Read proc's stdout (a binary pipe) until `needle` shows up; return what was read."""
    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TestNetError(f"{proc.args!r} did not print {needle!r} within {timeout}s: {seen!r}")
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise TestNetError(
                    f"{proc.args!r} exited ({proc.wait()}) before printing {needle!r}: {seen!r}"
                )
            seen += chunk
    return seen


# --- helper program, run inside a namespace --------------------------------------------------------


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF


def _ping(address: str, count: int, timeout: float) -> int:
    v6 = ipaddress.ip_address(address).version == 6
    family, proto = (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    request, reply = (128, 129) if v6 else (8, 0)
    ident, payload, replies = os.getpid() & 0xFFFF, b"zonewatch testnet", 0
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        for seq in range(count):
            header = struct.pack("!BBHHH", request, 0, 0, ident, seq)
            if not v6:  # the kernel fills in ICMPv6 checksums, not ICMPv4 ones
                header = struct.pack("!BBHHH", request, 0, _checksum(header + payload), ident, seq)
            sock.sendto(header + payload, (address, 0))
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(2048)
                except TimeoutError:
                    break
                if not v6:
                    data = data[(data[0] & 0x0F) * 4 :]  # a raw IPv4 socket hands us the IP header too
                if len(data) < 8:
                    continue
                kind, _, _, got_ident, got_seq = struct.unpack("!BBHHH", data[:8])
                if (kind, got_ident, got_seq) == (reply, ident, seq):  # not our request, nor others' echoes
                    replies += 1
                    break
    return replies


def _sink(address: str) -> tuple[int, float]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((address, 0))
        listener.listen(1)
        print(listener.getsockname()[1], flush=True)
        conn, _ = listener.accept()
        with conn:
            start, total = time.monotonic(), 0
            while chunk := conn.recv(1 << 16):
                total += len(chunk)
            return total, time.monotonic() - start


def _source(address: str, port: int, nbytes: int) -> int:
    block, sent = b"\0" * (1 << 16), 0
    with socket.create_connection((address, port), timeout=30) as conn:
        while sent < nbytes:
            sent += conn.send(block[: nbytes - sent])
    return sent


def _main(argv: list[str]) -> None:
    command, *args = argv
    if command == "ping":
        print(_ping(args[0], int(args[1]), float(args[2])))
    elif command == "sink":
        received, seconds = _sink(args[0])
        print(received, seconds)
    elif command == "source":
        print(_source(args[0], int(args[1]), int(args[2])))
    else:
        raise SystemExit(f"unknown helper command {command!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])


_T = TypeVar("_T")
_CLONE_NEWNET = 0x40000000


def in_netns(target: Host | str, action: Callable[[], _T]) -> _T:
    """Run ``action`` in a thread that joined a host's namespace; sockets it opens stay there.

    For code that must run in-process (a capture engine, a socket under test) rather than in a
    child started with ``ip netns exec``: setns() moves only the calling thread.
    """
    namespace = target if isinstance(target, str) else target.ns
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: dict[str, Any] = {}

    def enter_and_run() -> None:
        try:
            fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            outcome["value"] = action()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=enter_and_run)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: _T = outcome["value"]
    return value
