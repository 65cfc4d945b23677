"""The spool against real SQLite files: ordering, numbering, bounds, drop reports, crashes."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import AgentError, SpoolError
from agent.spool import DropReport, Spool, SpooledBatch, SpoolStats

REPO_ROOT = Path(__file__).resolve().parents[2]


def batch(
    size: int = 10, facts: int = 1, first_ms: int = 1_000, last_ms: int = 2_000
) -> Callable[[int], tuple[bytes, int, int, int]]:
    """A build() whose payload embeds its seq, padded to exactly ``size`` bytes."""

    def build(seq: int) -> tuple[bytes, int, int, int]:
        payload = f"seq={seq};".encode().ljust(size, b".")
        assert len(payload) == size
        return payload, facts, first_ms, last_ms

    return build


def payload(seq: int, size: int = 10) -> bytes:
    return f"seq={seq};".encode().ljust(size, b".")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.db"


def test_append_pending_acknowledge_roundtrip(path: Path) -> None:
    with Spool(path, clock_ms=lambda: 42) as spool:
        assert spool.append(batch(facts=3, first_ms=100, last_ms=200)) == 1
        assert spool.append(batch(facts=4, first_ms=200, last_ms=300)) == 2
        assert spool.append(batch(facts=5, first_ms=300, last_ms=400)) == 3

        assert spool.pending() == [
            SpooledBatch(1, payload(1), 3, 100, 200, 42),
            SpooledBatch(2, payload(2), 4, 200, 300, 42),
            SpooledBatch(3, payload(3), 5, 300, 400, 42),
        ]
        assert [b.seq for b in spool.pending(after_seq=1, limit=1)] == [2]
        assert [b.seq for b in spool.pending(after_seq=3)] == []

        assert spool.acknowledge(2) == 2
        assert [b.seq for b in spool.pending()] == [3]
        assert spool.stats() == SpoolStats(
            batches=1,
            bytes=10,
            oldest_seq=3,
            newest_seq=3,
            next_seq=4,
            dropped_batches_total=0,
            dropped_facts_total=0,
        )


def test_empty_spool_stats(path: Path) -> None:
    with Spool(path) as spool:
        assert spool.stats() == SpoolStats(0, 0, None, None, 1, 0, 0)
        assert spool.pending() == []
        assert spool.take_drop_report() is None


def test_seq_survives_reopen_and_is_never_reused(path: Path) -> None:
    with Spool(path) as spool:
        spool.append(batch())
        spool.append(batch())
        assert spool.acknowledge(2) == 2
        assert spool.stats().batches == 0

    with Spool(path) as spool:
        assert spool.pending() == []
        assert spool.append(batch()) == 3
        assert spool.pending()[0].payload == payload(3)


def test_acknowledge_is_idempotent(path: Path) -> None:
    with Spool(path) as spool:
        for _ in range(3):
            spool.append(batch())
        assert spool.acknowledge(2) == 2
        assert spool.acknowledge(2) == 0
        assert spool.acknowledge(1) == 0
        assert [b.seq for b in spool.pending()] == [3]
        assert spool.stats().bytes == 10


def test_discard_removes_exactly_one_batch(path: Path) -> None:
    with Spool(path) as spool:
        for size in (10, 20, 30):
            spool.append(batch(size=size))
        assert spool.discard(2) is True
        assert spool.discard(2) is False
        assert [b.seq for b in spool.pending()] == [1, 3]
        stats = spool.stats()
        assert (stats.batches, stats.bytes) == (2, 40)
        # Discarding a poison message is not a drop: the collector already knows it rejected it.
        assert spool.take_drop_report() is None
        assert stats.dropped_batches_total == 0


def test_full_spool_evicts_oldest_first_and_reports_exactly(path: Path) -> None:
    with Spool(path, max_bytes=100) as spool:
        spool.append(batch(size=40, facts=1, first_ms=1_000, last_ms=1_999))
        spool.append(batch(size=40, facts=2, first_ms=2_000, last_ms=2_999))
        # 40 + 40 + 40 > 100: batch 1 goes.
        spool.append(batch(size=40, facts=3, first_ms=3_000, last_ms=3_999))
        assert [b.seq for b in spool.pending()] == [2, 3]
        assert spool.take_drop_report() == DropReport(
            batches=1, facts=1, first_seq=1, last_seq=1, from_ms=1_000, to_ms=1_999
        )

        # 80 + 90 > 100: both 2 and 3 must go, and nothing more.
        spool.append(batch(size=90, facts=4, first_ms=4_000, last_ms=4_999))
        assert [b.seq for b in spool.pending()] == [4]
        assert spool.stats() == SpoolStats(
            batches=1,
            bytes=90,
            oldest_seq=4,
            newest_seq=4,
            next_seq=5,
            dropped_batches_total=3,
            dropped_facts_total=6,
        )
        assert spool.take_drop_report() == DropReport(
            batches=3, facts=6, first_seq=1, last_seq=3, from_ms=1_000, to_ms=3_999
        )


def test_exactly_full_spool_evicts_nothing(path: Path) -> None:
    with Spool(path, max_bytes=100) as spool:
        spool.append(batch(size=60))
        spool.append(batch(size=40))
        assert spool.stats().bytes == 100
        assert spool.take_drop_report() is None


def test_eviction_skips_acknowledged_and_discarded_numbers(path: Path) -> None:
    with Spool(path, max_bytes=100) as spool:
        for _ in range(4):
            spool.append(batch(size=25))
        spool.acknowledge(1)
        spool.discard(3)
        # Stored: 2 and 4 (50 bytes); 50 + 75 > 100 evicts 2 only.
        spool.append(batch(size=75, facts=7))
        assert [b.seq for b in spool.pending()] == [4, 5]
        report = spool.take_drop_report()
        assert report is not None
        assert (report.batches, report.first_seq, report.last_seq) == (1, 2, 2)


def test_clear_drop_report_keeps_drops_evicted_after_the_take(path: Path) -> None:
    with Spool(path, max_bytes=20) as spool:
        for ms in range(0, 3_000, 1_000):
            spool.append(batch(size=10, facts=2, first_ms=ms, last_ms=ms + 500))
        first = spool.take_drop_report()
        assert first == DropReport(1, 2, 1, 1, 0, 500)
        # Taking does not clear: a crash before clearing reports the same drops again.
        assert spool.take_drop_report() == first

        spool.append(batch(size=10, facts=5, first_ms=3_000, last_ms=3_500))
        spool.append(batch(size=10, facts=5, first_ms=4_000, last_ms=4_500))
        spool.clear_drop_report(first)

        second = spool.take_drop_report()
        assert second == DropReport(2, 4, 2, 3, 1_000, 2_500)
        spool.clear_drop_report(second)
        assert spool.take_drop_report() is None
        stats = spool.stats()
        assert (stats.dropped_batches_total, stats.dropped_facts_total) == (3, 6)


def test_drop_report_survives_reopen_until_cleared(path: Path) -> None:
    with Spool(path, max_bytes=10) as spool:
        spool.append(batch(size=10, facts=2, first_ms=10, last_ms=20))
        spool.append(batch(size=10, facts=3, first_ms=30, last_ms=40))
        report = spool.take_drop_report()
    assert report == DropReport(1, 2, 1, 1, 10, 20)

    with Spool(path, max_bytes=10) as spool:
        assert spool.take_drop_report() == report
        # A report taken before the reopen still clears exactly its own drops.
        spool.append(batch(size=10, facts=4, first_ms=50, last_ms=60))
        spool.clear_drop_report(report)
        assert spool.take_drop_report() == DropReport(1, 3, 2, 2, 30, 40)

    with Spool(path, max_bytes=10) as spool:
        assert spool.take_drop_report() == DropReport(1, 3, 2, 2, 30, 40)
        stats = spool.stats()
        assert (stats.dropped_batches_total, stats.dropped_facts_total) == (2, 5)


def test_oversize_batch_is_refused_and_nothing_changes(path: Path) -> None:
    with Spool(path, max_bytes=100) as spool:
        spool.append(batch(size=50))
        before = spool.stats()
        with pytest.raises(SpoolError, match=r"batch 2 is 101 bytes.*100 bytes") as caught:
            spool.append(batch(size=101))
        assert str(path) in str(caught.value)
        assert spool.stats() == before
        assert [b.seq for b in spool.pending()] == [1]
        assert spool.append(batch(size=50)) == 2


def test_failed_build_consumes_no_seq(path: Path) -> None:
    """The choice: a failed build rolls back its number, so the stream of numbers has no hole."""

    def failing_build(seq: int) -> tuple[bytes, int, int, int]:
        assert seq == 2
        raise ValueError("serializer broke")

    with Spool(path) as spool:
        spool.append(batch())
        with pytest.raises(ValueError, match="serializer broke"):
            spool.append(failing_build)
        assert spool.stats().next_seq == 2
        assert spool.append(batch()) == 2
        assert [b.payload for b in spool.pending()] == [payload(1), payload(2)]


def test_build_returning_text_is_a_type_error(path: Path) -> None:
    with Spool(path) as spool:
        with pytest.raises(TypeError, match="bytes"):
            spool.append(lambda seq: (f"seq={seq}", 1, 0, 0))  # type: ignore[arg-type, return-value]
        assert spool.stats().next_seq == 1


def test_append_survives_kill_9(path: Path) -> None:
    child = textwrap.dedent(
        """
        import sys, time
        from agent.spool import Spool

        spool = Spool(sys.argv[1])
        spool.append(lambda seq: (b"batch %d" % seq, 3, 10, 20))
        seq = spool.append(lambda seq: (b"batch %d" % seq, 4, 30, 40))
        print(seq, flush=True)
        time.sleep(60)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", child, str(path)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            line = proc.stdout.readline()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        errors = proc.stderr.read()
    assert line.strip() == "2", errors
    assert proc.returncode == -signal.SIGKILL

    with Spool(path) as spool:
        assert [(b.seq, b.payload, b.facts) for b in spool.pending()] == [
            (1, b"batch 1", 3),
            (2, b"batch 2", 4),
        ]
        assert spool.append(batch()) == 3


