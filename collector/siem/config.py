"""Where incidents are exported to, and in which form: frozen records the CLI builds."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from collector.siem import SiemError

SCHEMES = ("tcp", "tls")
# RFC 5424 has no well-known port for syslog over plain TCP; 6514 is RFC 5425's for TLS.
DEFAULT_PORTS = {"tcp": 514, "tls": 6514}
# 32473 is the example private enterprise number of RFC 5612 (for documentation): a site with its own
# number says so with --siem-sd-id.
DEFAULT_SD_ID = "zonewatch@32473"
# local0: see docs/siem.md ("Facility") for why not authpriv.
DEFAULT_FACILITY = 16
# RFC 5424 §6.3.2: SD-NAME is 1-32 printable US-ASCII characters but '=', ' ', ']' and '"'; an SD-ID
# without '@' is reserved for IANA-registered names, so ours is NAME@ENTERPRISE-NUMBER.
_SD_ID = re.compile(r"[!#-<>-\\^-~]{1,32}")


@dataclass(frozen=True)
class SyslogTarget:
    """A syslog receiver: tcp://HOST:PORT (plain TCP) or tls://HOST:PORT (RFC 5425)."""

    scheme: str
    host: str
    port: int
    # CA certificates (PEM) to verify a TLS receiver with; None: the system's trusted CAs.
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class SiemConfig:
    """serve's SIEM export; nothing is exported when both destinations are None."""

    syslog: SyslogTarget | None = None
    jsonl: Path | None = None
    # Syslog facility (RFC 5424 §6.2.1), 0-23.
    facility: int = DEFAULT_FACILITY
    # The SD-ID of the incident's structured data (RFC 5424 §6.3.2).
    sd_id: str = DEFAULT_SD_ID
    # HOSTNAME in syslog, "collector" in JSON; "": this machine's name.
    hostname: str = ""
    # How often the exporter looks for incident changes when it has none to send.
    interval_s: float = 1.0
    # Incident changes per delivery at most: bounds one batch's bytes and the time to resend it.
    batch_size: int = 500
    # The longest wait between two attempts on a failing destination (backoff with jitter up to it).
    retry_max_s: float = 30.0
    # Connect, write and acknowledgement each time out after this long: a stuck receiver is an error.
    timeout_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return self.syslog is not None or self.jsonl is not None


def parse_syslog_url(text: str, ca_file: Path | None = None) -> SyslogTarget:
    """tcp://HOST:PORT or tls://HOST:PORT ([v6] in brackets; the port defaults to 514 and 6514)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as exc:
        raise SiemError(f"malformed syslog URL {text!r}: {exc}") from None
    if parts.scheme not in SCHEMES or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise SiemError(f"malformed syslog URL {text!r}: use tcp://HOST:PORT or tls://HOST:PORT")
    if ca_file is not None and parts.scheme != "tls":
        raise SiemError(f"--siem-ca is for a tls:// receiver, not {text!r}")
    if ca_file is not None and not ca_file.is_file():
        raise SiemError(f"--siem-ca {ca_file}: no such file")
    return SyslogTarget(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme], ca_file)


def parse_sd_id(text: str) -> str:
    """NAME@ENTERPRISE-NUMBER, e.g. zonewatch@32473."""
    name, at, number = text.partition("@")
    if (
        not _SD_ID.fullmatch(text)
        or not at
        or not name
        or not re.fullmatch(r"[1-9][0-9]*(\.[0-9]+)*", number)
    ):
        raise SiemError(
            f"malformed SD-ID {text!r}: use NAME@ENTERPRISE-NUMBER (at most 32 printable ASCII characters "
            'without = ] " or spaces), e.g. zonewatch@32473'
        )
    return text
