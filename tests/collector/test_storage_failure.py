"""Storage failing under a running collector: streams end at once with UNAVAILABLE, nothing is acked."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import grpc
import pytest
from conftest import Collector, Stream


def test_storage_failure_ends_the_stream_with_unavailable(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "collector.db")
    try:
        stream = Stream(collector.target, "disk-01")
        assert stream.batch(1).ack.acked_seq == 1
        # The samples table taken away: every commit from now on fails.
        saboteur = sqlite3.connect(collector.db, isolation_level=None)
        saboteur.execute("ALTER TABLE interface_samples RENAME TO interface_samples_away")
        saboteur.close()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stream.batch(2)
        # At once, not after the agent's 30 s ack timeout.
        assert time.monotonic() - started < 5
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "storage" in (info.value.details() or "")
        stream.close()
        # New streams are refused the same way until an operator fixes the disk and restarts.
        with pytest.raises(grpc.RpcError) as again:
            Stream(collector.target, "disk-01")
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        collector.stop()
    con = sqlite3.connect(collector.db)
    (stored,) = con.execute("SELECT count(*) FROM batches WHERE status = 'stored'").fetchone()
    con.close()
    assert stored == 1, "batch 2 must not be recorded as stored"
