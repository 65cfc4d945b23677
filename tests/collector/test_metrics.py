"""`serve --metrics-listen`: a real collector, real batches over gRPC (good, duplicate and bad), scraped
over real HTTP; the exposition is parsed strictly and every figure compared with what was sent."""

from __future__ import annotations

import contextlib
import math
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import Collector, Stream, now_ms, run_cli, sample

from agent.sensors.accounting import ZoneDelta
from agent.wire import batch_request, zone_traffic_fact
from collector.metrics import Exposition, Histogram, IngestMeter
from collector.metrics_http import MAX_CONNECTIONS

METRICS_AT = re.compile(r"metrics at http://[\d.]+:(\d+)/metrics")
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
SAMPLE = re.compile(rf"^({NAME})(\{{(?:{LABEL})(?:,{LABEL})*\}})? (\S+)$")
HELP = re.compile(rf"^# HELP ({NAME}) (.*)$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """The text format 0.0.4, strictly: every line valid, HELP and TYPE once per family and before its
    samples, label values unescaped, histograms cumulative with +Inf equal to _count."""
    assert text.endswith("\n") and "\r" not in text
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    for line in text[:-1].split("\n"):
        if m := HELP.match(line):
            assert m.group(1) not in helps and m.group(1) not in types, line
            helps.add(m.group(1))
        elif m := TYPE.match(line):
            assert m.group(1) in helps and m.group(1) not in types, line
            types[m.group(1)] = m.group(2)
        else:
            m = SAMPLE.match(line)
            assert m, f"not a valid exposition line: {line!r}"
            name, labels, value = m.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
            assert family in types, f"sample before its TYPE: {line!r}"
            if types[family] == "counter":
                assert name.endswith("_total"), line
            pairs = tuple(
                (k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
                for k, v in LABEL_PAIR.findall(labels or "")
            )
            number = float(value)  # also +Inf and NaN
            assert (name, pairs) not in samples, f"duplicate sample {line!r}"
            samples[(name, pairs)] = number
    for family, kind in types.items():
        if kind == "histogram":
            buckets = [(dict(k)["le"], v) for (n, k), v in samples.items() if n == family + "_bucket"]
            bounds = [float(le) for le, _ in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, family
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{family}: buckets not cumulative"
            assert counts[-1] == samples[(family + "_count", ())], family
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(labels.items()))]


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode("utf-8")


class Served(Collector):
    """A collector subprocess with its metrics endpoint on a free port."""

    def __init__(self, db: Path) -> None:
        super().__init__(db, 0, "--metrics-listen", "127.0.0.1:0")
        self.metrics_port = int(self.wait_for_line(METRICS_AT).group(1))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    collector = Served(tmp_path / "collector.db")
    yield collector
    collector.stop()


def test_metrics_count_what_was_sent_and_refused(served: Served) -> None:
    port = served.metrics_port
    a = Stream(served.target, "a" * 32)
    for seq in (1, 2, 3):
        assert a.batch(seq, sample(), sample(interface="eth1")).WhichOneof("body") == "ack"
    t = now_ms()
    zone = zone_traffic_fact(ZoneDelta("公安专网", 100, 200, 1, 2, 10_000), t)
    zoned = batch_request(4, t, t, [sample()], extra=[zone, zone]).SerializeToString()
    assert a.send(zoned).WhichOneof("body") == "ack"
    bad = a.batch(5, sample(rx_bps=float("nan")))  # invalid: answered in-band, the stream lives on
    assert bad.WhichOneof("body") == "rejection"
    assert a.batch(5, sample()).WhichOneof("body") == "rejection"  # not above the previous sequence
    again = Stream(served.target, "a" * 32)  # a reconnecting agent resends batch 3: stored once
    assert again.batch(3, sample()).ack.duplicate
    again.close()

    types, samples = parse(scrape(port))
    assert value(samples, "zonewatch_facts_ingested_total", kind="interface_sample") == 7
    assert value(samples, "zonewatch_facts_ingested_total", kind="zone_traffic") == 2
    assert value(samples, "zonewatch_batches_acked_total") == 5  # 4 stored + the duplicate
    assert value(samples, "zonewatch_batches_duplicate_total") == 1
    assert value(samples, "zonewatch_ingest_lag_seconds_count") == 5
    assert 0 < value(samples, "zonewatch_ingest_lag_seconds_sum") < 5
    assert value(samples, "zonewatch_ingest_waiting_facts") == 0
    assert value(samples, "zonewatch_ingest_facts_per_second") == pytest.approx(9 / 10)
    rejected = {k: v for (n, k), v in samples.items() if n == "zonewatch_rejections_total"}
    assert rejected == {
        (("code", "INVALID_ARGUMENT"), ("field", "batch.facts[].interface_sample.rx_bps")): 1,
        (("code", "FAILED_PRECONDITION"), ("field", "batch.seq")): 1,
    }
    # The default rule pack judged every group commit that stored something.
    assert value(samples, "zonewatch_rule_evaluation_seconds_count") >= 1
    assert 0 < value(samples, "zonewatch_rule_evaluation_seconds_sum") < 5
    assert types["zonewatch_incidents_raised_total"] == "counter"
    assert value(samples, "zonewatch_report_streams_open") == 1  # stream a is still open
    assert value(samples, "zonewatch_agents_connected") == 1

    collector = psutil.Process(served.proc.pid)
    # The writer is the spawned child (multiprocessing's resource tracker is a child too).
    (writer,) = [c for c in collector.children() if "spawn_main" in " ".join(c.cmdline())]
    for name, proc in (("collector", collector), ("writer", writer)):
        cpu = value(samples, "zonewatch_process_cpu_seconds_total", process=name)
        times = proc.cpu_times()
        assert 0 < cpu <= times.user + times.system + 0.05
        rss = value(samples, "zonewatch_process_resident_memory_bytes", process=name)
        assert 0.5 < rss / proc.memory_info().rss < 2

    a.close()
    # The database's size is the files' own, at the moment of the scrape (the writer may write between).
    for _ in range(20):
        files = [served.db.stat().st_size, Path(f"{served.db}-wal").stat().st_size]
        _, samples = parse(scrape(port))
        after = [served.db.stat().st_size, Path(f"{served.db}-wal").stat().st_size]
        if files == after:
            break
    assert [value(samples, "zonewatch_database_size_bytes", file=f) for f in ("db", "wal")] == after
    assert sum(after) > 0


def test_only_get_metrics_is_served(served: Served) -> None:
    port = served.metrics_port
    with pytest.raises(urllib.error.HTTPError) as missing:
        scrape(port, "/")
    assert missing.value.code == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as posted:
        urllib.request.urlopen(request, timeout=10)
    assert posted.value.code == 405
    # A client that connects and says nothing does not hold the endpoint: the next scrape is answered.
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        parse(scrape(port))
    # At most 16 connections at once: one more is closed at once, not left waiting (or held open).
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as extra:
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):  # closed: EOF or a reset, both at once
                assert extra.recv(1) == b""
            assert time.monotonic() - started < 1.5
    finally:
        for conn in idle:
            conn.close()
    for _ in range(50):  # the slots come back as the server sees those connections end
        with contextlib.suppress(ConnectionError, urllib.error.URLError):
            parse(scrape(port))
            break
        time.sleep(0.1)
    else:
        raise AssertionError("no scrape answered after the idle connections closed")


def test_rejection_labels_leave_out_indices_and_agent_chosen_keys() -> None:
    meter = IngestMeter()
    for name in ("a", "b", "zzz-1"):
        meter.rejected("INVALID_ARGUMENT", f"batch.facts[3].agent_health.sensor_status[{name}]")
    assert meter.rejections == {("INVALID_ARGUMENT", "batch.facts[].agent_health.sensor_status[]"): 3}


def test_metrics_listen_is_checked_before_anything_starts(tmp_path: Path) -> None:
    result = run_cli(
        "zonewatch-collector", "serve", "--insecure", "--db", str(tmp_path / "c.db"), "--listen",
        "127.0.0.1:0", "--metrics-listen", "nowhere", "--log-format", "text", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "zonewatch-collector: error: --metrics-listen 'nowhere': expected HOST:PORT, e.g. 127.0.0.1:9390"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = run_cli(
            "zonewatch-collector", "serve", "--insecure", "--db", str(tmp_path / "c.db"), "--listen",
            "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{busy}", "--log-format", "text", check=False,
        )  # fmt: skip
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{busy}" in result.stderr.strip().splitlines()[-1]


def test_exposition_escapes_label_values_and_help() -> None:
    out = Exposition()
    out.family("zonewatch_x_total", "counter", 'a "help"\nline \\ 县')
    out.sample("zonewatch_x_total", 3, {"zone": '公安"专网\\\n'})
    histogram = Histogram((0.5, 1.0))
    for seconds in (0.1, 0.5, 0.7, 3.0):
        histogram.observe(seconds)
    out.histogram("zonewatch_h_seconds", "h", histogram)
    types, samples = parse(out.text())
    assert value(samples, "zonewatch_x_total", zone='公安"专网\\\n') == 3
    assert [value(samples, "zonewatch_h_seconds_bucket", le=le) for le in ("0.5", "1.0", "+Inf")] == [2, 3, 4]
    assert value(samples, "zonewatch_h_seconds_sum") == pytest.approx(4.3)
    assert types == {"zonewatch_x_total": "counter", "zonewatch_h_seconds": "histogram"}
