"""An incident change as an RFC 5424 syslog message and as a JSON line (the mapping: docs/siem.md).

Syslog: PRI from the incident's severity and the configured facility, VERSION 1, TIMESTAMP of the
change (RFC 3339, milliseconds, UTC "Z"), HOSTNAME the collector's, APP-NAME zonewatch, PROCID the
collector's pid, MSGID the change (raised, matched, or the operator's action), one SD-ELEMENT with
the incident's fields, and MSG (UTF-8 with a BOM, §6.4) a line for people. A message is at most
MAX_MESSAGE_BYTES: only the MSG is cut to fit. The structured data is never cut as a whole; each of
its values is bounded (MAX_PARAM_BYTES) so that it always fits, whatever the MSG.
"""

from __future__ import annotations

import json
import os
import re
import socket
from datetime import UTC, datetime
from typing import Any

from collector.siem import SiemError
from collector.store.export import ExportedChange

APP_NAME = "zonewatch"
JSON_SCHEMA = "zonewatch.incident/1"
# RFC 5425 §4.3.1: receivers SHOULD be able to take 8192 octets; RFC 5424 §6.1 requires only 480.
MAX_MESSAGE_BYTES = 8192
# A structured-data value, escaped, at most this long: 23 such parameters and the header stay under
# 7.4 KB, so the MSG always has room. Ingest limits names to 128-253 characters; a longer value is
# cut at a character boundary and ends in "…".
MAX_PARAM_BYTES = 256
MAX_KEY_PARAMS = 6  # dedup fields in the structured data (all of them are in the JSON)
BOM = b"\xef\xbb\xbf"
_NOT_SD_NAME = re.compile(r"[^!#-<>-\\^-~]")
ELLIPSIS = "…"

# zonewatch severity -> syslog severity (RFC 5424 §6.2.1, Table 2)
SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5, "informational": 6}
SEVERITY_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13, "alert": 14, "clock": 15,
    **{f"local{n}": 16 + n for n in range(8)},
}  # fmt: skip


def parse_facility(text: str) -> int:
    """A facility by name (local0, authpriv, ...) or number (0-23)."""
    cleaned = text.strip().lower()
    if cleaned in FACILITIES:
        return FACILITIES[cleaned]
    if cleaned.isdigit() and int(cleaned) <= 23:
        return int(cleaned)
    raise SiemError(f"unknown syslog facility {text!r}: use 0-23 or a name ({', '.join(FACILITIES)})")


def facility_name(number: int) -> str:
    return next((name for name, n in FACILITIES.items() if n == number), str(number))


def rfc3339(ms: int) -> str:
    """2026-11-28T07:00:00.123Z (RFC 5424 §6.2.3: TIME-SECFRAC, and Z for UTC)."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def local_hostname() -> str:
    return socket.gethostname()


def syslog_hostname(name: str) -> str:
    """HOSTNAME is 1-255 printable US-ASCII characters (§6.2.4): a non-ASCII name in its IDNA form."""
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        ascii_name = name.encode("ascii", "replace").decode("ascii")
    cleaned = "".join(c if 33 <= ord(c) <= 126 else "-" for c in ascii_name)[:255]
    return cleaned or "-"


def escape_param(value: str) -> str:
    """§6.3.3: '"', '\\' and ']' in a PARAM-VALUE are escaped with a backslash."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _bounded_param(value: str) -> str:
    escaped = escape_param(value)
    if len(escaped.encode("utf-8")) <= MAX_PARAM_BYTES:
        return escaped
    room = MAX_PARAM_BYTES - len(ELLIPSIS.encode("utf-8"))
    kept = ""
    for char in value:  # cut the value, not its escaping: a "\\" never loses its partner
        if len(escape_param(kept + char).encode("utf-8")) > room:
            break
        kept += char
    return escape_param(kept) + ELLIPSIS


def _param_name(name: str) -> str:
    """SD-NAME (§6.3.2): 1-32 printable US-ASCII characters but '=', ' ', ']' and '"'."""
    return _NOT_SD_NAME.sub("_", name)[:32] or "_"


def structured_data(sd_id: str, params: list[tuple[str, Any]]) -> str:
    """One SD-ELEMENT; empty values are left out (absent, not "")."""
    rendered = "".join(
        f' {_param_name(name)}="{_bounded_param(str(value))}"'
        for name, value in params
        if value not in ("", None)
    )
    return f"[{sd_id}{rendered}]"


