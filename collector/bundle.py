"""The offline agent bundle: one tar.gz an admin carries on a USB stick to hosts without internet.

Everything lies under one directory, ``zonewatch-agent-VERSION/``:

    wheels/                 zonewatch (built from this source), the agent's runtime dependencies and
                            their own, for the target Python and platform, and pip itself (install.sh
                            runs pip from its wheel: no index, and no ensurepip, which some OS
                            packages leave out)
    requirements.txt        what install.sh asks pip for (the agent's dependencies, zonewatch's bounds)
    agent.toml              the agent's configuration: the collector it reports to
    ca.pem                  the collector's CA: install.sh pins its fingerprint at enrollment
    bundle.env              version, collector, enrollment port, target Python and architecture
    install.sh, uninstall.sh, zonewatch-agent.service (collector/bundle_files/)
    VERSION
    token                   only when embedded (0600); install.sh deletes it after use
    SHA256SUMS              every file above but the token; install.sh checks it before anything else

Only the agent's runtime dependencies go in: what agent/ and the generated protos import when the
agent runs and enrolls (grpc, google.protobuf, psutil; cryptography at enrollment). The collector's
(pysigma, jinja2, rich, sqlite-utils, PyYAML) stay out, so zonewatch's wheel is installed with
--no-deps. The bounds come from zonewatch's own metadata, so they cannot drift from pyproject.toml.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from collector import __version__
from collector.errors import CollectorError

# The distributions behind what the agent imports at run and enroll time (a test checks agent/'s
# imports against this): grpc, google.protobuf, psutil, cryptography.
AGENT_REQUIREMENTS = ("grpcio", "protobuf", "psutil", "cryptography")
SCRIPTS = ("install.sh", "uninstall.sh")
UNIT = "zonewatch-agent.service"
STATE_DIR = "/var/lib/zonewatch-agent"
# Architectures as a wheel's platform tag ends and as `uname -m` prints them.
ARCHITECTURES = ("x86_64", "aarch64", "loongarch64", "riscv64", "ppc64le", "s390x", "i686", "armv7l")
# What of the source tree a wheel is built from; the rest (tests, bench, .venv) stays out.
SOURCE_PARTS = ("pyproject.toml", "README.md", "agent", "collector", "protos")
PIP_TIMEOUT_S = 600

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BundleOptions:
    out: Path
    collector: str  # HOST:PORT agents report to (the mTLS port)
    ca_path: Path  # the collector's CA certificate (PEM): pki/ca.crt
    enroll_port: int = 0  # 0: the collector's port + 1, as `serve` listens
    wheelhouse: Path | None = None  # pre-downloaded wheels: build offline from these only
    python_version: str = ""  # the target's "3.11"; "": this interpreter's
    platforms: tuple[str, ...] = ()  # pip platform tags of the target; (): this machine's
    token: str = ""  # embedded enrollment token; "": given at install time
    source: Path | None = None  # zonewatch's source tree; None: the one this code runs from


class BundleResult(NamedTuple):
    path: Path
    size: int
    sha256: str
    directory: str  # the top directory inside the archive
    wheels: tuple[str, ...]
    ca_fingerprint: str
    arch: str
    python_version: str


def default_out(directory: Path = Path()) -> Path:
    return directory / f"zonewatch-agent-{__version__}.tar.gz"


def build_bundle(options: BundleOptions, progress: Progress = lambda _: None) -> BundleResult:
    """Build the bundle at options.out (replaced atomically); CollectorError when anything is amiss."""
    collector, enroll_port = _check_collector(options.collector, options.enroll_port)
    python_version = options.python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
    _check_python_version(python_version)
    arch = arch_of(options.platforms)
    ca_pem = read_ca(options.ca_path)
    fingerprint = ca_fingerprint(ca_pem)
    if options.token and not options.token.strip().isprintable():
        raise CollectorError("--token must be printable text")
    top = f"zonewatch-agent-{__version__}"
    with tempfile.TemporaryDirectory(prefix="zonewatch-bundle-") as work:
        root = Path(work) / top
        wheels = root / "wheels"
        wheels.mkdir(parents=True)
        zonewatch_wheel = _zonewatch_wheel(options, wheels, Path(work), progress)
        requirements = agent_requirements(zonewatch_wheel)
        (root / "requirements.txt").write_text("\n".join(requirements) + "\n", encoding="utf-8")
        progress(f"collecting the agent's dependencies for Python {python_version} on {arch}")
        _download([*requirements, "pip"], wheels, options, python_version, progress)
        progress("writing the configuration, scripts and unit")
        _write_files(root, options, ca_pem, collector, enroll_port, python_version, arch)
        names = sorted(p.name for p in wheels.iterdir())
        progress("checksums and archive")
        _write_checksums(root)
        digest = _write_archive(root, options.out, secret=bool(options.token))
    size = options.out.stat().st_size
    progress(f"wrote {options.out} ({size / 1e6:.1f} MB)")
    return BundleResult(options.out, size, digest, top, tuple(names), fingerprint, arch, python_version)


# --- checks -------------------------------------------------------------------------------------


def _check_collector(collector: str, enroll_port: int) -> tuple[str, int]:
    from agent.config import check_address
    from agent.errors import ConfigError

    try:
        check_address(collector)
    except ConfigError as exc:
        raise CollectorError(f"--collector: {exc}") from None
    port = int(collector.rpartition(":")[2])
    enroll_port = enroll_port or port + 1
    if not 0 < enroll_port < 65536:
        raise CollectorError(f"the enrollment port must be in 1..65535, got {enroll_port}")
    return collector, enroll_port


def _check_python_version(version: str) -> None:
    match = re.fullmatch(r"3\.(\d{1,2})", version)
    if not match or int(match[1]) < 11:
        raise CollectorError(f"--python-version must be 3.11 or later as MAJOR.MINOR, got {version!r}")


def arch_of(platforms: tuple[str, ...]) -> str:
    """The `uname -m` of the target: this machine's, or the one every platform tag names."""
    if not platforms:
        return platform.machine()
    found = set()
    for tag in platforms:
        arch = next((a for a in ARCHITECTURES if tag.endswith("_" + a)), None)
        if arch is None:
            raise CollectorError(
                f"--platform {tag!r}: not a Linux wheel platform tag such as manylinux2014_x86_64 or"
                f" manylinux_2_28_aarch64 (architectures: {', '.join(ARCHITECTURES)})"
            )
        found.add(arch)
    if len(found) > 1:
        raise CollectorError(f"--platform tags name several architectures: {', '.join(sorted(found))}")
    return found.pop()


