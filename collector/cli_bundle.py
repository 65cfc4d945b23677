"""`zonewatch-collector bundle`: the offline agent bundle for hosts without internet (collector/bundle.py).

It only wires: parse, read the CA (the collector's PKI beside --db, or --ca), build, print where the
bundle is and how to install it. Progress goes to stderr; an error is one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import clidoc
from collector.config import default_pki_dir

Handler = Callable[[argparse.Namespace], int]
PROG = "zonewatch-collector"


def add_parser(sub: Any, db_arg: Callable[[argparse.ArgumentParser], None]) -> dict[str, Handler]:
    """Add `bundle` to the collector's subcommands; return its handler."""
    from collector.bundle import default_out

    bundle = sub.add_parser(
        "bundle",
        help="build the offline agent bundle (wheels, config, CA, install script, systemd unit)",
        description="Build one tar.gz to carry to hosts without internet: the zonewatch wheel built from "
        "this source with only the agent's runtime dependencies (for the target Python and platform), "
        "the agent's configuration pointing at the collector, the collector's CA, install.sh, "
        "uninstall.sh, the hardened systemd unit and SHA256SUMS, which install.sh checks first. On the "
        "host, as root: tar xzf the bundle, then sh install.sh --token TOKEN (from `tokens create`).",
        epilog=clidoc.examples(
            PROG,
            "bundle --collector 10.10.0.5:7390 --db /var/lib/zonewatch/collector.db",
            "bundle --collector 10.10.0.5:7390 --out /media/usb/zonewatch-agent.tar.gz",
            "bundle --collector 10.10.0.5:7390 --python-version 3.12 --platform manylinux2014_aarch64",
            "bundle --collector 10.10.0.5:7390 --wheelhouse ./wheels   # offline: only these wheels",
            "bundle --collector 10.10.0.5:7390 --token zwt_…   # embedded, deleted after install",
        ),
        formatter_class=clidoc.ExamplesHelpFormatter,
    )
    db_arg(bundle)
    bundle.add_argument(
        "--collector",
        required=True,
        metavar="HOST:PORT",
        help="the address agents report to (the collector's mTLS port, e.g. 10.10.0.5:7390)",
    )
    bundle.add_argument(
        "--enroll-port",
        type=int,
        default=0,
        metavar="PORT",
        help="the collector's enrollment port on the same host (default: the --collector port + 1)",
    )
    ca = bundle.add_mutually_exclusive_group()
    ca.add_argument(
        "--pki", type=Path, metavar="DIR", help="the collector's PKI directory (default: 'pki' beside --db)"
    )
    ca.add_argument("--ca", type=Path, metavar="FILE", help="the CA certificate itself (PEM), e.g. a copy")
    bundle.add_argument(
        "--out",
        type=Path,
        default=default_out(),
        metavar="FILE",
        help=f"the bundle to write (replaced; default ./{default_out().name})",
    )
    bundle.add_argument(
        "--wheelhouse",
        type=Path,
        metavar="DIR",
        help="build offline from the wheels in DIR only (default: pip download them for the target)",
    )
    bundle.add_argument(
        "--python-version",
        default="",
        metavar="X.Y",
        help="the hosts' Python, 3.11 or later (default: this interpreter's)",
    )
    bundle.add_argument(
        "--platform",
        action="append",
        default=[],
        dest="platforms",
        metavar="TAG",
        help="a wheel platform tag of the hosts, e.g. manylinux2014_x86_64 (repeatable; default: "
        "this machine's)",
    )
    bundle.add_argument(
        "--token",
        default="",
        help="embed this enrollment token (default: none, given to install.sh: a token on a USB stick "
        "is a secret); install.sh deletes it after use",
    )
    bundle.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="zonewatch's source tree to build the wheel from (default: the one this command runs from)",
    )
    return {"bundle": cmd_bundle}


def cmd_bundle(args: argparse.Namespace) -> int:
    from rich.console import Console

    from collector.bundle import BundleOptions, build_bundle

    console = Console(stderr=True, highlight=False)
    ca_path = args.ca or (args.pki or default_pki_dir(args.db)) / "ca.crt"
    options = BundleOptions(
        out=args.out,
        collector=args.collector,
        ca_path=ca_path,
        enroll_port=args.enroll_port,
        wheelhouse=args.wheelhouse,
        python_version=args.python_version,
        platforms=tuple(args.platforms),
        token=args.token,
        source=args.source,
    )
    with console.status("building the agent bundle") as status:

        def progress(message: str) -> None:
            console.print(message, markup=False)
            status.update(message.strip())

        result = build_bundle(options, progress)
    print(f"bundle          {result.path} ({result.size / 1e6:.1f} MB, sha256 {result.sha256})")
    print(f"for             Python {result.python_version} on {result.arch}; collector {args.collector}")
    print(f"CA fingerprint  {result.ca_fingerprint}")
    print(f"wheels          {' '.join(result.wheels)}")
    print("on each host, as root:")
    print(f"  tar xzf {result.path.name} && cd {result.directory}")
    token = "" if args.token else " --token TOKEN   # zonewatch-collector tokens create ..."
    print(f"  sh install.sh{token}")
    sys.stdout.flush()
    return 0