def cut_utf8(text: str, max_bytes: int) -> bytes:
    """text in UTF-8, at most max_bytes, cut at a character boundary and ending in "…" when cut."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return data
    ellipsis = ELLIPSIS.encode("utf-8")
    if max_bytes < len(ellipsis):
        return b""
    return data[: max_bytes - len(ellipsis)].decode("utf-8", "ignore").encode("utf-8") + ellipsis


def message(
    *,
    severity: int,
    facility: int,
    time_ms: int,
    hostname: str,
    msgid: str,
    sd: str,
    text: str,
    procid: int | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> bytes:
    """One SYSLOG-MSG (RFC 5424 §6): the MSG is cut to fit max_bytes, the header and SD never."""
    pri = facility * 8 + severity
    header = (
        f"<{pri}>1 {rfc3339(time_ms)} {syslog_hostname(hostname)} {APP_NAME} "
        f"{os.getpid() if procid is None else procid} {msgid[:32] or '-'} {sd}"
    ).encode()
    room = max_bytes - len(header) - 1 - len(BOM)
    return header + b" " + BOM + cut_utf8(text, max(room, 0))


def incident_params(change: ExportedChange) -> list[tuple[str, Any]]:
    d = change.document
    last = d["actions"][-1] if d["actions"] and change.change not in ("raised", "matched") else None
    keys = sorted((d.get("dedup_fields") or {}).items())[:MAX_KEY_PARAMS]
    return [
        ("id", d["id"]),
        ("change", change.change),
        ("changeSeq", change.seq),
        ("severity", d["severity"]),
        ("status", d["status"]),
        ("rule", d["rule"]),
        ("ruleId", d["rule_id"]),
        ("count", d["matches"]),
        ("firstSeen", rfc3339(d["first_seen_ms"])),
        ("lastSeen", rfc3339(d["last_seen_ms"])),
        ("agentId", d["agent_id"]),
        ("host", d["hostname"]),
        ("department", d["department"]),
        ("county", d["county"]),
        ("site", d["site"]),
        ("role", d["role"]),
        ("actor", last["actor"] if last else ""),
        *((f"key.{name}", _plain(value)) for name, value in keys),
    ]


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def incident_text(change: ExportedChange) -> str:
    """The MSG: what an analyst reads first."""
    d = change.document
    where = " ".join(part for part in (d["department"], d["county"]) if part)
    host = d["hostname"] + (f" ({where})" if where else "") if d["hostname"] else "the collector"
    text = (
        f"{d['title']} | incident {d['id']} {d['severity']} {d['status'].replace('_', ' ')}, "
        f"{d['matches']} match{'' if d['matches'] == 1 else 'es'}, {host}"
    )
    if change.change not in ("raised", "matched") and d["actions"]:
        last = d["actions"][-1]
        text += f" | {last['action'].replace('_', ' ')} by {last['actor']}"
        if last["comment"]:
            text += f": {last['comment']}"
    return text


def syslog_incident(
    change: ExportedChange, *, hostname: str, facility: int, sd_id: str, max_bytes: int = MAX_MESSAGE_BYTES
) -> bytes:
    d = change.document
    return message(
        severity=SEVERITY.get(d["severity"], 5),
        facility=facility,
        time_ms=d["updated_ms"] or d["last_seen_ms"],
        hostname=hostname,
        msgid=change.change,
        sd=structured_data(sd_id, incident_params(change)),
        text=incident_text(change),
        max_bytes=max_bytes,
    )


def syslog_test(*, hostname: str, facility: int, sd_id: str, time_ms: int) -> bytes:
    """`siem test`: a notice with MSGID "test" a receiver's rules can tell from an incident."""
    return message(
        severity=5,
        facility=facility,
        time_ms=time_ms,
        hostname=hostname,
        msgid="test",
        sd=structured_data(sd_id, [("test", 1)]),
        text=f"zonewatch SIEM export test from {hostname} at {rfc3339(time_ms)}",
    )


def frame(msg: bytes) -> bytes:
    """RFC 6587 §3.4.1 octet counting (and RFC 5425 §4.3): MSG-LEN SP SYSLOG-MSG."""
    return b"%d %s" % (len(msg), msg)


def json_document(change: ExportedChange, *, hostname: str) -> dict[str, Any]:
    """The JSON line's object: the change, then `incidents show --format json`'s document as it is."""
    d = change.document
    return {
        "schema": JSON_SCHEMA,
        "change": change.change,
        "change_seq": change.seq,
        "time": rfc3339(d["updated_ms"] or d["last_seen_ms"]),
        "collector": hostname,
        **d,
    }


def json_line(change: ExportedChange, *, hostname: str) -> bytes:
    text = json.dumps(json_document(change, hostname=hostname), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8") + b"\n"
