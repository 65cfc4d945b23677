"""The agent's configuration: one frozen object built from a TOML file and flags.

Only the CLI calls load_config; nothing else reads files or the environment.
Precedence: flag > file > default. Interval and interfaces are defaults until
the collector's policy arrives: the collector owns policy. An enrolled agent's
collector address defaults to the one it enrolled with (``collector_default``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_COLLECTOR = "127.0.0.1:7390"
DEFAULT_STATE_DIR = Path("/var/lib/zonewatch-agent")
DEFAULT_CONFIG = Path("/etc/zonewatch/agent.toml")
LABELS = ("department", "county", "site", "role")
ZONE_ACCOUNTING = ("auto", "nftables", "capture", "off")
DEFAULT_ADMIN_PORTS = (
    "ssh=22,telnet=23,rdp=3389,vnc=5900,vnc=5901,mysql=3306,postgresql=5432,mssql=1433,oracle=1521,"
    "redis=6379,mongodb=27017"
)
_SERVICE_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}", re.IGNORECASE | re.ASCII)


def parse_admin_ports(text: str) -> dict[int, str]:
    """Text like "ssh=22,rdp=3389" as {22: "ssh", 3389: "rdp"}: a name may have several ports, a port
    one name. Names are lower-cased (rules match them as the collector stores them)."""
    ports: dict[int, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, port = (part.strip() for part in item.partition("="))
        name = name.lower()
        number = int(port) if port.isascii() and port.isdigit() else 0
        if not sep or not _SERVICE_NAME.fullmatch(name) or not 0 < number < 65536:
            raise ConfigError(
                f"admin_ports: {item!r} is not NAME=PORT (NAME: letters, digits, _ . -; PORT: 1..65535),"
                ' e.g. "ssh=22,rdp=3389"'
            )
        if ports.get(number, name) != name:
            raise ConfigError(f"admin_ports: port {number} is named both {ports[number]} and {name}")
        ports[number] = name
    return ports


@dataclass(frozen=True)
class AgentConfig:
    collector: str = DEFAULT_COLLECTOR
    state_dir: Path = DEFAULT_STATE_DIR
    interval_s: float = 10.0
    interfaces: tuple[str, ...] = ()
    department: str = ""
    county: str = ""
    site: str = ""
    role: str = ""
    hostname: str = field(default_factory=lambda: os.uname().nodename)
    spool_max_bytes: int = 256 * 1024 * 1024
    # How to count bytes per zone once the collector sends a zone catalog: "nftables"
    # (kernel counters in a table of our own, removed on exit; exact at any rate; needs
    # CAP_NET_ADMIN), "capture" (from the packet capture on the watched interfaces; needs
    # CAP_NET_RAW; samples under overload), "auto" (nftables where the host offers it,
    # else capture) or "off". In the file, true means "auto" and false "off".
    zone_accounting: str = "auto"
    # Capture packets on the watched interfaces and report flows with their owning process.
    # Needs CAP_NET_RAW.
    flows: bool = True
    # A flow with no packet for this long is closed and reported; one active longer is
    # reported every flow_active_timeout_s while it runs.
    flow_idle_timeout_s: float = 30.0
    flow_active_timeout_s: float = 120.0
    # Report the host's addresses, routes (with policy rules), DNS resolvers and OS: the evidence of
    # whether it left its dedicated network. Needs the ip command (iproute2 >= 4.17).
    inventory: bool = True
    # Summarize, per peer and window, the connection attempts that came in and went out and how
    # they failed (the evidence of port scans and brute force), from the packet capture: turns the
    # capture on even with flows off. Needs CAP_NET_RAW.
    access: bool = True
    # Admin services whose attempts are summarized apart, port -> name; in the file and flags
    # "name=port,..." (a name may have several ports).
    admin_ports: Mapping[int, str] = field(default_factory=lambda: parse_admin_ports(DEFAULT_ADMIN_PORTS))
    # Report listening TCP and UDP sockets with their program: all at start, then opened and closed.
    listeners: bool = True
    # Seconds between two reads of the socket tables for listeners.
    listener_interval_s: float = 10.0
    # Batches sent ahead of their acks on one stream.
    window: int = 32
    # A stream whose oldest unacked batch waits longer than this is torn down and retried.
    ack_timeout_s: float = 30.0
    # Plaintext gRPC and a random agent id kept in the state directory: for a lab collector
    # without TLS only. Otherwise the agent runs only once enrolled (mTLS, id = its key).
    insecure: bool = False
    # The agent's own budget (agent.selfwatch): CPU in percent of one core over budget_window_s,
    # and RSS in MB; over it the agent degrades step by step instead of being killed. 0: not watched.
    cpu_budget_percent: float = 1.0
    rss_budget_mb: float = 40.0
    budget_window_s: float = 30.0

    @property
    def spool_path(self) -> Path:
        return self.state_dir / "spool.db"

    @property
    def labels(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in LABELS}


_FILE_KEYS = {
    "collector": str,
    "state_dir": str,
    "interval": (int, float),
    "interfaces": list,
    "hostname": str,
    "spool_max_mb": int,
    "zone_accounting": (bool, str),
    "flows": bool,
    "flow_idle_timeout": (int, float),
    "flow_active_timeout": (int, float),
    "inventory": bool,
    "access": bool,
    "admin_ports": str,
    "listeners": bool,
    "listener_interval": (int, float),
    "insecure": bool,
    "cpu_budget": (int, float),
    "rss_budget_mb": (int, float),
    "budget_window": (int, float),
}


def load_config(
    path: Path | None,
    overrides: Mapping[str, Any],
    collector_default: Callable[[AgentConfig], str | None] | None = None,
) -> AgentConfig:
    """Build the config from `path` (if given, or the default file if it exists) and flag overrides.

    When neither names the collector, ``collector_default`` (given the config so far) may supply one,
    e.g. the address recorded at enrollment; else it is DEFAULT_COLLECTOR.
    """
    values: dict[str, Any] = {}
    if path is not None or DEFAULT_CONFIG.exists():
        values = _read_file(path or DEFAULT_CONFIG)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(values.get("admin_ports"), str):
        values["admin_ports"] = parse_admin_ports(values["admin_ports"])
    config = AgentConfig()
    known = {f.name for f in fields(AgentConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    config = replace(config, **values)
    if "collector" not in values and collector_default is not None:
        config = replace(config, collector=collector_default(config) or DEFAULT_COLLECTOR)
    if config.zone_accounting not in ZONE_ACCOUNTING:
        raise ConfigError(
            f"zone_accounting must be one of {', '.join(ZONE_ACCOUNTING)}, got {config.zone_accounting!r}"
        )
    if not config.interval_s > 0:
        raise ConfigError(f"interval must be > 0 seconds, got {config.interval_s}")
    if not config.listener_interval_s > 0:
        raise ConfigError(f"listener_interval must be > 0 seconds, got {config.listener_interval_s}")
    if not (config.cpu_budget_percent >= 0 and config.rss_budget_mb >= 0 and config.budget_window_s > 0):
        raise ConfigError(
            "cpu_budget and rss_budget_mb must be >= 0 (0: not watched) and budget_window > 0 seconds,"
            f" got {config.cpu_budget_percent}, {config.rss_budget_mb}, {config.budget_window_s}"
        )
    check_address(config.collector)
    return config


def check_address(target: str) -> None:
    """HOST:PORT or [IPv6]:PORT with a port in 1..65535: gRPC would quietly default a missing port to 443."""
    host, sep, port = target.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (
        not sep
        or not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or (":" in host and not bracketed)
    ):
        raise ConfigError(f"collector must be HOST:PORT or [IPv6]:PORT, got {target!r}")


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    values: dict[str, Any] = {}
    labels = data.pop("labels", {})
    if not isinstance(labels, dict):
        raise ConfigError(f"{path}: [labels] must be a table")
    for name, value in labels.items():
        if name not in LABELS:
            raise ConfigError(f"{path}: unknown label {name!r} (known: {', '.join(LABELS)})")
        if not isinstance(value, str):
            raise ConfigError(f"{path}: label {name} must be a string")
        values[name] = value
    for key, value in data.items():
        expected = _FILE_KEYS.get(key)
        if expected is None:
            raise ConfigError(
                f"{path}: unknown key {key!r} (known: {', '.join(sorted(_FILE_KEYS))}, [labels])"
            )
        # bool is an int to Python, never a number or a name to an admin.
        if not isinstance(value, expected) or (  # type: ignore[arg-type]
            isinstance(value, bool) and expected is not bool and bool not in expected  # type: ignore[operator]
        ):
            raise ConfigError(f"{path}: {key} has the wrong type ({type(value).__name__})")
        if key == "interfaces" and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: interfaces must be a list of interface names (strings)")
        if key == "interval":
            values["interval_s"] = float(value)
        elif key == "interfaces":
            values["interfaces"] = tuple(value)
        elif key == "state_dir":
            values["state_dir"] = Path(value)
        elif key in ("flow_idle_timeout", "flow_active_timeout", "listener_interval", "budget_window"):
            values[f"{key}_s"] = float(value)
        elif key == "cpu_budget":
            values["cpu_budget_percent"] = float(value)
        elif key == "rss_budget_mb":
            values[key] = float(value)
        elif key == "spool_max_mb":
            values["spool_max_bytes"] = value * 1024 * 1024
        elif key == "admin_ports":
            try:
                values[key] = parse_admin_ports(value)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        elif key == "zone_accounting" and isinstance(value, bool):
            values[key] = "auto" if value else "off"
        else:
            values[key] = value
    return values
