"""The zone catalog goes out with the policy, reloads live, and a broken file changes nothing."""

from __future__ import annotations

import ipaddress
import itertools
import re
import shutil
import signal
import time
from pathlib import Path

import grpc
from conftest import ROOT, Collector, run_cli

from protos.zonewatch.v1 import agent_pb2

SAMPLE = ROOT / "deploy" / "zones.sample.yaml"


def get_policy(target: str, current: str = "") -> agent_pb2.GetPolicyResponse:
    with grpc.insecure_channel(target) as channel:
        method = channel.unary_unary(
            "/zonewatch.v1.AgentService/GetPolicy",
            request_serializer=agent_pb2.GetPolicyRequest.SerializeToString,
            response_deserializer=agent_pb2.GetPolicyResponse.FromString,
        )
        return method(agent_pb2.GetPolicyRequest(current_version=current), timeout=10)  # type: ignore[no-any-return]


def owner_of(policy: agent_pb2.Policy, address: str) -> str:
    """The zone the served ranges give an address: what an agent will compute."""
    ip = ipaddress.ip_address(address)
    width = 4 if ip.version == 4 else 16
    value = int(ip).to_bytes(width, "big")
    for r in policy.zone_ranges:
        if len(r.first) == width and r.first <= value <= r.last:
            return policy.zones[r.zone - 1].name if r.zone else "unknown"
    raise AssertionError(f"{address} is in no range: the ranges must cover the whole address space")


def wait_for_version(target: str, old: str, timeout: float = 10.0) -> agent_pb2.GetPolicyResponse:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = get_policy(target)
        if reply.version != old:
            return reply
        time.sleep(0.2)
    raise AssertionError("the collector did not take the new catalog")


def test_catalog_is_served_reloaded_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    zones = tmp_path / "zones.yaml"
    shutil.copy(SAMPLE, zones)
    collector = Collector(tmp_path / "c.db", 0, "--zones", str(zones))
    try:
        first = get_policy(collector.target)
        policy = first.policy
        assert policy.zones_version and len(policy.zones) == 9
        kinds = {z.kind for z in policy.zones}
        assert kinds == {"extranet", "dedicated", "internet", "classified", "local"}
        # Ranges are disjoint, sorted and cover both address families completely.
        for width in (4, 16):
            runs = [(int.from_bytes(r.first, "big"), int.from_bytes(r.last, "big"))
                    for r in policy.zone_ranges if len(r.first) == width]  # fmt: skip
            assert runs[0][0] == 0 and runs[-1][1] == 2 ** (8 * width) - 1
            assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(runs))
        assert owner_of(policy, "127.0.0.1") != "unknown"
        assert get_policy(collector.target, first.version).unchanged

        # A change of the file reaches the collector without restart.
        text = zones.read_text(encoding="utf-8")
        zone_list, access = text.split("\naccess:")  # new zones go at the end of the zones: list
        zones.write_text(
            zone_list + "\n  - name: 测试区\n    kind: local\n    cidrs: [192.0.2.0/24]\naccess:" + access,
            encoding="utf-8",
        )
        second = wait_for_version(collector.target, first.version)
        assert owner_of(second.policy, "192.0.2.7") == "测试区"

        # A broken file is refused with file:line; the catalog in force stays.
        zones.write_text(
            zone_list + "\n  - name: 坏区\n    kind: nonsense\n    cidrs: [192.0.2.0/24]\naccess:" + access,
            encoding="utf-8",
        )
        collector.proc.send_signal(signal.SIGHUP)
        collector.wait_for_line(re.compile(r"zone catalog not reloaded.*zones\.yaml:\d+:"))
        assert get_policy(collector.target).version == second.version
    finally:
        collector.stop()


def test_serve_refuses_to_start_with_a_broken_catalog(tmp_path: Path) -> None:
    zones = tmp_path / "zones.yaml"
    zones.write_text("zones:\n  - name: x\n    kind: extranet\n    cidrs: [10.0.0.0/8]\n", encoding="utf-8")
    db = str(tmp_path / "c.db")
    result = run_cli(
        "zonewatch-collector",
        "serve",
        "--db",
        db,
        "--listen",
        "127.0.0.1:0",
        "--zones",
        str(zones),
        check=False,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "zones.yaml:2" in last and "direction" in last