def test_spool_is_wal_with_full_sync(path: Path) -> None:
    with Spool(path) as spool:
        assert spool._db is not None
        # Per-connection setting, so read it from the spool's own connection: power loss cannot be
        # simulated in a test, this is what guards it.
        assert spool._db.execute("PRAGMA synchronous").fetchone() == (2,)
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)


@pytest.mark.parametrize(
    "make_path",
    [
        pytest.param(lambda tmp: tmp / "missing-dir" / "spool.db", id="missing directory"),
        pytest.param(lambda tmp: tmp / "not-a-dir" / "spool.db", id="parent is a file"),
    ],
)
def test_unopenable_path_is_a_one_line_spool_error(tmp_path: Path, make_path: Callable[[Path], Path]) -> None:
    (tmp_path / "not-a-dir").write_text("a file, not a directory")
    bad = make_path(tmp_path)
    with pytest.raises(SpoolError) as caught:
        Spool(bad)
    message = str(caught.value)
    assert str(bad) in message
    assert "\n" not in message
    assert isinstance(caught.value, AgentError)


def test_corrupt_file_is_a_spool_error(path: Path) -> None:
    path.write_bytes(b"this is not a database, " * 100)
    with pytest.raises(SpoolError, match=r"cannot open spool .*spool\.db: file is not a database"):
        Spool(path)


def test_newer_schema_is_refused(path: Path) -> None:
    Spool(path).close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(SpoolError, match="schema version 99, newer than this agent knows"):
        Spool(path)


def test_closed_spool_raises(path: Path) -> None:
    spool = Spool(path)
    spool.close()
    spool.close()
    with pytest.raises(SpoolError, match="is closed"):
        spool.append(batch())


def test_concurrent_appends_get_distinct_consecutive_numbers(path: Path) -> None:
    seqs: list[int] = []
    with Spool(path) as spool:

        def sampler() -> None:
            for _ in range(25):
                seqs.append(spool.append(batch()))

        threads = [threading.Thread(target=sampler) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(seqs) == list(range(1, 101))
        assert [b.payload for b in spool.pending(limit=100)] == [payload(seq) for seq in range(1, 101)]
