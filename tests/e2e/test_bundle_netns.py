"""The offline install story: an admin builds the agent bundle on a workstation that reaches the registry,
carries it to a clean host that reaches nothing but the collector, installs it with a one-time token, and
the agent reports over mTLS as an unprivileged user with only CAP_NET_RAW and CAP_NET_ADMIN. Uninstall
leaves the host as it was.

The clean host is a chroot in a test host's network namespace: the machine's /usr read-only, a fresh
minimal /etc, empty /opt, /var and /tmp. Every mount is made inside the mount namespace `ip netns exec`
creates for each command, so it vanishes with that command; the chroot itself holds plain files only.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import run_cli
from fleet import COLLECTOR_PORT, log_tail, start_collector, stop, wait_until
from testnet import FIRST_HOST_NUMBER, ROOT, ZONE_CATALOG, Host, TestNetwork, addresses, require_root_netns

from collector.bundle import AGENT_REQUIREMENTS

USER = "zonewatch-agent"
UNIT_PATH = "etc/systemd/system/zonewatch-agent.service"
# The first host on the extranet gets this address: the bundle is made for it before the network exists.
COLLECTOR = f"{addresses('extranet', FIRST_HOST_NUMBER)[0]}:{COLLECTOR_PORT}"
COLLECTOR_ONLY = ("pysigma", "jinja2", "rich", "sqlite_utils", "sqlite-utils", "pyyaml")
# Capability bits (linux/capability.h): what the unit grants, and nothing else.
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
GRANTED = (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW)
# Mount what a host has into the chroot, then become it. Runs inside `ip netns exec`, whose private
# mount namespace (slave to the root's) takes these mounts away when the command ends.
ENTER = """
set -e
root=$1; shift
mount --bind -o ro /usr "$root/usr"
for dir in bin sbin lib lib64; do
    if [ -d "/$dir" ] && [ ! -L "/$dir" ]; then mount --bind -o ro "/$dir" "$root/$dir"; fi
done
mount -t proc proc "$root/proc"
mount --bind /sys "$root/sys"
mount --bind /dev "$root/dev"
exec chroot "$root" "$@"
"""
ROOT_LISTENER = "import socket, time; server = socket.create_server(('0.0.0.0', 2222)); time.sleep(120)"
LISTENERS = """
import time
from agent.sensors.listeners import ListenerSensor
for _ in range(50):
    events = [e for e in ListenerSensor().poll() if e.local_port == 2222]
    if events:
        break
    time.sleep(0.1)
for event in events:
    print(event.local_port, event.process)