def ca_fingerprint(ca_pem: bytes) -> str:
    """SHA256:<hex> of the CA certificate, as `zonewatch-agent enroll --ca-fingerprint` takes it."""
    from cryptography import x509

    from collector.pki import fingerprint

    try:
        return fingerprint(x509.load_pem_x509_certificate(ca_pem), prefixed=True)
    except ValueError as exc:
        raise CollectorError(f"the CA certificate is not a PEM certificate: {exc}") from None


# --- wheels -------------------------------------------------------------------------------------


def default_source() -> Path | None:
    """The source tree this code runs from, if it is one (an installed package is not)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "agent").is_dir() else None


def _zonewatch_wheel(options: BundleOptions, wheels: Path, work: Path, progress: Progress) -> Path:
    """zonewatch's own wheel in ``wheels``: built from the source, else taken from the wheelhouse."""
    source = options.source or default_source()
    if source is not None:
        if not (source / "pyproject.toml").is_file():
            raise CollectorError(f"--source {source}: no pyproject.toml there")
        progress(f"building the zonewatch wheel from {source}")
        # A copy: building in the tree would leave build/ and egg-info behind in it.
        tree = work / "source"
        tree.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
        for part in SOURCE_PARTS:
            path = source / part
            if path.is_dir():
                shutil.copytree(path, tree / part, ignore=ignore)
            elif path.is_file():
                shutil.copy2(path, tree / part)
        build = ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(tree)]
        _pip(build, None, progress)
    elif options.wheelhouse is not None:
        found = sorted(options.wheelhouse.glob(f"zonewatch-{__version__}-*.whl"))
        if not found:
            raise CollectorError(
                f"no zonewatch source here and no zonewatch-{__version__}-*.whl in {options.wheelhouse}:"
                " give --source DIR (the source tree) or put the wheel in the wheelhouse"
            )
        shutil.copy2(found[-1], wheels / found[-1].name)
    else:
        raise CollectorError(
            "zonewatch runs from an installed package, not its source: give --source DIR (the source"
            f" tree) or --wheelhouse DIR holding zonewatch-{__version__}-py3-none-any.whl"
        )
    built = sorted(wheels.glob("zonewatch-*.whl"))
    if len(built) != 1:
        raise CollectorError(f"expected one zonewatch wheel, found {[p.name for p in built]}")
    return built[0]


