"""A fleet for end-to-end stories: collectors and agents in test hosts, the faults put between them,
and what a collector stored held against what an agent produced.

A helper module for tests/e2e, not a test: the stories import what they need from here.
"""

from __future__ import annotations

import itertools
import json
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from testnet import Host, in_netns

from collector.config import default_pki_dir
from collector.store.incidents import AGENT_CLONE, SEQUENCE_GAP

COLLECTOR_PORT = 7390
# The tables where every stored fact leaves exactly one row (collector/store/writer.py): facts that
# change state (inventory) are also kept verbatim in other_facts, so a batch's facts add up here.
FACT_TABLES = ("interface_samples", "other_facts", "zone_traffic", "flows")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def log_tail(log: Path, lines: int = 40) -> str:
    """The end of a process's log, for failure messages."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log at {log})"
    return f"--- {log.name}:\n" + "\n".join(text.splitlines()[-lines:])


# --- processes in test hosts -------------------------------------------------------------------


def start_collector(
    central: Host,
    db: Path,
    zones: Path | None = None,
    *,
    tls: bool = False,
    log: Path | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[Any], str]:
    """A collector on the extranet, serving the catalog if given; returns it and its HOST:PORT once it
    accepts connections. With ``tls`` it serves mTLS, creating its PKI first unless the database already
    has one (a restart keeps its CA, so enrolled agents still trust it); enroll agents with ``enroll``.
    Its stderr goes to ``log`` (appended) when given."""
    listen = f"{central.addr4['extranet']}:{COLLECTOR_PORT}"
    if tls and not default_pki_dir(db).exists():
        central.python("-m", "collector.cli", "init", "--db", str(db))
    stderr = log.open("ab") if log is not None else None
    try:
        collector = central.popen(
            sys.executable, "-m", "collector.cli", "serve", "--db", str(db), "--listen", listen,
            *(["--zones", str(zones)] if zones is not None else []),
            "--sample-interval", "1", *([] if tls else ["--insecure"]), *extra, stderr=stderr,
        )  # fmt: skip
    finally:
        if stderr is not None:
            stderr.close()  # the child has its own copy
    wait_listening(central, listen, collector, log)
    return collector, listen


def wait_listening(
    host: Host, address: str, proc: subprocess.Popen[Any], log: Path | None = None, timeout: float = 30
) -> None:
    """Until a TCP connection to ``address`` inside ``host`` succeeds (``proc`` serves it)."""
    ip, port = address.rsplit(":", 1)

    def accepts() -> bool:
        try:
            with socket.create_connection((ip, int(port)), timeout=0.5):
                return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while not in_netns(host, accepts):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else "is not listening"
            tail = log_tail(log) if log else ""
            raise AssertionError(f"{proc.args!r} {why} after {timeout:g} s\n{tail}")
        time.sleep(0.1)


def enroll(
    host: Host, central: Host, db: Path, listen: str, state: Path, hostname: str, **labels: str
) -> None:
    """What an admin does: a token on the collector, then the printed `zonewatch-agent enroll` on the host."""
    flags = [part for name, value in labels.items() for part in (f"--{name}", value)]
    created = central.python(
        "-m", "collector.cli", "tokens", "create", "--db", str(db), "--collector", listen, *flags
    ).stdout  # fmt: skip
    (command,) = [line.split() for line in created.splitlines() if "zonewatch-agent enroll" in line]
    host.python("-m", "agent.cli", *command[1:], "--state-dir", str(state), "--hostname", hostname)


def run_agent(host: Host, state: Path, hostname: str, *extra: str, log: Path) -> subprocess.Popen[Any]:
    """`zonewatch-agent run` on ``host`` sampling every second, its stderr appended to ``log``."""
    with log.open("ab") as stderr:
        return host.popen(
            sys.executable, "-m", "agent.cli", "run", "--interval", "1", "--state-dir", str(state),
            "--hostname", hostname, *extra, stderr=stderr,
        )  # fmt: skip


def stop(host: Host, proc: subprocess.Popen[Any], log: Path | None = None, grace: float = 20) -> None:
    """SIGTERM and wait: a graceful stop must exit 0 within ``grace`` seconds."""
    status = host.stop(proc, grace)
    assert status == 0, f"{proc.args!r} exited with {status} on SIGTERM\n" + (log_tail(log) if log else "")


def ticks(db: Path) -> tuple[int, int]:
    """(rows, newest time) of zone_traffic: each agent tick adds rows."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT count(*), coalesce(max(time_ms), 0) FROM zone_traffic").fetchone()
            return int(row[0]), int(row[1])
        finally:
            con.close()
    except sqlite3.Error:
        return 0, 0


