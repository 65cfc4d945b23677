"""The collector's limits on a real server: one flooding agent is slowed, not refused, and the others
do not notice; streams beyond the cap are refused with a clear status; a silent stream is dropped."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import Collector, Stream, sample

from agent.wire import REPORT_METHOD, parse_response


def ack_seconds(stream: Stream, seq: int, facts: int) -> float:
    started = time.monotonic()
    reply = stream.batch(seq, *[sample(interface=f"eth{i}") for i in range(facts)])
    assert reply.ack.acked_seq == seq, reply
    return time.monotonic() - started


def test_a_flooding_agent_is_slowed_and_the_others_are_not(tmp_path: Path) -> None:
    # 1000 facts/s with a burst of 1000: the flooder's 5 batches of 1000 are held back 3 s; a
    # normal agent sends 1 fact a batch.
    collector = Collector(tmp_path / "c.db", 0, "--agent-rate", "1000", "--agent-burst", "1000")
    try:
        quiet = Stream(collector.target, "quiet-01")
        baseline = [ack_seconds(quiet, seq, 1) for seq in range(1, 11)]
        flooder = Stream(collector.target, "flood-01")
        flood_times: list[float] = []
        started = time.monotonic()

        def flood() -> None:
            for seq in range(1, 6):
                flood_times.append(ack_seconds(flooder, seq, 1000))

        thread = threading.Thread(target=flood)
        thread.start()
        during = []
        seq = 11
        while thread.is_alive():
            during.append(ack_seconds(quiet, seq, 1))
            seq += 1
            time.sleep(0.05)
        thread.join()
        flooded_for = time.monotonic() - started
        # Slowed: past its burst each 1000 facts cost it a second before its next batch was read
        # (batches 3, 4 and 5 waited), and every one was stored.
        assert flooded_for >= 2.8, f"the flood took only {flooded_for:.2f} s"
        assert len(flood_times) == 5
        # Not noticed by the others: their acks stay as fast as before (medians: machines are noisy).
        assert len(during) >= 10
        assert statistics.median(during) < max(0.05, 3 * statistics.median(baseline)), (baseline, during)
        quiet.close()
        flooder.close()
    finally:
        collector.stop()


def test_streams_beyond_the_cap_are_refused(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "c.db", 0, "--max-streams", "2")
    try:
        first, second = Stream(collector.target, "a-01"), Stream(collector.target, "b-01")
        with pytest.raises(grpc.RpcError) as info:
            Stream(collector.target, "c-01")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 agent streams at most" in str(info.value.details())
        first.close()
        time.sleep(0.3)
        third = Stream(collector.target, "c-01")  # a slot is free again
        assert third.batch(1).ack.acked_seq == 1
        second.close()
        third.close()
    finally:
        collector.stop()


def test_a_stream_that_never_says_hello_is_dropped(tmp_path: Path) -> None:
    collector = Collector(tmp_path / "c.db", 0, "--hello-timeout", "1")
    try:
        with grpc.insecure_channel(collector.target) as channel:
            call = channel.stream_stream(
                REPORT_METHOD, request_serializer=None, response_deserializer=parse_response
            )
            silence = threading.Event()
            replies = call(iter(lambda: silence.wait(10) and None, None), timeout=10)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                next(replies)
            silence.set()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no hello within 1 s" in str(info.value.details())
        assert time.monotonic() - started < 5
    finally:
        collector.stop()