def agent_requirements(wheel: Path) -> list[str]:
    """The agent's requirements, with zonewatch's bounds, read from the wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode("utf-8")
    wanted = {}
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = line.partition(":")[2].strip()
        if ";" in requirement:
            continue  # extras (dev, explore) and markers: never the agent's
        name = re.split(r"[<>=!~\[ ]", requirement, maxsplit=1)[0]
        if _normal(name) in AGENT_REQUIREMENTS:
            wanted[_normal(name)] = requirement
    missing = [name for name in AGENT_REQUIREMENTS if name not in wanted]
    if missing:
        raise CollectorError(f"{wheel.name} does not require {', '.join(missing)}: is it zonewatch's wheel?")
    return [wanted[name] for name in AGENT_REQUIREMENTS]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _download(
    requirements: list[str], wheels: Path, options: BundleOptions, python_version: str, progress: Progress
) -> None:
    args = ["download", "--only-binary=:all:", "--dest", str(wheels), "--python-version", python_version]
    for tag in options.platforms:
        args += ["--platform", tag]
    env = None
    if options.wheelhouse is not None:
        if not options.wheelhouse.is_dir():
            raise CollectorError(f"--wheelhouse {options.wheelhouse}: no such directory")
        args += ["--no-index", "--find-links", str(options.wheelhouse)]
        # Offline means the wheelhouse alone: no pip.conf or PIP_* setting may add an index or links.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull
    _pip([*args, *requirements], env, progress)


def _pip(args: list[str], env: dict[str, str] | None, progress: Progress) -> None:
    """Run pip with this interpreter, passing its progress lines on; CollectorError with its last words."""
    command = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--progress-bar", "off"]
    try:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, errors="replace"
        )
    except OSError as exc:
        raise CollectorError(f"cannot run pip: {exc.strerror or exc}") from None
    tail: list[str] = []
    deadline = time.monotonic() + PIP_TIMEOUT_S
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = [*tail[-9:], line]
        if line.startswith(("Collecting", "Created wheel")):
            progress("  " + line.split(" (", 1)[0])
        elif line.startswith(("Saved ", "File was already downloaded ")):
            progress("  got " + Path(line.split()[-1]).name)
        if time.monotonic() > deadline:
            proc.kill()
            break
    status = proc.wait()
    if status != 0:
        errors = [t for t in tail if "ERROR" in t] or tail[-3:]
        raise CollectorError(f"pip {args[0]} failed: {' / '.join(errors).strip()}")


# --- files --------------------------------------------------------------------------------------


def _write_files(
    root: Path,
    options: BundleOptions,
    ca_pem: bytes,
    collector: str,
    enroll_port: int,
    python_version: str,
    arch: str,
) -> None:
    files = resources.files("collector") / "bundle_files"
    for name in (*SCRIPTS, UNIT):
        (root / name).write_bytes(files.joinpath(name).read_bytes())
    (root / "ca.pem").write_bytes(ca_pem)
    (root / "VERSION").write_text(__version__ + "\n", encoding="utf-8")
    env = {
        "VERSION": __version__,
        "COLLECTOR": collector,
        "ENROLL_PORT": str(enroll_port),
        "PYTHON_VERSION": python_version,
        "ARCH": arch,
    }
    (root / "bundle.env").write_text(
        "# Sourced by install.sh after the checksums are verified.\n"
        + "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items()),
        encoding="utf-8",
    )
    # json.dumps of an ASCII HOST:PORT is a valid TOML basic string.
    (root / "agent.toml").write_text(
        "# zonewatch agent, installed from the offline bundle; every setting: README, section\n"
        '# "The agent: zonewatch-agent". The collector enrolled with is remembered in the state.\n'
        f"collector = {json.dumps(collector)}\n"
        f"state_dir = {json.dumps(STATE_DIR)}\n",
        encoding="utf-8",
    )
    if options.token:
        token = root / "token"
        token.write_text(options.token.strip() + "\n", encoding="utf-8")
        token.chmod(0o600)


def _write_checksums(root: Path) -> None:
    """SHA256SUMS in sha256sum's format. Not the token: it is deleted after use, and a forged one
    could only enroll the host with the collector the CA pins anyway."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name != "token":
            lines.append(f"{_sha256(path)}  {name}\n")
    (root / "SHA256SUMS").write_text("".join(lines), encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_archive(root: Path, out: Path, *, secret: bool) -> str:
    """root as a tar.gz at out, owned by root, scripts executable; written aside, then renamed."""
    mtime = int(time.time())

    def entry(path: Path) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path.relative_to(root.parent).as_posix())
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = mtime
        if path.is_dir():
            info.type, info.mode = tarfile.DIRTYPE, 0o755
        else:
            info.size = path.stat().st_size
            info.mode = 0o755 if path.name in SCRIPTS else 0o600 if path.name == "token" else 0o644
        return info

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".part")
    try:
        # A leftover .part (an earlier run killed midway) would keep its own mode: start afresh.
        partial.unlink(missing_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as archive:
            for path in [root, *sorted(root.rglob("*"))]:
                info = entry(path)
                if path.is_dir():
                    archive.addfile(info)
                else:
                    with path.open("rb") as fh:
                        archive.addfile(info, fh)
        os.replace(partial, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise CollectorError(f"cannot write {out}: {exc.strerror or exc}") from None
    return _sha256(out)


def read_ca(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CollectorError(
            f"no CA certificate at {path}: run `zonewatch-collector init` first, or give --ca FILE"
        ) from None
    except OSError as exc:
        raise CollectorError(f"cannot read {path}: {exc.strerror or exc}") from None
