"""Fifty agents stream for 30 s; the collector is killed with SIGKILL at 10 s and restarted at 15 s:
every fact sent is stored exactly once, and the database is intact."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import grpc
from conftest import Collector, Stream, sample

AGENTS = 50
RUN_S = 30.0
KILL_AT_S, RESTART_AT_S = 10.0, 15.0


class Sender:
    """One agent: batches numbered 1, 2, 3 ... of 3 facts; what is not acked is sent again, as an
    agent's spool does, on a new stream after a failure."""

    def __init__(self, target: str, agent_id: str, stop: threading.Event) -> None:
        self.target, self.agent_id, self.stop = target, agent_id, stop
        self.acked = 0
        self.next_seq = 1
        self.reconnects = 0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                stream = Stream(self.target, self.agent_id)
            except grpc.RpcError:
                self.reconnects += 1
                time.sleep(0.2)
                continue
            try:
                # Resend from the first unacknowledged batch, as the spool does.
                self.acked = max(self.acked, stream.welcome.welcome.acked_seq)
                seq = self.acked + 1
                while not self.stop.is_set():
                    samples = [sample(interface=f"eth{i}") for i in range(3)]
                    reply = stream.batch(seq, *samples)
                    assert reply.WhichOneof("body") == "ack", reply
                    self.acked = max(self.acked, reply.ack.acked_seq)
                    self.next_seq = max(self.next_seq, seq + 1)
                    seq += 1
                    time.sleep(0.05)
            except grpc.RpcError:
                self.reconnects += 1
                time.sleep(0.2)
            finally:
                stream.close()


def test_kill9_under_fifty_agents_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    db = tmp_path / "collector.db"
    collector = Collector(db)
    port = collector.port
    stop = threading.Event()
    senders = [Sender(collector.target, f"fleet-{i:02d}", stop) for i in range(AGENTS)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in senders]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(KILL_AT_S)
    collector.stop(signal.SIGKILL)
    time.sleep(RESTART_AT_S - KILL_AT_S)
    collector = Collector(db, port)
    try:
        time.sleep(max(0.0, RUN_S - (time.monotonic() - started)))
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
    finally:
        collector.stop()
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = dict(
            con.execute(
                "SELECT a.agent_id, count(*) FROM batches AS b JOIN agents AS a ON a.id = b.agent"
                " WHERE b.status = 'stored' GROUP BY a.agent_id"
            ).fetchall()
        )
        per_batch = dict(
            con.execute(
                "SELECT a.agent_id, count(*) FROM interface_samples AS s JOIN agents AS a ON a.id = s.agent"
                " GROUP BY a.agent_id"
            ).fetchall()
        )
        seqs = con.execute(
            "SELECT a.agent_id, b.seq FROM batches AS b JOIN agents AS a ON a.id = b.agent ORDER BY 1, 2"
        ).fetchall()
    finally:
        con.close()
    assert sum(s.reconnects for s in senders) >= AGENTS, "the kill should have broken every stream"
    for s in senders:
        # Every acknowledged batch is stored, once; stored beyond the acks only what was in flight.
        mine = [seq for agent, seq in seqs if agent == s.agent_id]
        assert mine == list(range(1, len(mine) + 1)), f"{s.agent_id}: holes or duplicates in {mine}"
        assert len(mine) >= s.acked, f"{s.agent_id}: acked {s.acked}, stored {len(mine)}"
        assert stored[s.agent_id] == len(mine) and per_batch[s.agent_id] == 3 * len(mine)
    assert sum(s.acked for s in senders) > AGENTS * 20, "the fleet should have streamed for real"