def next_tick(db: Path, after: int, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, newest = ticks(db)
        if newest > after:
            return newest
        time.sleep(0.02)
    raise AssertionError("the agent reported no zone traffic in time")


class Retry(NamedTuple):
    """One failed attempt of an agent's transport, as its log says: when, and the backoff it drew."""

    at_ms: int
    delay_ms: int
    line: str

    @property
    def due_ms(self) -> int:
        """When the agent tries again."""
        return self.at_ms + self.delay_ms


_RETRY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*; retrying in ([\d.]+) s$")
_RETRY_EVENT = re.compile(r"; retrying in ([\d.]+) s$")


def agent_retries(log: Path) -> list[Retry]:
    """The transport's "retrying in X s" events of an agent's log: JSON lines (the default when stderr
    is a file; ts in UTC), or text lines (--log-format text; logging's asctime: local time)."""
    retries = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if m := _RETRY_EVENT.search(event["msg"]):
                at = datetime.fromisoformat(event["ts"]).timestamp()
                retries.append(Retry(round(at * 1000), round(float(m[1]) * 1000), line))
        elif m := _RETRY.match(line):
            at = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S"))
            retries.append(Retry(int(at * 1000) + int(m[2]), round(float(m[3]) * 1000), line))
    return retries


# --- faults on a host's link -------------------------------------------------------------------


class LinkFault:
    """Loss, a narrow link or a blackhole between ``host`` and one ``peer`` address, made in the host's
    namespace only: an nftables table of the test's own and a tbf qdisc on ``interface``. ``heal()``
    (also on leaving the ``with``) removes both; nothing else of the host's ruleset is touched."""

    TABLE = "zwfault"

    def __init__(self, host: Host, peer: str, interface: str = "eth0") -> None:
        self.host, self.peer, self.interface = host, peer, interface
        self._table = False
        self._qdisc = False

    def __enter__(self) -> LinkFault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal()

    def _rules(self, match: str) -> None:
        """Replace the table's rules: ``match`` then drop, on packets to and from the peer."""
        family = "ip6" if ":" in self.peer else "ip"
        hook = "type filter hook {} priority 0;"
        script = (
            f"table inet {self.TABLE} {{}}\n"
            f"delete table inet {self.TABLE}\n"
            f"table inet {self.TABLE} {{\n"
            f"  chain out {{ {hook.format('output')} {family} daddr {self.peer} {match} drop; }}\n"
            f"  chain in {{ {hook.format('input')} {family} saddr {self.peer} {match} drop; }}\n"
            "}\n"
        )
        self._table = True
        self.host.run("nft", "-f", "-", input=script)  # one transaction: no moment without a rule

    def lossy(self, percent: int) -> None:
        """Drop ``percent`` % of the packets each way, at random."""
        self._rules(f"numgen random mod 100 < {percent}")

    def blackhole(self) -> None:
        """Drop every packet each way."""
        self._rules("")

    def narrow(self, rate: str = "256kbit", burst: str = "16kb", latency: str = "400ms") -> None:
        """Shape what the host sends on ``interface`` to ``rate`` (a token bucket)."""
        self._qdisc = True
        self.host.run("tc", "qdisc", "replace", "dev", self.interface, "root", "tbf",
                      "rate", rate, "burst", burst, "latency", latency)  # fmt: skip

    def heal(self) -> None:
        if self._table:
            self.host.run("nft", "delete", "table", "inet", self.TABLE)
            self._table = False
        if self._qdisc:
            self.host.run("tc", "qdisc", "del", "dev", self.interface, "root")
            self._qdisc = False


# --- what was produced, what was stored ----------------------------------------------------------


class SpoolState(NamedTuple):
    """An agent's spool as the test reads it: what it numbered, what still waits for an ack."""

    next_seq: int
    pending: tuple[int, ...]
    dropped_batches: int  # evicted from a full spool, ever

    @property
    def produced(self) -> range:
        return range(1, self.next_seq)

    @property
    def gone(self) -> set[int]:
        """Numbers no longer in the spool: acknowledged (or discarded as invalid, or evicted)."""
        return set(self.produced) - set(self.pending)


def spool_state(spool: Path) -> SpoolState:
    """Read the agent's spool.db beside a running (or stopped) agent; never writes."""
    con = sqlite3.connect(f"file:{spool}?mode=ro", uri=True, timeout=5)
    try:
        next_seq, dropped = con.execute("SELECT next_seq, dropped_batches_total FROM meta").fetchone()
        pending = tuple(seq for (seq,) in con.execute("SELECT seq FROM batches ORDER BY seq"))
    finally:
        con.close()
    return SpoolState(int(next_seq), pending, int(dropped))


class StoredBatch(NamedTuple):
    seq: int
    facts: int
    sent_ms: int
    received_ms: int


class Stored(NamedTuple):
    """What the collector holds of one agent."""

    batches: list[StoredBatch]  # stored (not rejected), by seq
    fact_rows: Counter[int]  # fact rows per seq, over every fact table
    rejected: list[int]  # seqs the collector rejected
    gaps: list[tuple[int, int]]  # sequence_gaps rows (from_seq, to_seq)
    incidents: list[tuple[str, str]]  # (rule, title) of the collector's integrity incidents (gap, clone)

    @property
    def seqs(self) -> list[int]:
        return [b.seq for b in self.batches]


def stored(db: Path, hostname: str) -> Stored:
    """Everything the collector stored of the agent reporting as ``hostname`` (empty before it did)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = con.execute("SELECT id FROM agents WHERE hostname = ?", (hostname,)).fetchone()
        if row is None:
            return Stored([], Counter(), [], [], [])
        (key,) = row
        batches = [
            StoredBatch(*r)
            for r in con.execute(
                "SELECT seq, facts, sent_ms, received_ms FROM batches"
                " WHERE agent = ? AND status = 'stored' ORDER BY seq",
                (key,),
            )
        ]
        rows: Counter[int] = Counter()
        for table in FACT_TABLES:
            query = f"SELECT seq, count(*) FROM {table} WHERE agent = ? GROUP BY seq"
            for seq, n in con.execute(query, (key,)):
                rows[seq] += n
        query = "SELECT seq FROM batches WHERE agent = ? AND status = 'rejected'"
        rejected = [s for (s,) in con.execute(query, (key,))]
        gaps = con.execute("SELECT from_seq, to_seq FROM sequence_gaps WHERE agent = ?", (key,)).fetchall()
        # The collector's own integrity incidents (a gap, a clone) at all: a test runs one agent. Rule
        # incidents are judgments of what the agent saw (or that it went silent during a fault), not losses.
        incidents = con.execute(
            "SELECT rule, title FROM incidents WHERE rule IN (?, ?)", (SEQUENCE_GAP, AGENT_CLONE)
        ).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the collector is still creating its schema
            return Stored([], Counter(), [], [], [])
        raise
    finally:
        con.close()
    return Stored(batches, rows, rejected, gaps, incidents)


def wait_for_batches(db: Path, hostname: str, at_least: int, timeout: float, what: str) -> None:
    """Until the collector has stored ``at_least`` batches of the agent reporting as ``hostname``."""
    wait_until(lambda: len(stored(db, hostname).batches) >= at_least, timeout, what)


def backlog_delivered(db: Path, spool: Path, hostname: str) -> bool:
    """The agent's spool is empty and the collector holds every batch it numbered."""
    state = spool_state(spool)
    held = set(stored(db, hostname).seqs)
    return not state.pending and set(state.produced) <= held


def assert_each_batch_stored_once(db: Path, spool: Path, hostname: str, *, drained: bool) -> Stored:
    """Every batch the agent numbered is stored once, in order and without a gap, or still spooled
    (none may be, if ``drained``); every stored batch has exactly its facts. Returns what is stored."""
    state = spool_state(spool)
    held = stored(db, hostname)
    seqs = held.seqs
    produced = set(state.produced)
    assert state.dropped_batches == 0, f"the agent evicted {state.dropped_batches} batches from its spool"
    lost = sorted(produced - set(seqs) - set(state.pending))
    assert not lost, f"lost: batches {_ranges(lost)} left the agent's spool but were never stored"
    if drained:
        assert not state.pending, f"batches {_ranges(state.pending)} are still in the agent's spool"
    unknown = sorted(set(seqs) - produced)
    assert not unknown, f"stored batches {_ranges(unknown)} the agent never numbered"
    holes = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
    assert not holes, f"the collector lacks batches {_ranges(holes)} below its newest, {max(seqs)}"
    twice = {b.seq: (held.fact_rows[b.seq], b.facts) for b in held.batches if held.fact_rows[b.seq] > b.facts}
    assert not twice, f"facts stored twice: {{seq: (fact rows, facts of the batch)}} = {twice}"
    short = {b.seq: (held.fact_rows[b.seq], b.facts) for b in held.batches if held.fact_rows[b.seq] < b.facts}
    assert not short, f"facts lost from stored batches: {{seq: (fact rows, facts of the batch)}} = {short}"
    strays = sorted(set(held.fact_rows) - set(seqs))
    assert not strays, f"fact rows of batches {_ranges(strays)} that are not stored as batches"
    late = [(a.seq, b.seq) for a, b in itertools.pairwise(held.batches) if b.received_ms < a.received_ms]
    assert not late, f"stored out of order: (seq, later seq received before it) {late[:10]}"
    assert not held.rejected, f"the collector rejected batches {_ranges(held.rejected)}"
    assert not held.gaps, f"the collector recorded sequence gaps {held.gaps}"
    assert not held.incidents, f"the collector raised incidents {held.incidents}"
    return held


def _ranges(seqs: Any) -> str:
    """1, 2, 3, 7 -> '1..3, 7': lists of lost batches stay readable."""
    out: list[str] = []
    for seq in sorted(seqs):
        if out and out[-1].rsplit("..", 1)[-1] == str(seq - 1):
            out[-1] = out[-1].split("..")[0] + f"..{seq}"
        else:
            out.append(str(seq))
    return ", ".join(out)


def sample_times(db: Path, hostname: str, after_ms: int, until_ms: int) -> list[int]:
    """time_ms of the agent's interface samples in (after_ms, until_ms], oldest first, one per tick."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute(
            "SELECT DISTINCT s.time_ms FROM interface_samples s JOIN agents a ON a.id = s.agent"
            " WHERE a.hostname = ? AND s.time_ms > ? AND s.time_ms <= ? ORDER BY s.time_ms",
            (hostname, after_ms, until_ms),
        ).fetchall()
    finally:
        con.close()
    return [t for (t,) in rows]


def uncovered(times: list[int], from_ms: int, to_ms: int, minute_ms: int = 60_000) -> list[int]:
    """Starts of the minutes overlapping [from_ms, to_ms] that hold none of ``times``."""
    first, last = from_ms // minute_ms, to_ms // minute_ms
    have = {t // minute_ms for t in times}
    return [m * minute_ms for m in range(first, last + 1) if m not in have]


def longest_silence(times: list[int], from_ms: int, to_ms: int) -> tuple[int, int]:
    """(ms, at) of the longest stretch of [from_ms, to_ms] without a time in ``times``."""
    points = [from_ms, *(t for t in times if from_ms < t < to_ms), to_ms]
    return max(((b - a, a) for a, b in itertools.pairwise(points)), default=(0, from_ms))
