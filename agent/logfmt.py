"""Log events for both programs: one line each on stderr, and no secret in any of them.

Under systemd, stderr goes to journald, and from there often to a log shipper or a SIEM: each event
must be one line (a traceback spread over twenty lines becomes twenty unrelated entries), machine
readable, and keep its level. So, unless told otherwise, events are JSON objects when stderr is not a
terminal, and readable text on one. When stderr is the very stream journald handed us
(``JOURNAL_STREAM``), every line starts with the sd-daemon priority ``<N>`` (sd-daemon(3)): journald
strips it and files the entry at that level instead of "info" for everything.

Secrets never reach a line, whatever a call site passes: the handler's filter rewrites each record
before it is formatted, removing enrollment tokens (``zwt_…``), PEM private-key blocks, and any
value registered at run time with ``register_secret`` (a token given on the command line, ...).

This module is shared by the agent and the collector, and the agent's ``run`` starts without
OpenSSL's Python bindings (agent/entry.py): only the standard library's lightest modules here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("auto", "json", "text")
FORMAT_HELP = (
    "log events on stderr as one JSON object per line or as text (default auto: json when stderr is "
    "not a terminal or runs under journald, text on a terminal)"
)
# Enrollment tokens (collector/pki.py TOKEN_PREFIX; the agent does not import the collector).
_TOKEN = re.compile(r"zwt_[A-Za-z0-9_-]+")
# A PEM private key, also one cut short (no END line) and one whose newlines were escaped.
_PEM_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S
)
_KEY_WORDS = re.compile(r"PRIVATE KEY")
REDACTED = "[redacted]"
MIN_SECRET_LEN = 6  # shorter values would blank out ordinary words

# syslog priorities (sd-daemon(3)): crit, err, warning, info, debug.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
# Attributes every LogRecord has: anything else on a record came from ``extra=`` and is logged too.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

_secrets: set[str] = set()
_in_force = "text"  # the format configure() chose: report_error() follows it
_settings: dict[str, Any] | None = None  # configure()'s arguments, for a child process (current())


def register_secret(value: str) -> None:
    """Never show ``value`` in a log line (nor in report_error's line) from now on."""
    value = value.strip()
    if len(value) >= MIN_SECRET_LEN:
        _secrets.add(value)


def redact(text: str) -> str:
    """``text`` without tokens, private keys or registered secrets."""
    for secret in sorted(_secrets, key=len, reverse=True):  # longest first: one may contain another
        if secret in text:
            text = text.replace(secret, REDACTED)
    if "-----BEGIN" in text:
        text = _PEM_KEY.sub("[redacted key]", text)
    if "PRIVATE KEY" in text:  # a fragment of one (a header quoted in an error): say nothing of it
        text = _KEY_WORDS.sub("[redacted key]", text)
    if "zwt_" in text:
        text = _TOKEN.sub("zwt_" + REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """At the handler: the message, its extra fields and its traceback are cleaned before formatting."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a filter runs before emit's handleError: never raise to the caller
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in extra_fields(record).items():
            if isinstance(value, str):
                setattr(record, name, redact(value))
            elif not isinstance(value, int | float | bool | type(None)):
                dumped = json.dumps(value, ensure_ascii=False, default=str)
                if (cleaned := redact(dumped)) != dumped:  # else it stays a list or object in the event
                    setattr(record, name, cleaned)
        return True


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")}


def priority(levelno: int) -> int:
    for threshold, value in _PRIORITIES:
        if levelno >= threshold:
            return value
    return 7  # debug


class JsonFormatter(logging.Formatter):
    """One JSON object per event: ts (UTC, ms), level, logger, msg, the extra fields, exc."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in extra_fields(record).items():
            event.setdefault(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            event["exc"] = record.exc_text
        if record.stack_info:
            event["stack"] = record.stack_info
        # json.dumps escapes newlines inside strings: an event never spans lines.
        line = json.dumps(event, ensure_ascii=False, default=str)
        return f"<{priority(record.levelno)}>{line}" if self._journald else line


class TextFormatter(logging.Formatter):
    """For a person at a terminal: time, level, logger, message, then the extra fields as key=value."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = extra_fields(record)
        if extras:
            first, newline, rest = text.partition("\n")
            shown = " ".join(f"{k}={v}" for k, v in extras.items())
            text = f"{first} {shown}{newline}{rest}"
        if self._journald:
            # Each line becomes its own journal entry: each keeps the event's level.
            prefix = f"<{priority(record.levelno)}>"
            text = "\n".join(prefix + line for line in text.split("\n"))
        return text


def under_journald(journal_stream: str | None, stream: TextIO) -> bool:
    """Is ``stream`` the one systemd connected to journald? JOURNAL_STREAM is "device:inode" of it
    (systemd.exec(5)); a stream redirected elsewhere since (a pipe, a file) must not get prefixes."""
    if not journal_stream:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False  # not a real file descriptor (a test's capture)
    return journal_stream.strip() == f"{st.st_dev}:{st.st_ino}"


def choose(requested: str, journal_stream: str | None, stream: TextIO) -> str:
    """The format in force: what was asked for, or for "auto" json unless a person is watching."""
    if requested in ("json", "text"):
        return requested
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    return "json" if journal_stream or not terminal else "text"


def configure(
    requested: str = "text",
    *,
    verbose: bool = False,
    journal_stream: str | None = None,
    stream: TextIO | None = None,
) -> str:
    """Send every log event of the process to ``stream`` (stderr) in the requested format; returns
    the format in force. The CLI passes ``journal_stream`` from the environment (only the CLI reads it).
    Called again (tests run main() in-process), it replaces its previous handler."""
    global _in_force, _settings
    stream = stream if stream is not None else sys.stderr
    chosen = choose(requested, journal_stream, stream)
    journald = under_journald(journal_stream, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(journald) if chosen == "json" else TextFormatter(journald))
    handler.addFilter(RedactSecrets())
    handler.set_name("zonewatch")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "zonewatch"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)  # a warnings.warn() is an event too, not a multi-line printout
    _in_force = chosen
    if stream is sys.stderr:
        _settings = {"requested": chosen, "verbose": verbose, "journal_stream": journal_stream}
    return chosen


def current() -> dict[str, Any] | None:
    """How this process logs to stderr, for a child process (which shares the stderr) to do the same
    with ``configure(**current())``; None when configure() was never called (a library caller)."""
    return None if _settings is None else dict(_settings)


def report_error(program: str, message: str) -> None:
    """A command's last word when it fails (exit status 2): the usual one-line ``program: error: …``,
    or, when stderr carries JSON events, one more event, so every line stays parseable."""
    if _in_force == "json":
        logging.getLogger(program).error(message, extra={"exit_status": 2})
    else:
        print(f"{program}: error: {redact(message)}", file=sys.stderr)


def add_format_option(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` for a long-running command (both programs offer the same one)."""
    parser.add_argument("--log-format", choices=FORMATS, default="auto", help=FORMAT_HELP)
