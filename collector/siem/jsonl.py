"""A JSON lines file the exporter appends to: delivered means written, flushed and fsynced.

The file may be rotated under us (logrotate moves it away, or deletes it): before every batch the
path is compared with the open file (device and inode), and a moved or missing file is closed and
the path opened again, created 0600 (incidents carry evidence) with its directory fsynced so the
new name survives a crash too. A crash in the middle of a write can leave a last line without its
newline: a newline is added before appending to such a file, so that torn line stays on its own
and every later line is whole.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.atomicfile import fsync_directory
from collector.siem import DeliveryError


class JsonLinesFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None

    def write(self, lines: list[bytes]) -> int:
        """Append the lines (each ending in a newline) durably; the bytes written."""
        data = b"".join(lines)
        try:
            fd = self._current()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            self.close()
            raise DeliveryError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        return len(data)

    def _current(self) -> int:
        if self._fd is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    return self._fd
            except FileNotFoundError:
                pass
            self.close()  # rotated away or removed: write to the path again
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                os.write(fd, b"\n")  # a torn last line (a crash mid-write) stays a line of its own
            if created:
                fsync_directory(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)
        return fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