"""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Bundle(NamedTuple):
    archive: Path
    db: Path  # the collector's database: its PKI is the CA in the bundle
    stdout: str


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """Built once, on the 'workstation' (the root namespace, where pip may reach its registry)."""
    work = tmp_path_factory.mktemp("bundle")
    db = work / "collector.db"
    run_cli("zonewatch-collector", "init", "--db", str(db))
    archive = work / "zonewatch-agent.tar.gz"
    built = run_cli(
        "zonewatch-collector", "bundle", "--db", str(db), "--collector", COLLECTOR, "--out", str(archive)
    )
    return Bundle(archive, db, built.stdout)


def members(archive: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        return {m.name.split("/", 1)[1]: m for m in tar.getmembers() if "/" in m.name}


def test_bundle_holds_the_agent_and_only_its_dependencies(bundle: Bundle) -> None:
    files = members(bundle.archive)
    for name in ("install.sh", "uninstall.sh", "zonewatch-agent.service", "agent.toml", "ca.pem",
                 "SHA256SUMS", "VERSION", "bundle.env", "requirements.txt"):  # fmt: skip
        assert name in files, f"{name} missing from the bundle: {sorted(files)}"
    assert files["install.sh"].mode == 0o755 and files["uninstall.sh"].mode == 0o755
    assert "token" not in files  # not embedded unless asked
    wheels = {name.split("/")[1].split("-")[0].lower() for name in files if name.startswith("wheels/")}
    for needed in ("zonewatch", "grpcio", "protobuf", "psutil", "cryptography", "cffi", "pip"):
        assert needed in wheels, f"no {needed} wheel in {sorted(wheels)}"
    assert not wheels & {n.replace("-", "_") for n in COLLECTOR_ONLY}, f"collector-only wheels: {wheels}"
    with tarfile.open(bundle.archive) as tar:
        top = tar.getnames()[0]
        sums = tar.extractfile(f"{top}/SHA256SUMS").read().decode()  # type: ignore[union-attr]
        agent_toml = tar.extractfile(f"{top}/agent.toml").read().decode()  # type: ignore[union-attr]
    listed = {line.split("  ", 1)[1] for line in sums.splitlines()}
    assert listed == {name for name, m in files.items() if m.isfile() and name != "SHA256SUMS"}
    assert f'collector = "{COLLECTOR}"' in agent_toml
    assert "CA fingerprint  SHA256:" in bundle.stdout and "sh install.sh --token" in bundle.stdout


def test_offline_build_from_a_wheelhouse_with_an_embedded_token(bundle: Bundle, tmp_path: Path) -> None:
    """No registry: the wheels come from a directory only; the token rides along, readable by root only."""
    wheelhouse = tmp_path / "wheelhouse"
    with tarfile.open(bundle.archive) as tar:
        wheels = [m for m in tar.getmembers() if "/wheels/" in m.name and "/zonewatch-" not in m.name]
        tar.extractall(wheelhouse, members=wheels, filter="tar")
    (wheel_dir,) = {Path(m.name).parent for m in wheels}
    archive = tmp_path / "with-token.tar.gz"
    leftover = tmp_path / "with-token.tar.gz.part"  # an earlier run killed midway, readable by all
    leftover.write_bytes(b"")
    leftover.chmod(0o644)
    run_cli("zonewatch-collector", "bundle", "--db", str(bundle.db), "--collector", COLLECTOR, "--out",
            str(archive), "--wheelhouse", str(wheelhouse / wheel_dir), "--token", "zwt_test")  # fmt: skip
    files = members(archive)
    assert {n for n in files if n.startswith("wheels/")} == {
        n for n in members(bundle.archive) if n.startswith("wheels/")
    }
    assert files["token"].mode == 0o600 and archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        sums = tar.extractfile(f"{tar.getnames()[0]}/SHA256SUMS").read().decode()  # type: ignore[union-attr]
    assert "  token" not in sums  # deleted after use: install.sh must not miss it on a second run


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    for args, message in (
        (("--collector", "10.0.0.5"), "collector must be HOST:PORT"),
        (("--collector", "10.0.0.5:7390", "--db", str(tmp_path / "none.db")), "no CA certificate at"),
        (("--collector", "10.0.0.5:7390", "--ca", __file__), "not a PEM certificate"),
    ):
        result = run_cli(
            "zonewatch-collector", "bundle", *args, "--out", str(tmp_path / "b.tar.gz"), check=False
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "b.tar.gz").exists()


def test_agent_imports_only_what_the_bundle_carries() -> None:
    """A new third-party import in agent/ must be added to the bundle, or installs break offline."""
    distribution_of = {
        "grpc": "grpcio",
        "google": "protobuf",
        "psutil": "psutil",
        "cryptography": "cryptography",
    }
    ours = {"agent", "protos"}
    found: dict[str, str] = {}
    paths = [*(ROOT / "agent").rglob("*.py"), *(ROOT / "protos" / "zonewatch").rglob("*.py")]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours:
                    found[top] = str(path.relative_to(ROOT))
    unknown = {
        top: where for top, where in found.items() if distribution_of.get(top) not in AGENT_REQUIREMENTS
    }
    assert not unknown, f"agent code imports packages the bundle does not carry: {unknown}"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        # .ci/run installs it: in CI a skip would hide a broken unit.
        (pytest.fail if os.environ.get("CI") else pytest.skip)("systemd-analyze is not installed (systemd)")
    units = [ROOT / "collector" / "bundle_files" / "zonewatch-agent.service",
             ROOT / "deploy" / "systemd" / "zonewatch-collector.service"]  # fmt: skip
    for unit in units:
        verify_unit(unit.read_text(encoding="utf-8"), unit.name, tmp_path)


def verify_unit(text: str, name: str, work: Path, prefix: Path | None = None) -> None:
    """`systemd-analyze verify` on a copy whose ExecStart programs exist: under ``prefix`` (an installed
    root) where they are, else stand-ins."""
    lines = []
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "ExecStart":
            program, _, rest = value.partition(" ")
            if prefix is not None:
                program = str(prefix / program.lstrip("/"))
            else:
                program = str(work / "bin" / Path(program).name)
                Path(program).parent.mkdir(exist_ok=True)
                Path(program).write_text("#!/bin/sh\n", encoding="utf-8")
                Path(program).chmod(0o755)
            assert os.access(program, os.X_OK), f"{name}: ExecStart {program} is not executable"
            line = f"ExecStart={program} {rest}"
        lines.append(line)
    copy = work / name
    copy.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=work
    )
    assert result.returncode == 0 and not result.stderr.strip(), f"{name}: {result.stderr}"


# --- the clean host ------------------------------------------------------------------------------


def make_clean_root(root: Path) -> None:
    """A host fresh from the installer, as far as zonewatch can tell: the machine's /usr (mounted by
    ENTER), merged-usr links, a minimal /etc, empty /opt, /var, /tmp."""
    for name in ("usr", "etc", "opt", "var", "tmp", "proc", "sys", "dev", "run", "root"):
        (root / name).mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    for name in ("bin", "sbin", "lib", "lib64"):
        host = Path("/") / name
        if host.is_symlink():
            (root / name).symlink_to(os.readlink(host))
        elif host.is_dir():
            (root / name).mkdir()
    etc = root / "etc"
    files = {
        "passwd": "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "group": "root:x:0:\nnogroup:x:65534:\n",
        "shadow": "root:*:20000:0:99999:7:::\nnobody:*:20000:0:99999:7:::\n",
        "gshadow": "root:*::\nnogroup:*::\n",
        "nsswitch.conf": "passwd: files\ngroup: files\nshadow: files\ngshadow: files\nhosts: files\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
        "hostname": "clean-host\n",
    }
    for name, text in files.items():
        (etc / name).write_text(text, encoding="utf-8")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)
    # What every installed system has; useradd and userdel rewrite the backups and take the lock.
    for name in ("passwd", "group", "shadow", "gshadow"):
        shutil.copy2(etc / name, etc / f"{name}-")
    (etc / ".pwd.lock").touch(0o600)
    for name in ("login.defs", "ld.so.cache", "ld.so.conf"):
        if Path("/etc", name).exists():
            shutil.copy2(Path("/etc", name), etc / name)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its type and, for files, its content hash."""
    import hashlib

    state = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[relative] = "-> " + os.readlink(path)
        elif path.is_dir():
            state[relative] = f"dir {path.stat().st_mode & 0o7777:o}"
        else:
            state[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def in_root(host: Host, root: Path, *cmd: object, check: bool = True, timeout: float = 120) -> Any:
    """Run a command as root in the clean host (its namespace and chroot), with a clean environment."""
    args = host.exec_args(
        "sh", "-c", ENTER, "sh", root, "env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", *cmd
    )
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(map(str, cmd))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def unit_service(root: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((root / UNIT_PATH).read_text(encoding="utf-8"))
    return dict(parser["Service"])


def as_unit_user(service: dict[str, str]) -> list[str]:
    """What the unit makes of a process: its user, only its capabilities, no new privileges, its
    environment (setpriv, since there is no systemd in the clean host)."""
    caps = ",".join("+" + c.lower().removeprefix("cap_") for c in service["AmbientCapabilities"].split())
    bounding = ",".join(
        "+" + c.lower().removeprefix("cap_") for c in service["CapabilityBoundingSet"].split()
    )
    return [
        "setpriv", f"--reuid={service['User']}", f"--regid={service['Group']}", "--init-groups",
        f"--inh-caps=-all,{caps}", f"--ambient-caps=-all,{caps}", f"--bounding-set=-all,{bounding}",
        "--no-new-privs", "--", "env", "-i", f"PATH={PATH}", *shlex.split(service.get("Environment", "")),
    ]  # fmt: skip


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def stored(db: Path, agent_id: str) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT id, department FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        if row is None:
            return {}
        key, department = row
        samples = con.execute("SELECT count(*) FROM interface_samples WHERE agent = ?", (key,)).fetchone()[0]
        zones = dict(
            con.execute(
                "SELECT method || ' ' || zone, sum(bytes_in + bytes_out) FROM zone_traffic WHERE agent = ?"
                " GROUP BY method, zone",
                (key,),
            ).fetchall()
        )
        serials = [
            r[0] for r in con.execute("SELECT serial FROM certificates WHERE agent_id = ?", (agent_id,))
        ]
        return {"department": department, "samples": samples, "zones": zones, "serials": serials}
    except sqlite3.Error:
        return {}
    finally:
        con.close()


def sensors_of(db: Path, agent_id: str) -> dict[str, str]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT sensors FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}
    except sqlite3.Error:
        return {}
    finally:
        con.close()


@pytest.fixture
def clean_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "host"
    make_clean_root(root)
    try:
        yield root
    finally:
        # Nothing should be mounted here (the mounts live in per-command namespaces); if something is, go.
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            mounted = [line.split()[1] for line in fh if line.split()[1].startswith(str(root))]
        for point in sorted(mounted, reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False)


@pytest.mark.netns
def test_offline_install_reports_over_mtls_and_uninstall_leaves_nothing(
    bundle: Bundle, clean_root: Path, tmp_path: Path
) -> None:
    require_root_netns(iperf3=False)
    root = clean_root
    before = snapshot(root)
    stick = root / "media" / "usb"
    stick.mkdir(parents=True)
    with tarfile.open(bundle.archive) as tar:
        top = tar.getnames()[0]
        tar.extractall(stick, filter="tar")
    bundle_dir = f"/media/usb/{top}"
    zones, log = tmp_path / "zones.yaml", tmp_path / "collector.log"
    zones.write_text(ZONE_CATALOG, encoding="utf-8")
    with TestNetwork() as net:
        central = net.add_host("coll", "extranet")
        host = net.add_host("clean", "extranet")
        collector, listen = start_collector(central, bundle.db, zones, tls=True, log=log)
        assert listen == COLLECTOR
        # No registry is reachable from the clean host: pip could not cheat.
        probe = in_root(host, root, "python3", "-c",
                        "import socket; socket.create_connection(('151.101.0.223', 443), timeout=2)",
                        check=False)  # fmt: skip
        assert probe.returncode != 0

        # An altered bundle is refused before anything is installed.
        (stick / top / "agent.toml").write_text('collector = "10.66.6.6:7390"\n', encoding="utf-8")
        refused = in_root(host, root, "sh", f"{bundle_dir}/install.sh", "--token", "x", check=False)
        assert refused.returncode != 0 and "altered" in refused.stderr and "agent.toml" in refused.stderr
        assert not (root / "opt" / "zonewatch-agent").exists()
        with tarfile.open(bundle.archive) as tar:
            tar.extract(f"{top}/agent.toml", stick, filter="tar")

        labels = ("--department", "市公安局", "--county", "高新区")
        created = run_cli(
            "zonewatch-collector", "tokens", "create", "--db", str(bundle.db), *labels, "--collector", listen
        ).stdout
        token = next(line.split()[-1] for line in created.splitlines() if line.startswith("token "))
        (stick / "token.txt").write_text(token + "\n", encoding="utf-8")
        # A group left behind by an earlier uninstall (groupdel failed) does not stop useradd.
        in_root(host, root, "groupadd", "--system", USER)
        # From a file: the token never shows in the process list (enroll gets it in its environment).
        installed = in_root(
            host, root, "sh", f"{bundle_dir}/install.sh", "--token-file", "/media/usb/token.txt"
        )
        assert "systemd is not running here" in installed.stdout, installed.stdout
        # Run again: idempotent, keeps the enrollment, and an embedded token it no longer needs goes.
        (stick / top / "token").write_text(token + "\n", encoding="utf-8")
        again = in_root(host, root, "sh", f"{bundle_dir}/install.sh")
        assert "already enrolled" in again.stdout
        assert not (stick / top / "token").exists()

        state = root / "var" / "lib" / "zonewatch-agent"
        assert state.stat().st_mode & 0o777 == 0o700
        enrollment = json.loads((state / "enrollment.json").read_text(encoding="utf-8"))
        agent_id = enrollment["agent_id"]
        uid = next(int(line.split(":")[2]) for line in (root / "etc" / "passwd").read_text().splitlines()
                   if line.startswith(f"{USER}:"))  # fmt: skip
        assert state.stat().st_uid == uid and (state / "tls" / "agent.key").stat().st_uid == uid
        service = unit_service(root)
        assert service["User"] == USER and service["NoNewPrivileges"] == "yes"
        verify_unit((root / UNIT_PATH).read_text(encoding="utf-8"), "installed-agent.service", tmp_path, root)

        agent_log = tmp_path / "agent.log"
        command = [*as_unit_user(service), *shlex.split(service["ExecStart"])]
        with agent_log.open("ab") as stderr:
            agent = host.popen("sh", "-c", ENTER, "sh", root, *command, stderr=stderr)
        try:

            def dropped() -> bool:
                return agent.poll() is not None or status_of(agent.pid)["Uid"].split()[0] == str(uid)

            wait_until(dropped, 10, "the agent to drop to its user")
            status = status_of(agent.pid)
            assert int(status["CapEff"], 16) == GRANTED and int(status["CapBnd"], 16) == GRANTED, status
            assert status["NoNewPrivs"] == "1"

            def reported() -> bool:
                s = stored(bundle.db, agent_id)
                return bool(s) and s["samples"] > 0 and any(v > 0 for k, v in s["zones"].items())

            wait_until(reported, 45, f"the agent's reports\n{log_tail(agent_log)}")
            facts = stored(bundle.db, agent_id)
            assert facts["department"] == "市公安局"
            from cryptography import x509

            cert = x509.load_pem_x509_certificate((state / "tls" / "agent.crt").read_bytes())
            assert f"{cert.serial_number:032x}" in facts["serials"]
            # CAP_NET_ADMIN is enough for the kernel's counters: no fallback to counting from the capture.
            assert any(k.startswith("nftables ") for k in facts["zones"]), (facts, log_tail(agent_log))
            assert "CAP_NET" not in agent_log.read_text(encoding="utf-8"), log_tail(agent_log)

            # Another user's /proc/PID/fd is closed to the agent: a root's listener shows without its program.
            host.python_popen("-c", ROOT_LISTENER)
            seen = in_root(host, root, *as_unit_user(service), "/opt/zonewatch-agent/venv/bin/python",
                           "-c", LISTENERS)  # fmt: skip
            assert "2222 None" in seen.stdout.splitlines(), seen.stdout
            # ... and the agent says so, rather than leaving the program blank silently.
            unknown = "programs of other users' sockets unknown (no CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH)"
            wait_until(lambda: unknown in sensors_of(bundle.db, agent_id).get("listeners", ""), 30,
                       f"the listeners' status to say so: {sensors_of(bundle.db, agent_id)}")  # fmt: skip
        finally:
            stop(host, agent, agent_log)
        stop(central, collector, log)

        removed = in_root(host, root, "sh", "/opt/zonewatch-agent/uninstall.sh")
        assert "uninstalled" in removed.stdout
    shutil.rmtree(root / "media")
    after = snapshot(root)
    assert after.keys() == before.keys(), (
        sorted(after.keys() - before.keys()),
        sorted(before.keys() - after.keys()),
    )
    for name in ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow"):
        assert after[name] == before[name], f"{name} changed"
