"""Agent footprint: steady RSS and idle CPU of zonewatch-agent with kernel zone accounting on,
beside prometheus-node-exporter scraped every 10 s as the reference, measured in the same run.

Both run in the same test host (a network namespace of tests/testnet.py), each the way it runs in
production: the agent reports to a real collector (another test host) every 10 s with a zone catalog,
so its nftables table is installed and read every interval; node_exporter is scraped every 10 s over
HTTP from the collector host, like a Prometheus server would. CPU counts the process and the children
it waited for (the agent runs `nft` to read its counters: that is part of its cost). RSS is VmRSS.
The agent runs with its default self-monitoring budget (1 % CPU, 40 MB RSS); the budget state it
reported last (the "budget" entry of its health fact, as the collector stored it) is printed too, and
where its RSS is at the end (anonymous, grpc's extension, libpython, other files, capture rings).

    .venv/bin/python bench/agent_footprint.py [--seconds 120] [--warmup 25]

Last line: RESULT rss_mb=N cpu_percent=N node_exporter_rss_mb=N node_exporter_cpu_percent=N target=40
(target: agent RSS <= 40 MB; CPU target <= 0.5 % of a core, printed above it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from testnet import ZONE_CATALOG, TestNetwork, require_root_netns  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRAPER = """
import sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
while time.monotonic() < end:
    with urllib.request.urlopen(url, timeout=5) as r:
        r.read()
    time.sleep(10)
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime: the process and the children it reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def rss_parts(pid: int) -> str:
    """Where the agent's RSS is, from /proc/PID/smaps: anonymous memory (Python objects, the C heap,
    thread stacks), the capture rings (packet-socket mappings), and the files mapped (the code
    touched in grpc's extension, libpython and the other libraries)."""
    parts: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            path = fields[5] if len(fields) > 5 else ""
            if path.startswith("socket:"):
                name = "capture rings"
            elif "cygrpc" in path:
                name = "grpc (cygrpc)"
            elif "libpython" in path:
                name = "libpython"
            elif path.startswith("/"):
                name = "other files"
            else:
                name = "anonymous"
        elif fields[0] == "Rss:":
            parts[name] = parts.get(name, 0) + int(fields[1])
    return ", ".join(f"{k} {v / 1024:.1f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))


def budget_state(db: str) -> str:
    """The agent's own budget verdict, as the collector stored it from its last health fact."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT sensors FROM agents").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return f"(not readable: {exc})"
    return str(json.loads(row[0]).get("budget", "(not reported)")) if row else "(no agent row)"


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="measured window (default 120)")
    parser.add_argument("--warmup", type=float, default=25.0, help="seconds before measuring (default 25)")
    args = parser.parse_args()
    try:
        require_root_netns(iperf3=False)
    except BaseException as exc:  # pytest's Skipped: say why in one line
        print(f"agent_footprint: {exc}", file=sys.stderr)
        return 2
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exporter is None:
        print(
            "agent_footprint: install the reference first: apt-get install prometheus-node-exporter",
            file=sys.stderr,
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="zw-footprint-"))
    (work / "zones.yaml").write_text(ZONE_CATALOG, encoding="utf-8")
    try:
        with TestNetwork() as net:
            central = net.add_host("coll", "extranet")
            host = net.add_host("mon", "extranet", "dedicated")
            listen = f"{central.addr4['extranet']}:7390"
            db, zones = str(work / "c.db"), str(work / "zones.yaml")
            # As deployed: the collector's PKI, a token, the agent enrolled and reporting over mTLS.
            central.python("-m", "collector.cli", "init", "--db", db)
            central.popen(
                sys.executable, "-m", "collector.cli", "serve", "--db", db, "--listen", listen,
                "--zones", zones, "--sample-interval", "10",
            )  # fmt: skip
            time.sleep(2)
            created = central.python(
                "-m", "collector.cli", "tokens", "create", "--db", db, "--collector", listen,
                "--department", "市公安局",
            ).stdout  # fmt: skip
            (enroll,) = [line.split() for line in created.splitlines() if "zonewatch-agent enroll" in line]
            host.python("-m", "agent.cli", *enroll[1:], "--state-dir", str(work / "agent"))
            agent = host.popen(
                sys.executable, "-m", "agent", "run", "--interval", "10",
                "--state-dir", str(work / "agent"),
            )  # fmt: skip
            node = host.popen(exporter, f"--web.listen-address={host.addr4['extranet']}:9100")
            url = f"http://{host.addr4['extranet']}:9100/metrics"
            central.python_popen("-c", SCRAPER, url, str(args.warmup + args.seconds + 5))
            progress(f"agent pid {agent.pid}, node_exporter pid {node.pid}; warming up {args.warmup:.0f} s")
            time.sleep(args.warmup)
            tables = host.run("nft", "list", "tables").stdout
            accounting = "inet zonewatch" in tables
            cpu0 = {p: cpu_seconds(p) for p in (agent.pid, node.pid)}
            t0 = time.monotonic()
            rss: dict[int, list[float]] = {agent.pid: [], node.pid: []}
            while time.monotonic() - t0 < args.seconds:
                for pid in rss:
                    rss[pid].append(rss_mb(pid))
                time.sleep(5)
                progress(f"{time.monotonic() - t0:5.0f} s: agent {rss[agent.pid][-1]:.1f} MB, "
                         f"node_exporter {rss[node.pid][-1]:.1f} MB")  # fmt: skip
            window = time.monotonic() - t0
            cpu = {p: (cpu_seconds(p) - cpu0[p]) / window * 100 for p in cpu0}
            budget = budget_state(db)
            parts = rss_parts(agent.pid) if agent.poll() is None else "(agent gone)"
            if agent.poll() is not None:
                print("agent_footprint: the agent exited during the run", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    agent_rss, node_rss = statistics.median(rss[agent.pid]), statistics.median(rss[node.pid])
    print(f"window {window:.0f} s, report interval 10 s, zone accounting in the kernel: "
          f"{'on' if accounting else 'OFF (table missing!)'}")  # fmt: skip
    print(f"{'':22}{'RSS median':>12}{'RSS max':>10}{'CPU % of a core':>18}")
    print(f"{'zonewatch-agent':22}{agent_rss:>10.1f}MB{max(rss[agent.pid]):>8.1f}MB{cpu[agent.pid]:>18.3f}")
    print(f"{'node_exporter (ref.)':22}{node_rss:>10.1f}MB{max(rss[node.pid]):>8.1f}MB{cpu[node.pid]:>18.3f}")
    print(f"agent's RSS at the end, MB: {parts}")
    print(f"agent's own budget state: {budget}")
    print(f"targets: RSS <= 40 MB ({'met' if agent_rss <= 40 else 'MISSED'}), "
          f"CPU <= 0.5 % of a core ({'met' if cpu[agent.pid] <= 0.5 else 'MISSED'})")  # fmt: skip
    print(
        f"RESULT rss_mb={agent_rss:.1f} cpu_percent={cpu[agent.pid]:.3f} "
        f"node_exporter_rss_mb={node_rss:.1f} node_exporter_cpu_percent={cpu[node.pid]:.3f} target=40"
    )
    return 0 if accounting else 1


if __name__ == "__main__":
    sys.exit(main())
