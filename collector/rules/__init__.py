"""The collector's rule engine: Sigma rules (one per file) compiled to Python matchers and windows.

A pure library: it reads rule files and turns events (flat dicts, see ``fields``) into matches; it never
touches the database or gRPC. ``load`` reads and checks rule files (``locate`` maps problems to lines),
``compile`` turns detections into Python functions (``values`` says what a value test means),
``correlate`` keeps the windows of correlation rules, ``engine`` routes events to rules and ``samples``
runs the sample events every rule ships with.
"""

from __future__ import annotations

from pathlib import Path

from collector.errors import CollectorError


class RuleError(CollectorError):
    """A rule file is wrong; names the file and the line to fix (1-based)."""

    def __init__(self, path: str | Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line
        self.message = message
