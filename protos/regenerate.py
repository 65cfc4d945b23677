"""Rebuild the generated protobuf and gRPC modules from protos/zonewatch/v1/*.proto.

The generator version is pinned: the same sources must give the same bytes on
every machine, and tests/test_protos_fresh.py fails when the committed modules
differ from what this script produces. Usage:

    python -m protos.regenerate            # rewrite the modules in place
    python -m protos.regenerate --out DIR  # write them under DIR instead (for the check)
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.85.1"
ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "protos" / "zonewatch" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Run protoc for every source; return the modules written."""
    installed = metadata.version("grpcio-tools")
    if installed != GRPCIO_TOOLS_VERSION:
        raise SystemExit(
            f"protos/regenerate.py needs grpcio-tools=={GRPCIO_TOOLS_VERSION}, found {installed}"
        )
    from grpc_tools import protoc  # imported late: a dev-only dependency

    out.mkdir(parents=True, exist_ok=True)
    relative = [str(p.relative_to(ROOT)) for p in SOURCES]
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *relative,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "protos" / "zonewatch" / "v1").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write under (default: the repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
